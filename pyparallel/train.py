"""Data-parallel training with a chosen algorithm and communication: synchronous data parallel with a
communication hook (``--algo ddp``), or LocalSGD / DiLoCo (``--algo localsgd | diloco``).

Tasks (pyparallel/tasks.py, data shipped inside installed packages, nothing downloaded): ``digits``
(scikit-learn's handwritten digits, an MLP) and ``charlm`` (a byte-level transformer, about 2.5M parameters,
on the Python standard library's own source files). Launch with torchrun, or let the script start its own
ranks on this machine:

    torchrun --nproc_per_node 2 -m pyparallel.train --hook int8 --epochs 20
    python -m pyparallel.train --nproc 2 --hook topk --ratio 0.01 --ddp torch
    python -m pyparallel.train --nproc 2 --checkpoint ckpt --epochs 10      # then --resume ckpt --epochs 20
    python -m pyparallel.train --nproc 2 --task charlm --algo diloco --sync-every 50 --compression int8 --overlap
    python -m pyparallel.train --nproc 2 --task charlm --algo localsgd --sync-every 10 --transport ring
    torchrun --nproc_per_node 2 --max-restarts 2 -m pyparallel.train --checkpoint-dir ckpt --checkpoint-every 50
    python -m pyparallel.train --fault-tolerant --replicas 3 --hook int8    # torchft: survives dead replicas
    python -m pyparallel.train --fault-tolerant --replicas 3 --algo diloco --sync-every 20 --compression int8

Rank 0 shows a progress bar and ends with a summary: held-out loss and accuracy, samples/s, bytes sent per
step. LocalSGD / DiLoCo evaluate the consensus model (the last synchronised anchor) after every epoch and,
at the end, synchronise what is left (``finish()``) before the final evaluation.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

from . import checkpoint, consistency, hooks, reducer, tasks, train_fault_tolerant
from .comm import Int8, Topk
from .data_parallel import DataParallel
from .local_sgd import DiLoCo, LocalSGD, outer_sgd
from .tasks import load_digits_split, make_model  # noqa: F401  (re-exported: tests and benchmarks use them)
from .transport import TRANSPORTS

ALGOS = ("ddp", "localsgd", "diloco")

HOOKS = {
    # torch DDP's own all-reduce (Gloo / NCCL), no hook: the baseline users start from (--ddp torch only).
    "builtin": (None, lambda a: None),
    "allreduce": (hooks.allreduce_hook, lambda a: hooks.HookState(transport=a.transport)),
    "fp16": (hooks.fp16_hook, lambda a: hooks.HookState(transport=a.transport)),
    "bf16": (hooks.bf16_hook, lambda a: hooks.HookState(transport=a.transport)),
    "int8": (hooks.int8_hook, lambda a: hooks.Int8State(block_size=a.block_size, transport=a.transport)),
    "topk": (hooks.topk_hook,
             lambda a: hooks.TopkState(ratio=a.ratio, warmup_steps=a.warmup_steps, transport=a.transport)),
    "powersgd": (hooks.powersgd_hook,
                 lambda a: hooks.PowerSGDState(matrix_approximation_rank=a.powersgd_rank,
                                               start_powerSGD_iter=a.powersgd_start_iter, random_seed=a.seed,
                                               transport=a.transport)),
    # torch's own PowerSGD, for comparison (Gloo all-reduce; no byte count, no checkpoint of its state).
    # On Gloo it deadlocks with more than one bucket: keep the model within one bucket.
    "torch-powersgd": (powerSGD_hook.powerSGD_hook,
                       lambda a: powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=a.powersgd_rank,
                                                             start_powerSGD_iter=a.powersgd_start_iter,
                                                             random_seed=a.seed)),
}


def _checked(kind: str, ok, convert):
    """An argparse ``type`` that converts and checks a value; argparse turns the error into a usage error
    naming the option."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text}")
        return value

    parse.__name__ = kind  # argparse names the type in some messages
    return parse


positive_int = _checked("a positive int", lambda v: v >= 1, int)
non_negative_int = _checked("a non-negative int", lambda v: v >= 0, int)
positive_float = _checked("a finite positive number", lambda v: math.isfinite(v) and v > 0, float)
fraction = _checked("in (0, 1]", lambda v: 0 < v <= 1, float)
# Outer momentum: torch's SGD refuses a negative one only once DiLoCo builds it, and nan or >= 1 trained on
# silently to a nan or diverging model.
momentum = _checked("a number in [0, 1)", lambda v: 0 <= v < 1, float)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tasks.TASKS, default="digits")
    p.add_argument("--algo", choices=ALGOS, default="ddp",
                   help="ddp: gradients averaged every step through --hook; localsgd / diloco: H local steps, then "
                        "parameter averaging / an outer optimizer on the averaged pseudo-gradient")
    p.add_argument("--hook", choices=sorted(HOOKS), default="int8", help="ddp: the communication hook")
    p.add_argument("--ddp", choices=["pyparallel", "torch"], default="pyparallel",
                   help="pyparallel.DataParallel or torch's DistributedDataParallel (same hooks)")
    p.add_argument("--epochs", type=positive_int, default=None, help="default: digits 20, charlm 4")
    p.add_argument("--batch-size", type=positive_int, default=None, help="per rank; default: digits 32, charlm 16")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="inner learning rate; default: digits 0.05 (SGD, momentum 0.9), charlm 1e-3 (AdamW)")
    p.add_argument("--hidden", type=positive_int, default=256, help="digits: hidden units")
    p.add_argument("--layers", type=non_negative_int, default=2, help="digits: hidden layers")
    p.add_argument("--context", type=positive_int, default=64, help="charlm: bytes per window")
    p.add_argument("--d-model", type=positive_int, default=256, help="charlm: width")
    p.add_argument("--n-layers", type=positive_int, default=3, help="charlm: transformer blocks")
    p.add_argument("--n-heads", type=positive_int, default=4, help="charlm: attention heads")
    p.add_argument("--steps-per-epoch", type=positive_int, default=50, help="charlm: steps between evaluations")
    p.add_argument("--val-windows", type=positive_int, default=256, help="charlm: held-out windows evaluated")
    p.add_argument("--sync-every", type=positive_int, default=20, help="localsgd / diloco: inner steps H between syncs")
    p.add_argument("--outer-lr", type=positive_float, default=0.7, help="diloco: outer SGD learning rate")
    p.add_argument("--outer-momentum", type=momentum, default=0.9, help="diloco: outer momentum (Nesterov when > 0)")
    p.add_argument("--compression", choices=["none", "int8", "topk"], default="none",
                   help="localsgd / diloco: compression of the periodic all-reduce (--block-size, --ratio)")
    p.add_argument("--overlap", action="store_true",
                   help="localsgd / diloco: all-reduce in the background, applied one round late")
    p.add_argument("--overlap-steps", type=positive_int, default=None, metavar="TAU",
                   help="with --overlap: apply the result TAU inner steps after its launch (default: --sync-every)")
    p.add_argument("--fragments", type=positive_int, default=1, help="localsgd / diloco: staggered model fragments")
    p.add_argument("--ratio", type=fraction, default=0.01, help="top-k: fraction of each bucket sent")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0, help="top-k hook: dense steps first")
    p.add_argument("--powersgd-rank", type=positive_int, default=2, help="powersgd: matrix approximation rank r")
    p.add_argument("--powersgd-start-iter", type=non_negative_int, default=10,
                   help="powersgd: exact averaging for this many steps first (torch's start_powerSGD_iter)")
    p.add_argument("--block-size", type=positive_int, default=reducer.BLOCK_SIZE, help="int8: elements per quantization block")
    p.add_argument("--transport", choices=list(TRANSPORTS), default="auto",
                   help="auto: shared memory on one host, hierarchical across hosts (the hook's compression "
                        "applies across hosts only); ring: our ring over Gloo/NCCL everywhere")
    p.add_argument("--bucket-cap-mb", type=positive_float, default=reducer.BUCKET_CAP_MB)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save checkpoints in DIR and resume from its newest complete one if there is one (elastic "
                        "restarts: torchrun --max-restarts runs the same command again)")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0, metavar="K",
                   help="checkpoint every K steps (default: at the end of every epoch)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2, help="complete checkpoints kept in the directory")
    p.add_argument("--checkpoint", metavar="DIR", help="save checkpoints in DIR (without resuming from it)")
    p.add_argument("--resume", metavar="DIR", help="continue from DIR's newest complete checkpoint")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many steps in total (benchmarks)")
    p.add_argument("--max-seconds", type=positive_float, default=None,
                   help="stop at the first evaluation after this much training time (rank 0's clock; benchmarks)")
    p.add_argument("--nproc", type=positive_int, default=None, help="start this many local ranks (instead of torchrun)")
    p.add_argument("--timeout", type=positive_float, default=300, metavar="SECONDS",
                   help="process group timeout: a rank that stops answering makes the others fail after this long")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per rank")
    p.add_argument("--json", metavar="PATH", help="rank 0 writes the summary and per-epoch curve here")
    p.add_argument("--no-progress", action="store_true")
    train_fault_tolerant.add_arguments(p)
    return p


def resolve_defaults(args):
    """Fills the options whose default depends on the task (epochs, batch size, learning rate)."""
    for key, value in tasks.get(args.task).defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def periodic_compression(args):
    """--compression as LocalSGD / DiLoCo take it (--block-size for int8, --ratio for top-k)."""
    return {"none": None, "int8": Int8(block_size=args.block_size), "topk": Topk(ratio=args.ratio)}[args.compression]


def build(args, device: torch.device, task=None):
    """(model, wrapped model, hook state, optimizer) as configured by ``args``. With ``--algo localsgd |
    diloco`` the model is not wrapped, the hook state is None and the optimizer is the LocalSGD / DiLoCo
    wrapper around the task's inner optimizer."""
    resolve_defaults(args)
    task = task or tasks.get(args.task)(args)
    model = task.model().to(device)
    if args.algo != "ddp":
        common = dict(compression=periodic_compression(args), transport=args.transport, overlap=args.overlap,
                      fragments=args.fragments, overlap_steps=args.overlap_steps)
        inner = task.optimizer(model.parameters())
        if args.algo == "localsgd":
            optimizer = LocalSGD(model, inner, args.sync_every, **common)
        else:
            optimizer = DiLoCo(model, inner, args.sync_every,
                               outer_optimizer=outer_sgd(args.outer_lr, args.outer_momentum), **common)
        return model, model, None, optimizer
    hook, make_state = HOOKS[args.hook]
    if hook is None and args.ddp != "torch":
        raise ValueError("--hook builtin is torch DDP's own all-reduce: it needs --ddp torch")
    state = make_state(args)
    if isinstance(state, hooks.HookState):  # not torch's PowerSGDState (--hook torch-powersgd)
        state.register_model(model)  # residuals keyed by parameter name, checkpoints portable
    if args.ddp == "torch":
        wrapped = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
        if hook is not None:
            wrapped.register_comm_hook(state, hook)
    else:
        wrapped = DataParallel(model, bucket_cap_mb=args.bucket_cap_mb, comm_hook=hook, hook_state=state)
    optimizer = task.optimizer(model.parameters())
    return model, wrapped, state, optimizer


# ---- checkpoints and elastic restarts (pyparallel.checkpoint) ----

def checkpoint_metadata(args, world: int) -> dict:
    """What a checkpoint must agree on with the run that resumes from it."""
    hook_config = {"int8": {"block_size": args.block_size},
                   "topk": {"ratio": args.ratio, "warmup_steps": args.warmup_steps},
                   "powersgd": {"rank": args.powersgd_rank, "start_iter": args.powersgd_start_iter}}.get(args.hook, {})
    model = ([args.hidden, args.layers] if args.task == "digits" else
             [args.context, args.d_model, args.n_layers, args.n_heads])
    periodic = {"sync_every": args.sync_every, "compression": args.compression, "overlap": args.overlap,
                "fragments": args.fragments, "outer": [args.outer_lr, args.outer_momentum],
                **({"overlap_steps": args.overlap_steps} if args.overlap_steps else {})}
    return {"world_size": world, "algorithm": args.ddp, "algo": args.algo, "task": args.task,
            "hook": args.hook if args.algo == "ddp" else None, "hook_config": hook_config if args.algo == "ddp" else {},
            "periodic": periodic if args.algo != "ddp" else {},
            "seed": args.seed, "batch_size": args.batch_size, "model": model,
            # The optimizer's state_dict carries its lr, so a resumed run would keep the checkpoint's and
            # silently ignore another --lr: refused instead, like another outer lr.
            "lr": args.lr}


def resume_directory(args) -> tuple[str | None, str | None]:
    """(directory, option): where this run resumes from, and the option that named it (--resume, or
    --checkpoint-dir when it holds a complete checkpoint), or (None, None) for a fresh start."""
    if args.resume is not None:
        return args.resume, "--resume"
    if args.checkpoint_dir and checkpoint.latest(args.checkpoint_dir) is not None:
        return args.checkpoint_dir, "--checkpoint-dir"
    return None, None


def _resume(args, rank: int, world: int, model, optimizer, state) -> int:
    """Loads the checkpoint to resume from, if any; returns the step to continue at (0: from scratch).

    Every rank loads its own file, then the ranks compare outcomes (one small all-gather) and raise the same
    error together: a rank whose file is missing or damaged used to fail alone while the others trained on
    into their first collective and waited there, and ranks that see different newest checkpoints (a
    directory not shared between hosts) would have resumed from different steps. The directories this run
    will write to are checked here too, before training rather than at the first save."""
    directory, step = None, 0
    try:
        directory, _ = resume_directory(args)
        if args.checkpoint_dir or args.checkpoint:  # (every rank writes there; rank 0 alone the summary)
            checkpoint.check_writable(args.checkpoint_dir or args.checkpoint)
        if args.json and rank == 0:
            checkpoint.check_writable(os.path.dirname(os.path.abspath(args.json)), "--json: directory", create=False)
        if directory is not None:
            step, ckpt = checkpoint.load(directory, rank, checkpoint_metadata(args, world))
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if state is not None:  # LocalSGD / DiLoCo keep theirs in the optimizer's state
                state.load_state_dict(ckpt["hook"])
        outcome = step
    except Exception as exc:  # noqa: BLE001  (sent to the other ranks, then raised here)
        outcome = exc
    consistency.check_same(outcome, None, f"pyparallel.train: the step to resume from (checkpoints in {directory})"
                           if directory else "pyparallel.train: preparing the output directories")
    return step


def _save(args, rank: int, world: int, step: int, model, optimizer, state) -> None:
    checkpoint.save(args.checkpoint_dir or args.checkpoint, step, rank,
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "hook": state.state_dict() if state is not None else None},
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


def check_run(args, world: int, resume_step: int | None = None, task=None, resume_option: str = "--resume") -> None:
    """Raises ValueError for a configuration that cannot train (argparse has checked each value alone):
    a batch larger than a rank's share of the data, a checkpoint (``resume_step``, found through
    ``resume_option``) already at the last epoch or at --max-steps, or checkpoints of a hook state that
    cannot be saved."""
    resolve_defaults(args)
    task = task or tasks.get(args.task)(args)
    if task.steps_per_epoch(world) < 1:
        n_train = len(task.x_train)
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {n_train // world} training samples of "
                         f"each of the {world} ranks")
    if (args.checkpoint_dir or args.checkpoint or args.resume) and args.algo == "ddp" and args.hook == "torch-powersgd":
        # Found otherwise at the first save, after a whole epoch (AttributeError: no state_dict).
        raise ValueError("--hook torch-powersgd cannot be checkpointed (torch's PowerSGDState has no state_dict): "
                         "use --hook powersgd, pyparallel's, whose state is saved and resumed bitwise")
    steps_per_epoch = task.steps_per_epoch(world)
    # Nothing to train would end without an evaluation (the summary crashed on it, --checkpoint-dir) or
    # train one step past --max-steps: refused, whichever option found the checkpoint.
    if resume_step is not None and resume_step >= args.epochs * steps_per_epoch:
        raise ValueError(f"{resume_option}: the checkpoint is at step {resume_step} (epoch {resume_step // steps_per_epoch} "
                         f"of {args.epochs}): nothing left to train (raise --epochs)")
    if resume_step is not None and args.max_steps is not None and resume_step >= args.max_steps:
        raise ValueError(f"{resume_option}: the checkpoint is at step {resume_step}, --max-steps is {args.max_steps}: "
                         "nothing left to train (raise --max-steps)")


def _bytes_sent(state, optimizer) -> int | None:
    """Bytes this rank has sent so far, or None where nothing counts them (torch's own all-reduce and
    PowerSGD)."""
    if state is None:
        return getattr(optimizer, "bytes_sent", None)  # LocalSGD / DiLoCo count theirs; a torch optimizer does not
    return getattr(state, "bytes_sent", None)


def run(args, wire_bytes=None) -> dict:
    """Trains in an initialized process group; returns rank-local results (rank 0's are the summary).
    ``wire_bytes``: optional zero-argument callable (benchmarks: a network interface's byte counter)
    whose value is recorded with every evaluation."""
    resolve_defaults(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu")
    task = tasks.get(args.task)(args)
    model, wrapped, state, optimizer = build(args, device, task)
    step = resumed_from = _resume(args, rank, world, model, optimizer, state)
    source = resume_directory(args)[1]
    check_run(args, world, step if source else None, task, source or "--resume")
    periodic = args.algo != "ddp"
    # LocalSGD / DiLoCo: evaluate the consensus model (the anchor) in a copy, without disturbing training.
    eval_model = copy.deepcopy(model) if periodic else model
    steps_per_epoch = task.steps_per_epoch(world)
    start_epoch, first_step = divmod(step, steps_per_epoch)
    saving = args.checkpoint_dir or args.checkpoint
    curve, samples, elapsed, steps_at_start = [], 0, 0.0, step
    bytes_at_start = _bytes_sent(state, optimizer)
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        what = args.hook if args.algo == "ddp" else args.algo
        progress = tqdm(total=max(0, args.epochs * steps_per_epoch - step), desc=f"{what}/{args.task}",
                        unit="step", file=sys.stderr)

    def evaluate_now() -> dict:
        if periodic:
            optimizer.load_global_parameters(eval_model)
        return task.evaluate(eval_model, device)

    loss = None
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.perf_counter()
        batches = task.epoch_batches(epoch, rank, world)
        for xb, yb in itertools.islice(batches, first_step if epoch == start_epoch else 0, None):
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = tasks.loss_fn(wrapped(xb), yb)
            _kill_if_asked(args, step, rank)
            loss.backward()
            optimizer.step()
            step += 1
            if saving and args.checkpoint_every and step % args.checkpoint_every == 0:
                _save(args, rank, world, step, model, optimizer, state)
            samples += len(xb) * world
            if progress is not None:
                progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)
                progress.update()
            if args.max_steps is not None and step >= args.max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        held_out = evaluate_now()
        curve.append({"epoch": epoch, "step": step, "loss": loss.item() if loss is not None else None,
                      "val_loss": held_out["loss"], "test_accuracy": held_out["accuracy"], "seconds": elapsed,
                      "bytes_sent": _bytes_sent(state, optimizer),
                      "wire_bytes": wire_bytes() if wire_bytes else None})
        if saving and not args.checkpoint_every:
            _save(args, rank, world, step, model, optimizer, state)
        if args.max_steps is not None and step >= args.max_steps:
            break
        if args.max_seconds is not None and out_of_time(elapsed, args.max_seconds):
            break
    if progress is not None:
        progress.close()
    final = curve[-1] if curve else None
    if periodic:  # synchronise the steps since the last sync and what is in flight: one model everywhere
        t0 = time.perf_counter()
        optimizer.finish()
        elapsed += time.perf_counter() - t0
        held_out = evaluate_now()
        final = {"val_loss": held_out["loss"], "test_accuracy": held_out["accuracy"]}
    steps_run = step - steps_at_start
    return {
        "task": args.task, "algo": args.algo, "hook": args.hook, "ddp": args.ddp, "world_size": world,
        "epochs": args.epochs, "steps": step, "sync_every": args.sync_every if periodic else 1,
        "compression": args.compression if periodic else args.hook, "overlap": bool(args.overlap and periodic),
        "resumed_from_step": resumed_from,
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_loss": final["val_loss"] if final else None,
        "test_accuracy": final["test_accuracy"] if final else None,
        "samples_per_s": samples / elapsed if elapsed else None,
        "seconds_per_step": elapsed / steps_run if steps_run else None,
        "seconds": elapsed,
        "bytes_sent_per_step": (_bytes_sent(state, optimizer) - bytes_at_start) / steps_run
        if steps_run and bytes_at_start is not None else None,
        "curve": curve,
        "parameter_digest": parameter_digest(model),
        "final_parameters": [p.detach().cpu().clone() for p in model.parameters()],
    }


def out_of_time(elapsed: float, limit: float) -> bool:
    """Whether rank 0 has trained ``limit`` seconds. Rank 0 decides and tells the others, so every rank
    stops at the same evaluation even where clocks, or the limits the ranks were given, differ."""
    stop = torch.tensor([elapsed >= limit], dtype=torch.uint8)
    dist.broadcast(stop, 0)
    return bool(stop.item())


def describe(result: dict) -> str:
    """One line naming the algorithm and its communication."""
    if result["algo"] == "ddp":
        return f"{result['hook']} hook, {result['ddp']} data parallel"
    extra = "".join([f", {result['compression']}" if result["compression"] != "none" else "",
                     ", overlap" if result["overlap"] else ""])
    return f"{result['algo']} (H={result['sync_every']}{extra})"


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Accuracy of ``model`` on (x, y) (the fault-tolerant trainer's digits evaluation)."""
    model.eval()
    return (model(x.to(device)).argmax(dim=1).cpu() == y).float().mean().item()


def summary(result: dict) -> str:
    fp32 = 2 * (result["world_size"] - 1) / result["world_size"] * 4 * result["parameters"]
    sent = result["bytes_sent_per_step"]
    share = f" ({100 * sent / fp32:.1f}% of an fp32 ring all-reduce)" if fp32 and sent is not None else ""
    loss, accuracy = result["val_loss"], 100 * result["test_accuracy"]
    quality = (f"  test accuracy      {accuracy:.2f}% (loss {loss:.4f})" if result["task"] == "digits" else
               f"  validation loss    {loss:.4f} (next-byte accuracy {accuracy:.1f}%)")
    return (f"pyparallel.train: {result['task']}, {describe(result)}, {result['world_size']} ranks, "
            f"{result['parameters']:,} parameters, {result['steps']} steps\n"
            f"{quality}\n"
            f"  throughput         {result['samples_per_s']:.0f} samples/s "
            f"({1e3 * result['seconds_per_step']:.1f} ms/step)\n"
            + (f"  bytes sent / step  {sent:,.0f} per rank{share}" if sent is not None
               else "  bytes sent / step  not counted by this hook's state"))


def _die_with_launcher() -> None:
    """Linux: this rank gets SIGKILL when the --nproc launcher dies (even by SIGKILL), so no rank trains on
    alone."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(rank: int, world: int, store_addr: tuple[str, int], args) -> None:
    launcher = os.getppid()
    _die_with_launcher()
    if os.getppid() != launcher:  # the launcher died before the line above
        os._exit(1)
    timeout = datetime.timedelta(seconds=args.timeout)
    store = dist.TCPStore(*store_addr, world_size=world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    _main_in_group(args)


def _main_in_group(args) -> None:
    result = run(args)
    if dist.get_rank() == 0:
        print(summary(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({k: v for k, v in result.items() if k != "final_parameters"}, f, indent=2)
    dist.destroy_process_group()


def _relevant(args) -> list[tuple[str, bool, str]]:
    """(dest, whether the option takes effect with ``args``, where it does), in order. An option given where
    it does nothing used to be ignored silently (--steps-per-epoch with digits trained whole epochs,
    --overlap with --algo ddp trained without overlap, --max-restarts without --fault-tolerant is torchrun's
    option put after the module), so main() refuses it, saying where it applies."""
    ddp, periodic, ft = args.algo == "ddp", args.algo != "ddp", args.fault_tolerant
    topk = (ddp and args.hook == "topk") or (periodic and args.compression == "topk")
    int8 = (ddp and args.hook == "int8") or (periodic and args.compression == "int8")
    saving = bool(args.checkpoint_dir or args.checkpoint)
    rules = {  # (in order: the first option that does nothing is named)
        "replicas ranks_per_replica lighthouse min_replicas max_restarts log_dir kill_local_rank":
            (ft, "only with --fault-tolerant; torchrun's own --max-restarts goes before -m pyparallel.train"),
        "checkpoint_dir checkpoint resume nproc max_seconds": (not ft, "ignored with --fault-tolerant, whose "
                                                                       "replicas heal from live peers, without "
                                                                       "checkpoints"),
        "sync_every compression overlap fragments": (periodic, "only with --algo localsgd or diloco"),
        "overlap_steps": (periodic and args.overlap, "only with --overlap"),
        "outer_lr outer_momentum": (args.algo == "diloco", "only with --algo diloco"),
        "hook ddp bucket_cap_mb": (ddp, "only with --algo ddp"),
        "warmup_steps": (ddp and args.hook == "topk", "only with --hook topk"),
        "powersgd_rank powersgd_start_iter": (ddp and args.hook in ("powersgd", "torch-powersgd"),
                                              "only with --hook powersgd or torch-powersgd"),
        "ratio": (topk, "only with --hook topk (--algo ddp) or --compression topk"),
        "block_size": (int8, "only with --hook int8 (--algo ddp) or --compression int8"),
        "hidden layers": (args.task == "digits", "only with --task digits"),
        "context d_model n_layers n_heads steps_per_epoch val_windows": (args.task == "charlm", "only with --task charlm"),
        "checkpoint_every keep_checkpoints": (saving, "only with --checkpoint-dir or --checkpoint"),
        "checkpoint": (not args.checkpoint_dir, "ignored with --checkpoint-dir, where checkpoints go"),
    }
    return [(dest, applies, needs) for dests, (applies, needs) in rules.items() for dest in dests.split()]


def check_options_apply(p: argparse.ArgumentParser, args, argv) -> None:
    """Exits with a usage error naming the first option given on the command line that does nothing with
    the others (see :func:`_relevant`); options left at their defaults are not checked."""
    unset, marker = parser(), object()  # the same options, every default a marker: the others were given
    unset.set_defaults(**dict.fromkeys(vars(args), marker))
    given = {dest for dest, value in vars(unset.parse_args(argv)).items() if value is not marker}
    for dest, applies, needs in _relevant(args):
        if dest in given and not applies:
            p.error(f"--{dest.replace('_', '-')} has no effect here ({needs})")


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    check_options_apply(p, args, argv)
    if args.fault_tolerant:  # before the thread count below divides by --replicas
        train_fault_tolerant.check_arguments(args)
    if args.threads is None:  # ranks share the machine's cores
        world = (args.replicas * args.ranks_per_replica if args.fault_tolerant else
                 args.nproc or int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        args.threads = max(1, (os.cpu_count() or 1) // world)
    if args.fault_tolerant:
        if args.task != "digits":
            p.error("--fault-tolerant trains the digits task for now")
        resolve_defaults(args)
        train_fault_tolerant.main(args)
        return
    if args.nproc:
        # Checked here, before any rank starts (under torchrun every rank checks the same in run()).
        resume_step = None
        directory, source = resume_directory(args)
        if directory is not None:
            resume_step = checkpoint.latest(directory) if os.path.isdir(directory) else None
            if resume_step is None:
                p.error(f"--resume: no complete checkpoint in {args.resume}")
        try:
            check_run(args, args.nproc, resume_step, resume_option=source or "--resume")
        except ValueError as exc:
            p.error(str(exc))
        import torch.multiprocessing as mp

        # The ranks meet at a TCPStore this process serves on a port the kernel picks: no file or directory
        # to leave behind if the launcher is killed, and no port race.
        store = dist.TCPStore("127.0.0.1", 0, world_size=args.nproc, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=args.timeout))
        mp.spawn(_worker, args=(args.nproc, ("127.0.0.1", store.port), args), nprocs=args.nproc)
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
