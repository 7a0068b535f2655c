"""Data-parallel training of a small classifier with a chosen communication hook.

The data set is scikit-learn's bundled handwritten digits (1797 8x8 images, shipped inside the package:
nothing is downloaded). Launch with torchrun, or let the script start its own ranks on this machine:

    torchrun --nproc_per_node 2 -m pyparallel.train --hook int8 --epochs 20
    python -m pyparallel.train --nproc 2 --hook topk --ratio 0.01 --ddp torch
    python -m pyparallel.train --nproc 2 --checkpoint ckpt --epochs 10      # then --resume ckpt --epochs 20
    torchrun --nproc_per_node 2 --max-restarts 2 -m pyparallel.train --checkpoint-dir ckpt --checkpoint-every 50
    python -m pyparallel.train --fault-tolerant --replicas 3 --hook int8    # torchft: survives dead replicas

Rank 0 shows a progress bar and ends with a summary: test accuracy, samples/s, bytes sent per step.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint, hooks, train_fault_tolerant
from .data_parallel import DataParallel
from .transport import TRANSPORTS

HOOKS = {
    "allreduce": (hooks.allreduce_hook, lambda a: hooks.HookState(transport=a.transport)),
    "fp16": (hooks.fp16_hook, lambda a: hooks.HookState(transport=a.transport)),
    "bf16": (hooks.bf16_hook, lambda a: hooks.HookState(transport=a.transport)),
    "int8": (hooks.int8_hook, lambda a: hooks.Int8State(block_size=a.block_size, transport=a.transport)),
    "topk": (hooks.topk_hook,
             lambda a: hooks.TopkState(ratio=a.ratio, warmup_steps=a.warmup_steps, transport=a.transport)),
}


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): features scaled to [0, 1], a fixed shuffled split."""
    import gzip
    import importlib.util

    import numpy as np

    # scikit-learn's load_digits() reads this file; reading it directly skips importing scikit-learn (and
    # SciPy), seconds that every process, and every restarted one, would pay.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pyparallel.train needs scikit-learn, whose package ships the digits data set")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path) as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(data[:, :-1].copy()) / 16.0
    y = torch.from_numpy(data[:, -1].astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(hidden: int, layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    dims = [64] + [hidden] * layers
    body = []
    for a, b in zip(dims[:-1], dims[1:]):
        body += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*body, nn.Linear(dims[-1], 10))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", choices=sorted(HOOKS), default="int8")
    p.add_argument("--ddp", choices=["pyparallel", "torch"], default="pyparallel",
                   help="pyparallel.DataParallel or torch's DistributedDataParallel (same hooks)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="hidden layers")
    p.add_argument("--ratio", type=float, default=0.01, help="top-k: fraction of each bucket sent")
    p.add_argument("--warmup-steps", type=int, default=0, help="top-k: dense steps first")
    p.add_argument("--block-size", type=int, default=256, help="int8: elements per quantization block")
    p.add_argument("--transport", choices=list(TRANSPORTS), default="auto",
                   help="auto: shared memory on one host, hierarchical across hosts (the hook's compression "
                        "applies across hosts only); ring: our ring over Gloo/NCCL everywhere")
    p.add_argument("--bucket-cap-mb", type=float, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save checkpoints in DIR and resume from its newest complete one if there is one (elastic "
                        "restarts: torchrun --max-restarts runs the same command again)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="checkpoint every K steps (default: at the end of every epoch)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept in the directory")
    p.add_argument("--checkpoint", metavar="DIR", help="save checkpoints in DIR (without resuming from it)")
    p.add_argument("--resume", metavar="DIR", help="continue from DIR's newest complete checkpoint")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (benchmarks)")
    p.add_argument("--nproc", type=int, default=None, help="start this many local ranks (instead of torchrun)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    p.add_argument("--json", metavar="PATH", help="rank 0 writes the summary and per-epoch curve here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before a collective with a dead or stopped peer fails (process-group timeout)")
    train_fault_tolerant.add_arguments(p)
    return p


def build(args, device: torch.device):
    """(model, wrapped model, hook state, optimizer) as configured by ``args``."""
    model = make_model(args.hidden, args.layers, args.seed).to(device)
    hook, make_state = HOOKS[args.hook]
    state = make_state(args)
    if args.ddp == "torch":
        wrapped = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
        wrapped.register_comm_hook(state, hook)
    else:
        wrapped = DataParallel(model, bucket_cap_mb=args.bucket_cap_mb, comm_hook=hook, hook_state=state)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return model, wrapped, state, optimizer


# ---- checkpoints and elastic restarts (pyparallel.checkpoint) ----

def checkpoint_metadata(args, world: int) -> dict:
    """What a checkpoint must agree on with the run that resumes from it."""
    hook_config = {"int8": {"block_size": args.block_size},
                   "topk": {"ratio": args.ratio, "warmup_steps": args.warmup_steps}}.get(args.hook, {})
    return {"world_size": world, "algorithm": args.ddp, "hook": args.hook, "hook_config": hook_config,
            "seed": args.seed, "batch_size": args.batch_size, "model": [args.hidden, args.layers]}


def _resume(args, rank: int, world: int, model, optimizer, state) -> int:
    """Loads the checkpoint to resume from, if any; returns the step to continue at (0: from scratch)."""
    directory = args.resume
    if directory is None and args.checkpoint_dir and checkpoint.latest(args.checkpoint_dir) is not None:
        directory = args.checkpoint_dir
    if directory is None:
        return 0
    step, ckpt = checkpoint.load(directory, rank, checkpoint_metadata(args, world))
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    state.load_state_dict(ckpt["hook"])
    return step


def _save(args, rank: int, world: int, step: int, model, optimizer, state) -> None:
    checkpoint.save(args.checkpoint_dir or args.checkpoint, step, rank,
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": state.state_dict()},
                    checkpoint_metadata(args, world), keep=args.keep_checkpoints)


def _kill_if_asked(args, step: int, rank: int) -> None:
    """Fault injection for elastic-restart tests: SIGKILL rank --kill-rank in step --kill-at-step, in the
    first incarnation only (torchrun counts restarts in TORCHELASTIC_RESTART_COUNT)."""
    if (args.kill_at_step == step and args.kill_replica == rank
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os.kill(os.getpid(), signal.SIGKILL)


def parameter_digest(model: nn.Module) -> str:
    """A short hash of every parameter's bytes: equal digests mean bitwise-equal parameters."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(args) -> dict:
    """Trains in an initialized process group; returns rank-local results (rank 0's are the summary)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu")
    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    model, wrapped, state, optimizer = build(args, device)
    step = resumed_from = _resume(args, rank, world, model, optimizer, state)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = len(x_train) // (args.batch_size * world)
    start_epoch, first_step = divmod(step, steps_per_epoch)
    saving = args.checkpoint_dir or args.checkpoint
    curve, samples, elapsed, bytes_at_start, steps_at_start = [], 0, 0.0, state.bytes_sent, step
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=max(0, args.epochs * steps_per_epoch - step), desc=f"{args.hook}/{args.ddp}",
                        unit="step", file=sys.stderr)
    for epoch in range(start_epoch, args.epochs):
        # The same permutation on every rank, a disjoint shard per rank; a function of (seed, epoch) only,
        # so a resumed run sees exactly the batches an uninterrupted one would.
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        shard = perm[rank::world]
        model.train()
        t0 = time.perf_counter()
        for s in range(first_step if epoch == start_epoch else 0, steps_per_epoch):
            idx = shard[s * args.batch_size:(s + 1) * args.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(wrapped(xb), yb)
            _kill_if_asked(args, step, rank)
            loss.backward()
            optimizer.step()
            step += 1
            if saving and args.checkpoint_every and step % args.checkpoint_every == 0:
                _save(args, rank, world, step, model, optimizer, state)
            samples += len(idx) * world
            if progress is not None:
                progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)
                progress.update()
            if args.max_steps is not None and step >= args.max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        accuracy = evaluate(model, x_test, y_test, device)
        curve.append({"epoch": epoch, "step": step, "loss": loss.item(), "test_accuracy": accuracy,
                      "seconds": elapsed})
        if saving and not args.checkpoint_every:
            _save(args, rank, world, step, model, optimizer, state)
        if args.max_steps is not None and step >= args.max_steps:
            break
    if progress is not None:
        progress.close()
    steps_run = step - steps_at_start
    return {
        "hook": args.hook, "ddp": args.ddp, "world_size": world, "epochs": args.epochs, "steps": step,
        "resumed_from_step": resumed_from,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy": curve[-1]["test_accuracy"] if curve else None,
        "samples_per_s": samples / elapsed if elapsed else None,
        "seconds_per_step": elapsed / steps_run if steps_run else None,
        "bytes_sent_per_step": (state.bytes_sent - bytes_at_start) / steps_run if steps_run else None,
        "curve": curve,
        "parameter_digest": parameter_digest(model),
        "final_parameters": [p.detach().cpu().clone() for p in model.parameters()],
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    return (model(x.to(device)).argmax(dim=1).cpu() == y).float().mean().item()


def summary(result: dict) -> str:
    fp32 = 2 * (result["world_size"] - 1) / result["world_size"] * 4 * result["parameters"]
    sent = result["bytes_sent_per_step"] or 0.0
    return (f"pyparallel.train: {result['hook']} hook, {result['ddp']} data parallel, {result['world_size']} ranks, "
            f"{result['parameters']:,} parameters, {result['steps']} steps\n"
            f"  test accuracy      {100 * result['test_accuracy']:.2f}%\n"
            f"  throughput         {result['samples_per_s']:.0f} samples/s ({1e3 * result['seconds_per_step']:.1f} ms/step)\n"
            f"  bytes sent / step  {sent:,.0f} per rank ({100 * sent / fp32:.1f}% of an fp32 ring all-reduce)")


def _worker(rank: int, world: int, init_file: str, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    _main_in_group(args)


def _main_in_group(args) -> None:
    result = run(args)
    if dist.get_rank() == 0:
        print(summary(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({k: v for k, v in result.items() if k != "final_parameters"}, f, indent=2)
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.threads is None:  # ranks share the machine's cores
        world = args.replicas if args.fault_tolerant else args.nproc or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.threads = max(1, (os.cpu_count() or 1) // world)
    if args.fault_tolerant:
        train_fault_tolerant.main(args)
        return
    if args.nproc:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(args.nproc, os.path.join(tmp, "store"), args), nprocs=args.nproc)
        return
    if "RANK" not in os.environ:
        raise SystemExit("pyparallel.train: launch with torchrun, or pass --nproc N to start N local ranks")
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_from_torchrun(backend, datetime.timedelta(seconds=args.timeout))
    _main_in_group(args)


def init_from_torchrun(backend: str, timeout: datetime.timedelta) -> None:
    """init_process_group from torchrun's environment, with one store namespace per restart.

    torchrun's agent serves one TCPStore for the whole job and keeps it across restarts
    (TORCHELASTIC_USE_AGENT_STORE), so without a namespace of its own a restarted incarnation can read
    its dead predecessor's Gloo addresses and fail to connect ("Connection refused") or hang.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    hosts_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=hosts_store, timeout=timeout, wait_for_workers=False)
    dist.init_process_group(backend, store=dist.PrefixStore(f"pyparallel/restart{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)


if __name__ == "__main__":
    main()
