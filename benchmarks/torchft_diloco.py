"""The charlm task trained with torchft's own DiLoCo (torchft.local_sgd.DiLoCo), for a row next to ours.

:func:`run` is called on every rank inside an initialised default c10d Gloo group, like
``pyparallel.train.run``, and returns the same curve and summary fields. Each rank is a torchft replica
group of one (DiLoCo's usual layout: one replica per worker): rank 0 starts a lighthouse that waits for
all ranks (``min_replicas = world size``), every rank builds a :class:`torchft.Manager` over torchft's own
reconfigurable Gloo group (``torchft.process_group.ProcessGroupGloo``, not pyparallel's collectives),
and ``DiLoCo(manager, [model], AdamW, SGD(outer_lr, outer_momentum, nesterov=True), sync_every=H)``
averages the fp32 pseudo-gradients every H inner steps (one quorum + one all-reduce per parameter, or per
flat bucket with ``use_bucketization``) and steps the outer optimizer. Same model, same batches
(``task.epoch_batches(epoch, rank, world)``), same inner and outer optimizers as ``--algo diloco``.

Addresses: ranks may live in network namespaces of their own (benchmarks/netns.py), where the host's
name leads nowhere useful, so everything torchft announces is an IP of the interface that reaches
MASTER_ADDR: the lighthouse (on rank 0, bound to every IPv4 interface, announced as MASTER_ADDR), each
replica's TCPStore (through which the quorum's Gloo group rendezvouses) and manager server.
torchft's checkpoint transport (used only to heal a replica that joins late or restarts) still
announces ``socket.gethostname()``; healing is never needed here (``init_sync=False``: every rank
builds the same initial model from the seed, which :func:`run` checks, and no replica fails).

    python benchmarks/torchft_diloco.py                      # self-check: 2 ranks on loopback, tiny charlm
    python benchmarks/torchft_diloco.py -n 4 --repeat 2 --link-gbit 1   # 4 network namespaces (root)
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib.metadata
import os
import socket
import time

# torchft's Rust side logs every quorum and commit at INFO to stderr unless told otherwise; it reads
# RUST_LOG once, when torchft is first imported (pyparallel.train does not import it).
os.environ.setdefault("RUST_LOG", "warn")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pyparallel import tasks, train  # noqa: E402


def _reachable_ip(master_addr: str) -> str:
    """This process's IP on the interface that routes to ``master_addr`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((master_addr, 9))
        return s.getsockname()[0]


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _same_everywhere(value: str) -> bool:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def _start_lighthouse(rank: int, world: int, master_addr: str):
    """Rank 0 starts the lighthouse; every rank gets its URL (through the default group)."""
    from pyparallel import fault_tolerance

    lighthouse, box = None, [None]
    if rank == 0:
        try:
            bind = "[::]:0" if ":" in master_addr else "0.0.0.0:0"  # every interface, MASTER_ADDR's included
            lighthouse = fault_tolerance.start_lighthouse(min_replicas=world, bind=bind)
            # address() names the host (socket.gethostname()); the port is what we need from it.
            port = int(lighthouse.address().rsplit(":", 1)[1].strip("/"))
            box[0] = f"http://{_url_host(master_addr)}:{port}"
        except Exception as exc:  # noqa: BLE001 (the other ranks must hear of it, not wait for a URL)
            box[0] = exc
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise RuntimeError(f"torchft_diloco: rank 0 could not start the torchft lighthouse: {box[0]}") from (
            box[0] if rank == 0 else None)
    return lighthouse, box[0]


def run(cfg, sync_every: int, outer_lr: float = 0.7, outer_momentum: float = 0.9, *,
        use_bucketization: bool = False, wire_bytes=None) -> dict:
    """Trains ``cfg``'s charlm task with torchft 0.2.0's DiLoCo; returns this rank's results.

    Args:
        cfg: a parsed ``pyparallel.train.parser()`` namespace (``--task charlm`` and the training options;
            ``--steps-per-epoch`` is the evaluation interval, ``--timeout`` bounds quorums and collectives).
        sync_every: H, inner steps between synchronisations.
        outer_lr, outer_momentum: the outer SGD (Nesterov).
        use_bucketization: torchft's option to all-reduce the pseudo-gradients as one flat buffer instead
            of one all-reduce per parameter (its default, kept here).

    Returns:
        ``{"curve": [{"epoch", "step", "loss", "val_loss", "test_accuracy", "seconds", "bytes_sent"}, ...],
        "val_loss", "test_accuracy", "seconds", "seconds_per_step", "parameters", "steps", "world_size", ...}``
        as ``pyparallel.train.run``: ``seconds`` is cumulative training wall time (evaluations excluded),
        ``bytes_sent`` this rank's cumulative bytes sent by the pseudo-gradient all-reduces.
    """
    if not dist.is_initialized():
        raise RuntimeError("torchft_diloco.run: initialise the default process group first")
    if sync_every < 1:
        raise ValueError(f"torchft_diloco.run: sync_every must be >= 1, got {sync_every}")
    train.resolve_defaults(cfg)
    if cfg.task != "charlm":
        raise ValueError(f"torchft_diloco.run: trains the charlm task, got --task {cfg.task}")
    if cfg.device != "cpu":
        raise ValueError("torchft_diloco.run: CPU only (the lead's benchmark; torchft's Gloo group)")
    master_addr = os.environ.get("MASTER_ADDR")
    if not master_addr:
        raise RuntimeError("torchft_diloco.run: MASTER_ADDR is not set (rank 0's address: the lighthouse is "
                           "announced there and every replica announces its interface towards it)")
    try:
        from torchft.local_sgd import DiLoCo
        from torchft.process_group import ProcessGroupGloo

        from pyparallel import fault_tolerance
    except ImportError as exc:
        raise RuntimeError(f"torchft_diloco: torchft is not importable: {exc}") from exc

    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cpu")
    task = tasks.get(cfg.task)(cfg)
    train.check_run(cfg, world, task=task)
    model = task.model().to(device)
    if not _same_everywhere(_digest(model.parameters())):
        raise RuntimeError("torchft_diloco: the ranks built different initial models (init_sync=False needs "
                           "the same model everywhere)")
    inner = task.optimizer(model.parameters())
    outer = torch.optim.SGD(model.parameters(), lr=outer_lr, momentum=outer_momentum, nesterov=True)
    timeout = datetime.timedelta(seconds=cfg.timeout)
    my_ip = _reachable_ip(master_addr)

    lighthouse, lighthouse_url = _start_lighthouse(rank, world, master_addr)
    group = manager = None
    try:
        group = ProcessGroupGloo(timeout=timeout)
        manager = fault_tolerance.make_manager(
            group, fault_tolerance.TrainingState(model, inner), lighthouse=lighthouse_url,
            replica_id=f"torchft_diloco_{rank}",  # the trailing digits are torchft's global rank
            min_replicas=world, timeout=timeout, quorum_timeout=timeout, store_host=my_ip, hostname=my_ip,
            init_sync=False, max_failed_steps=0)  # no failures expected: the first discarded sync raises
        bytes_sent = _count_allreduce_bytes(manager)

        # The first quorum forms the torchft Gloo group (a rendezvous and a full mesh of connections, like
        # init_process_group for our rows): done here, before the clock. DiLoCo's own quorum at the first
        # sync finds the same members, so torchft keeps that group (checked below).
        t0 = time.perf_counter()
        manager.start_quorum()
        manager.wait_quorum()
        if manager.errored():
            raise RuntimeError(f"torchft_diloco: the first quorum failed: {manager.errored()}")
        setup_seconds = time.perf_counter() - t0
        first_quorum = manager._quorum_id

        result = _train(cfg, task, model, inner, outer, manager, DiLoCo, sync_every, use_bucketization,
                        bytes_sent, device, wire_bytes=wire_bytes)
        result["quorum_changes"] = manager._quorum_id - first_quorum  # 0: one Gloo group for the whole run
        result["setup_seconds"] = setup_seconds
        result["replica_address"] = my_ip  # what this replica announced (its store and manager server)
        dist.barrier()  # every replica is past its last quorum before the lighthouse goes
    finally:
        if manager is not None:
            manager.shutdown(wait=True)
        if group is not None:
            group.shutdown()
        if lighthouse is not None:
            lighthouse.shutdown()
    result["torchft_version"] = importlib.metadata.version("torchft")
    return result


def _count_allreduce_bytes(manager) -> list[int]:
    """Counts the bytes this replica sends in ``manager.allreduce`` (what DiLoCo all-reduces: its fp32
    pseudo-gradients). torchft's Gloo group runs Gloo's ring all-reduce (reduce-scatter, then
    all-gather), in which each of n ranks sends 2 (n - 1) / n of the tensor's bytes; a call that does
    not communicate (the manager has already errored) counts nothing. Returns a one-element box."""
    box = [0]
    allreduce = manager.allreduce

    def counted(tensor: torch.Tensor, *args, **kwargs):
        work = allreduce(tensor, *args, **kwargs)
        if not manager.errored():
            n = manager.num_participants()
            box[0] += int(2 * (n - 1) * tensor.numel() * tensor.element_size() // n) if n > 1 else 0
        return work

    manager.allreduce = counted
    return box


def _train(cfg, task, model, inner, outer, manager, DiLoCo, sync_every: int, use_bucketization: bool,
           bytes_sent: list[int], device: torch.device, wire_bytes=None) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    eval_model = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    diloco = DiLoCo(manager, [model], inner, outer, sync_every=sync_every, use_bucketization=use_bucketization)
    fragment = diloco._fragments[0]  # one fragment: the whole model
    commits_before = manager.batches_committed()

    def evaluate_global() -> dict:
        # The last synchronised (global) parameters: torchft keeps them in the fragment's
        # original_parameters (saved after every committed outer step, restored on a failed one), the
        # same on every replica. Between syncs the local model differs per rank; it is not evaluated.
        with torch.no_grad():
            params = dict(eval_model.named_parameters())
            for name in names:
                params[name].copy_(fragment.original_parameters[name])
        return task.evaluate(eval_model, device)

    # Time in DiLoCo's post-step hook: on a sync step the quorum, the pseudo-gradient all-reduces, the
    # commit vote and the outer step (and any wait for a slower replica); otherwise a counter increment.
    # (Wrapped before __enter__ registers it.)
    sync_seconds, post_step = [0.0], diloco._step_post_hook

    def timed_post_step(*args) -> None:
        t = time.perf_counter()
        post_step(*args)
        sync_seconds[0] += time.perf_counter() - t

    diloco._step_post_hook = timed_post_step
    curve, elapsed, step, loss = [], 0.0, 0, None
    syncs_before = manager.current_step()
    with diloco:
        for epoch in range(cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            for xb, yb in task.epoch_batches(epoch, rank, world):
                inner.zero_grad(set_to_none=True)
                loss = tasks.loss_fn(model(xb.to(device)), yb.to(device))
                loss.backward()
                inner.step()  # DiLoCo's post-step hook syncs every sync_every steps
                step += 1
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            elapsed += time.perf_counter() - t0
            if manager.errored():
                raise RuntimeError(f"torchft_diloco: a sync failed: {manager.errored()}")
            held_out = evaluate_global()
            curve.append({"epoch": epoch, "step": step, "loss": loss.item() if loss is not None else None,
                          "val_loss": held_out["loss"], "test_accuracy": held_out["accuracy"],
                          "seconds": elapsed, "bytes_sent": bytes_sent[0],
                          "wire_bytes": wire_bytes() if wire_bytes else None})
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            if cfg.max_seconds is not None and train.out_of_time(elapsed, cfg.max_seconds):
                break
    # No final sync: torchft's DiLoCo has no call for one, so the steps after the last sync (step % H of
    # them) never reach the global model; the summary is the last evaluation (global parameters).
    syncs = manager.current_step() - syncs_before  # one manager step per committed sync
    final = curve[-1] if curve else None
    return {
        "task": cfg.task, "algo": "torchft-diloco", "world_size": world, "epochs": cfg.epochs, "steps": step,
        "sync_every": sync_every, "outer_lr": outer.defaults["lr"], "outer_momentum": outer.defaults["momentum"],
        "use_bucketization": use_bucketization, "syncs": syncs,
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_loss": final["val_loss"] if final else None,
        "test_accuracy": final["test_accuracy"] if final else None,
        "samples_per_s": step * cfg.batch_size * world / elapsed if elapsed else None,
        "seconds_per_step": elapsed / step if step else None,
        "seconds": elapsed,
        "sync_seconds": sync_seconds[0],
        "bytes_sent_per_step": bytes_sent[0] / step if step else None,
        "curve": curve,
        "parameter_digest": _digest(model.parameters()),
        "global_parameter_digest": _digest(fragment.original_parameters[n] for n in names),
        "final_parameters": [p.detach().cpu().clone() for p in model.parameters()],
        "batches_committed": manager.batches_committed() - commits_before,  # syncs x replicas
    }


# ---- self-check: ranks on loopback (or in emulated hosts, --link-gbit) through benchmarks/launch.py ----

def _check(args) -> int:
    """One rank of the self-check: ``run`` --repeat times in the same process and group, then the same
    training with pyparallel's DiLoCo; raises (exit 1) when a check fails, rank 0 prints the results."""
    import json

    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.ranks,
                            timeout=timeout)
    argv = ["--task", "charlm", "--d-model", str(args.d_model), "--n-layers", str(args.n_layers), "--batch-size",
            str(args.batch_size), "--steps-per-epoch", str(args.steps_per_epoch), "--epochs", "2", "--threads", "1",
            "--timeout", "60"]
    synced_at_end = (2 * args.steps_per_epoch) % args.sync_every == 0
    for attempt in range(args.repeat):
        result = run(train.resolve_defaults(train.parser().parse_args(argv)), args.sync_every,
                     use_bucketization=args.bucketize)
        final = result.pop("final_parameters")
        # the default group still works after torchft's teardown, and every rank holds the same global model
        # (and the same local one when the run ended on a sync)
        digests = [None] * args.ranks
        dist.all_gather_object(digests, (result["global_parameter_digest"], result["parameter_digest"]))
        if len({g for g, _ in digests}) != 1 or (synced_at_end and len(set(digests)) != 1):
            raise AssertionError(f"parameters differ between ranks: {digests}")
        if synced_at_end and digests[0][0] != digests[0][1]:
            raise AssertionError(f"the run ended on a sync, yet the local model is not the global one: {digests}")
        expected_syncs = 2 * args.steps_per_epoch // args.sync_every
        if result["syncs"] != expected_syncs or result["quorum_changes"] != 0:
            raise AssertionError(f"{result['syncs']} syncs (expected {expected_syncs}), "
                                 f"{result['quorum_changes']} quorum changes (expected 0)")
        fp32 = sum(p.numel() for p in final) * 4
        if result["curve"][-1]["bytes_sent"] != expected_syncs * (2 * (args.ranks - 1) * fp32 // args.ranks):
            raise AssertionError(f"bytes_sent {result['curve'][-1]['bytes_sent']} is not {expected_syncs} syncs of "
                                 f"the ring's 2(n-1)/n x {fp32} fp32 bytes")
        if args.rank == 0:
            print(f"run {attempt}: {json.dumps(result, indent=2)}", flush=True)
    if synced_at_end and not args.no_compare:
        # The same training with pyparallel's DiLoCo (same data, inner and outer optimizers, H): the same
        # algorithm, so the same parameters up to the rounding of the averages. (When the run does not end
        # on a sync, pyparallel's run() synchronises the remaining steps and torchft's does not.)
        ours = train.run(train.resolve_defaults(train.parser().parse_args(
            argv + ["--algo", "diloco", "--sync-every", str(args.sync_every), "--no-progress"])))
        diff = torch.tensor(max((a - b).abs().max().item() for a, b in zip(final, ours["final_parameters"])))
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if args.rank == 0:
            print(f"max |torchft DiLoCo - pyparallel DiLoCo| over the parameters: {diff.item():.2e} "
                  f"(val loss {result['val_loss']:.6f} vs {ours['val_loss']:.6f})")
        if diff.item() > 1e-4:
            raise AssertionError(f"torchft's DiLoCo and pyparallel's differ by {diff.item()} after the same training")
    if args.rank == 0:
        print(f"ok: {args.ranks} ranks, {args.repeat} run(s): the same global parameters on every rank, "
              f"{expected_syncs} syncs in one quorum, bytes as counted, the default group works afterwards", flush=True)
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--sync-every", type=int, default=5)
    p.add_argument("--steps-per-epoch", type=int, default=10)
    p.add_argument("--repeat", type=int, default=1, help="runs in the same processes (teardown check)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--no-compare", action="store_true", help="skip the run with pyparallel's DiLoCo")
    p.add_argument("--bucketize", action="store_true", help="torchft's use_bucketization (one flat all-reduce)")
    p.add_argument("--link-gbit", type=float, default=None,
                   help="one network namespace per rank with links of this many Gbit/s (root)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--master", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.worker:
        return _check(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from launch import launch

    return launch(__file__, argv, args.ranks, args.link_gbit, timeout_s=300)


if __name__ == "__main__":
    raise SystemExit(main())
