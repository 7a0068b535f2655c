"""CUDA IPC all-reduce benchmark: latency of small messages and bandwidth of large ones, against the
device's own copy bandwidth measured in the same run, with Gloo on the same CUDA tensors as a baseline.

    python benchmarks/gpu_allreduce.py -n 2                 # 2 processes (on one GPU when there is one)
    python benchmarks/gpu_allreduce.py -n 4 --json out.json

Rank r uses cuda:(r mod device count): on a one-GPU machine every process shares it (time-sliced by the
driver unless MPS runs: then they run side by side). NCCL cannot run two ranks on one GPU, so the
baseline is Gloo's all-reduce of the same CUDA tensors (it stages them through host memory).

Latency (8 B .. 32 KiB fp32, factor 2): the median over rounds of the wall time per call (calls back to
back; the IPC all-reduce returns once its kernel finished, so this is the whole latency), the slowest
rank's.

Bandwidth (1 .. 64 MiB fp32, and 64 MiB bf16): time per call as above; algbw = size / time; "%copy"
counts the bytes the IPC kernels must move in device memory, summed over the processes that share a
device (Note [CUDA IPC all-reduce]; benchmarks/NOTES-gpu.md):
    one-shot (<= 256 KiB): (n + 3) S per rank (copy in: read S, write S; read n staged copies; write S)
    two-shot:              (5 + 1/n) S per rank (copy in 2S; reduce-scatter reads S, writes S/n;
                           all-gather reads S, writes S)
over the time, as a fraction of the copy bandwidth (a 64 MiB device-to-device copy: read + write over its
time, rank 0 alone on the device); "%floor" counts only 2S per rank (read the tensor, write the result),
the least any in-place all-reduce moves. ``#wrong``: elements of the first call that differ bitwise from
pyparallel.reference.shm_all_reduce; any wrong result exits non-zero.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pyparallel  # noqa: E402
from pyparallel import reference as ref  # noqa: E402

LATENCY_BYTES = [8 << i for i in range(13)]  # 8 B .. 32 KiB
BANDWIDTH_BYTES = [1 << 20, 4 << 20, 16 << 20, 64 << 20]
ONE_SHOT_BYTES = 256 << 10  # kIpcOneShotBytes


def inputs(numel: int, dtype: torch.dtype, world: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(numel, generator=g) * (r + 1)).to(dtype) for r in range(world)]


def kernel_bytes(size: int, n: int) -> float:
    per_rank = (n + 3) * size if size <= ONE_SHOT_BYTES else (5 + 1 / n) * size
    return per_rank


def slowest(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_calls(fn, iters: int, rounds: int, reset=None) -> float:
    """Median over rounds of the seconds per call, all ranks starting each round together."""
    per_call = []
    for _ in range(rounds):
        if reset is not None:
            reset()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - t0) / iters)
    return slowest(statistics.median(per_call))


def copy_gbps(dev: torch.device) -> float:
    src = torch.empty(64 << 18, device=dev)  # 64 MiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def worker(rank: int, args, init_file: str) -> None:
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    n = args.ranks
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=args.timeout))
    say = print if rank == 0 else (lambda *a, **k: None)
    # The device's copy bandwidth, with rank 0 alone on it (the others wait at the barrier).
    gbps = copy_gbps(dev) if rank == 0 else 0.0
    dist.barrier()
    t = torch.tensor([gbps])
    dist.broadcast(t, 0)
    gbps = float(t.item())
    machine = torch.cuda.get_device_name(dev)
    say(f"# pyparallel CUDA IPC all-reduce: {n} processes on {torch.cuda.device_count()} x {machine}; "
        f"torch {torch.__version__}; copy {gbps:.0f} GB/s (64 MiB, read + write)", flush=True)
    wrong = 0

    def run_case(size: int, dtype: torch.dtype, iters: int, rounds: int, gloo_iters: int):
        nonlocal wrong
        numel = size // torch.empty((), dtype=dtype).element_size()
        xs = inputs(numel, dtype, n, seed=size)
        x = xs[rank].to(dev)
        t = x.clone()
        pyparallel.all_reduce(t, transport="ipc")  # first call: checked (and sets the communicator up)
        bad = int((t.cpu().view(-1) != ref.shm_all_reduce(xs).view(-1)).sum())
        wrong += int(slowest(bad))
        # Sums grow without bound over many calls (inf is fine for timing, but keep the inputs sane).
        ipc = time_calls(lambda: pyparallel.all_reduce(t, transport="ipc"), iters, rounds, reset=lambda: t.copy_(x))
        gloo = None
        if gloo_iters:
            g = x.clone()
            gloo = time_calls(lambda: dist.all_reduce(g), gloo_iters, max(1, rounds // 2), reset=lambda: g.copy_(x))
        return ipc, gloo

    latency = []
    say(f"{'bytes':>9} {'ipc us':>9} {'gloo us':>9}", flush=True)
    for size in LATENCY_BYTES:
        ipc, gloo = run_case(size, torch.float32, args.iters, args.rounds, args.iters // 4)
        latency.append(dict(bytes=size, ipc_us=ipc * 1e6, gloo_us=gloo * 1e6 if gloo else None))
        say(f"{size:>9} {ipc * 1e6:>9.1f} {gloo * 1e6:>9.1f}", flush=True)

    bandwidth = []
    say(f"{'bytes':>9} {'dtype':>5} {'ipc ms':>8} {'algbw':>7} {'busbw':>7} {'%copy':>6} {'%floor':>7} {'gloo ms':>8}",
        flush=True)
    cases = [(b, torch.float32) for b in BANDWIDTH_BYTES] + [(64 << 20, torch.bfloat16)]
    for size, dtype in cases:
        ipc, gloo = run_case(size, dtype, max(2, args.iters // 20), max(3, args.rounds // 2), 2)
        sharing = max(1, n // torch.cuda.device_count())  # processes per device
        moved = kernel_bytes(size, n) * sharing
        row = dict(bytes=size, dtype=str(dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16"),
                   ipc_ms=ipc * 1e3, algbw_gbps=size / ipc / 1e9, busbw_gbps=size / ipc / 1e9 * 2 * (n - 1) / n,
                   device_bytes=moved, pct_copy=100 * moved / ipc / 1e9 / gbps,
                   pct_floor=100 * 2 * size * sharing / ipc / 1e9 / gbps, gloo_ms=gloo * 1e3 if gloo else None)
        bandwidth.append(row)
        say(f"{size:>9} {row['dtype']:>5} {row['ipc_ms']:>8.3f} {row['algbw_gbps']:>7.1f} {row['busbw_gbps']:>7.1f} "
            f"{row['pct_copy']:>5.0f}% {row['pct_floor']:>6.0f}% {row['gloo_ms'] or float('nan'):>8.2f}", flush=True)

    if rank == 0:
        result = dict(ranks=n, devices=torch.cuda.device_count(), machine=machine, torch=torch.__version__,
                      copy_gbps=gbps, latency=latency, bandwidth=bandwidth, wrong=wrong,
                      mps=bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")), cmd=" ".join(sys.argv))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        if wrong:
            print(f"# {wrong} elements differ from the reference", file=sys.stderr)
    pyparallel.release()
    dist.destroy_process_group()
    if wrong:
        sys.exit(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("-i", "--iters", type=int, default=50, help="calls per timed round for small messages")
    p.add_argument("-r", "--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--timeout", type=float, default=120, help="process-group timeout, seconds")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    init_file = os.path.join(tempfile.mkdtemp(prefix="gpu-allreduce-"), "store")
    try:
        mp.spawn(worker, args=(args, init_file), nprocs=args.ranks, join=True)
    except mp.ProcessRaisedException as e:
        print(e, file=sys.stderr)
        return 1
    except mp.ProcessExitedException as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
