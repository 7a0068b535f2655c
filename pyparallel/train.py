"""Data-parallel training of a small classifier with a chosen communication hook.

The data set is scikit-learn's bundled handwritten digits (1797 8x8 images, shipped inside the package:
nothing is downloaded). Launch with torchrun, or let the script start its own ranks on this machine:

    torchrun --nproc_per_node 2 -m pyparallel.train --hook int8 --epochs 20
    python -m pyparallel.train --nproc 2 --hook topk --ratio 0.01 --ddp torch
    python -m pyparallel.train --nproc 2 --checkpoint ckpt --epochs 10      # then --resume ckpt --epochs 20

Rank 0 shows a progress bar and ends with a summary: test accuracy, samples/s, bytes sent per step.
"""

from __future__ import annotations

import argparse
import datetime
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

from . import hooks, reducer
from .data_parallel import DataParallel
from .transport import TRANSPORTS

HOOKS = {
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


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): features scaled to [0, 1], a fixed shuffled split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", choices=sorted(HOOKS), default="int8")
    p.add_argument("--ddp", choices=["pyparallel", "torch"], default="pyparallel",
                   help="pyparallel.DataParallel or torch's DistributedDataParallel (same hooks)")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--batch-size", type=positive_int, default=32, help="per rank")
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--layers", type=non_negative_int, default=2, help="hidden layers")
    p.add_argument("--ratio", type=fraction, default=0.01, help="top-k: fraction of each bucket sent")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0, help="top-k: dense steps first")
    p.add_argument("--powersgd-rank", type=positive_int, default=2, help="powersgd: matrix approximation rank r")
    p.add_argument("--powersgd-start-iter", type=non_negative_int, default=10,
                   help="powersgd: exact averaging for this many steps first (torch's start_powerSGD_iter)")
    p.add_argument("--block-size", type=positive_int, default=reducer.BLOCK_SIZE, help="int8: elements per quantization block")
    p.add_argument("--transport", choices=list(TRANSPORTS), default="auto",
                   help="auto: shared memory on one host, hierarchical across hosts (the hook's compression "
                        "applies across hosts only); ring: our ring over Gloo/NCCL everywhere")
    p.add_argument("--bucket-cap-mb", type=positive_float, default=reducer.BUCKET_CAP_MB)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="PREFIX", help="save PREFIX.rank<r>.pt at the end of every epoch")
    p.add_argument("--resume", metavar="PREFIX", help="continue from PREFIX.rank<r>.pt")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many steps in total (benchmarks)")
    p.add_argument("--nproc", type=positive_int, default=None, help="start this many local ranks (instead of torchrun)")
    p.add_argument("--timeout", type=positive_float, default=300, metavar="SECONDS",
                   help="process group timeout: a rank that stops answering makes the others fail after this long")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per rank")
    p.add_argument("--json", metavar="PATH", help="rank 0 writes the summary and per-epoch curve here")
    p.add_argument("--no-progress", action="store_true")
    return p


def build(args, device: torch.device):
    """(model, wrapped model, hook state, optimizer) as configured by ``args``."""
    model = make_model(args.hidden, args.layers, args.seed).to(device)
    hook, make_state = HOOKS[args.hook]
    state = make_state(args).register_model(model)  # residuals keyed by parameter name, checkpoints portable
    if args.ddp == "torch":
        wrapped = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
        wrapped.register_comm_hook(state, hook)
    else:
        wrapped = DataParallel(model, bucket_cap_mb=args.bucket_cap_mb, comm_hook=hook, hook_state=state)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return model, wrapped, state, optimizer


def _ckpt_path(prefix: str, rank: int) -> str:
    return f"{prefix}.rank{rank}.pt"


def check_run(args, world: int, resume_epoch: int | None = None) -> None:
    """Raises ValueError for a configuration that cannot train (argparse has checked each value alone):
    a batch larger than a rank's share of the data, or a checkpoint already at the last epoch."""
    n_train = len(load_digits_split(args.seed)[0])
    if args.batch_size * world > n_train:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {n_train // world} training samples of "
                         f"each of the {world} ranks")
    if resume_epoch is not None and resume_epoch >= args.epochs:
        raise ValueError(f"--resume: the checkpoint is at epoch {resume_epoch} of {args.epochs}: nothing left to "
                         "train (raise --epochs)")


def run(args) -> dict:
    """Trains in an initialized process group; returns rank-local results (rank 0's are the summary)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu")
    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    ckpt = torch.load(_ckpt_path(args.resume, rank), weights_only=False) if args.resume else None
    check_run(args, world, ckpt["epoch"] if ckpt else None)
    model, wrapped, state, optimizer = build(args, device)
    if (args.checkpoint or args.resume) and not hasattr(state, "state_dict"):
        raise ValueError(f"pyparallel.train: --hook {args.hook} keeps no checkpointable state; "
                         "--checkpoint/--resume need one of pyparallel's hooks")
    start_epoch, step = 0, 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state.load_state_dict(ckpt["hook"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]

    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = len(x_train) // (args.batch_size * world)
    counts_bytes = hasattr(state, "bytes_sent")  # torch's PowerSGD state does not count
    curve, samples, elapsed, steps_at_start = [], 0, 0.0, step
    bytes_at_start = state.bytes_sent if counts_bytes else 0
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=(args.epochs - start_epoch) * steps_per_epoch, desc=f"{args.hook}/{args.ddp}",
                        unit="step", file=sys.stderr)
    for epoch in range(start_epoch, args.epochs):
        # The same permutation on every rank, a disjoint shard per rank; a function of (seed, epoch) only,
        # so a resumed run sees exactly the batches an uninterrupted one would.
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        shard = perm[rank::world]
        model.train()
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = shard[s * args.batch_size:(s + 1) * args.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(wrapped(xb), yb)
            loss.backward()
            optimizer.step()
            step += 1
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
        if args.checkpoint:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": state.state_dict(),
                        "epoch": epoch + 1, "step": step}, _ckpt_path(args.checkpoint, rank))
        if args.max_steps is not None and step >= args.max_steps:
            break
    if progress is not None:
        progress.close()
    steps_run = step - steps_at_start
    return {
        "hook": args.hook, "ddp": args.ddp, "world_size": world, "epochs": args.epochs, "steps": step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy": curve[-1]["test_accuracy"] if curve else None,
        "samples_per_s": samples / elapsed if elapsed else None,
        "seconds_per_step": elapsed / steps_run if steps_run else None,
        "bytes_sent_per_step": (state.bytes_sent - bytes_at_start) / steps_run if steps_run and counts_bytes else None,
        "curve": curve,
        "final_parameters": [p.detach().cpu().clone() for p in model.parameters()],
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    return (model(x.to(device)).argmax(dim=1).cpu() == y).float().mean().item()


def summary(result: dict) -> str:
    fp32 = 2 * (result["world_size"] - 1) / result["world_size"] * 4 * result["parameters"]
    sent = result["bytes_sent_per_step"]
    return (f"pyparallel.train: {result['hook']} hook, {result['ddp']} data parallel, {result['world_size']} ranks, "
            f"{result['parameters']:,} parameters, {result['steps']} steps\n"
            f"  test accuracy      {100 * result['test_accuracy']:.2f}%\n"
            f"  throughput         {result['samples_per_s']:.0f} samples/s ({1e3 * result['seconds_per_step']:.1f} ms/step)\n"
            + (f"  bytes sent / step  {sent:,.0f} per rank"
               + (f" ({100 * sent / fp32:.1f}% of an fp32 ring all-reduce)" if fp32 else "")
               if sent is not None else "  bytes sent / step  not counted by this hook's state"))


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


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.threads is None:  # ranks share the machine's cores
        world = args.nproc or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.threads = max(1, (os.cpu_count() or 1) // world)
    if args.nproc:
        # Checked here, before any rank starts (under torchrun every rank checks the same in run()).
        resume_epoch = None
        if args.resume:
            path = _ckpt_path(args.resume, 0)
            if not os.path.exists(path):
                p.error(f"--resume: no checkpoint {path}")
            resume_epoch = torch.load(path, weights_only=False)["epoch"]
        try:
            check_run(args, args.nproc, resume_epoch)
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
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    _main_in_group(args)


if __name__ == "__main__":
    main()
