"""All-reduce benchmark in the style of NVIDIA nccl-tests: pyparallel's ring against Gloo, same run.

Rows per size: ``gloo`` (torch.distributed.all_reduce on Gloo), ``ring`` (our fp32 ring), ``int8`` (our
int8-compressed ring) and ``topk`` (1% top-k with error feedback, sparse all-gather). For each, the
time per call of the slowest rank (median of --rounds rounds of --iters back-to-back calls), algbw = size / time (size: the fp32 tensor's bytes, so compressed
variants show their effective bandwidth) and busbw = algbw * 2(n-1)/n. ``#wrong`` counts elements
that fail the check: exact ring order for ``ring`` (bitwise, pyparallel.reference), the fp32
reassociation bound for ``gloo``, the stated error bound for ``int8``, the reference top-k for ``topk``
(up to --check-max elements; above it, agreement across ranks only). Any wrong result exits non-zero.

    python benchmarks/allreduce.py -n 2 -b 1M -e 64M -f 4
    python benchmarks/allreduce.py -n 4 --link-gbit 1 --json out.json   # root: emulated 1 Gbit/s links
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import launch  # noqa: E402

VARIANTS = ("gloo", "ring", "int8", "topk")


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def sizes(args) -> list[int]:
    out, size = [], parse_bytes(args.begin)
    while size <= parse_bytes(args.end):
        out.append(size)
        size *= args.factor
    return out


def inputs(count: int, world: int, seed: int) -> list[torch.Tensor]:
    """Every rank's input, reproducible anywhere, so each rank can compute the references itself."""
    return [torch.randn(count, generator=torch.Generator().manual_seed(seed + r)) for r in range(world)]


def digest(t: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).digest()[:7], "little")


def make_variant(name: str, x: torch.Tensor, ratio: float, verify: bool):
    """Returns (run(t), check(t, xs) -> #wrong) for one variant."""
    import pyparallel
    from pyparallel import reference as ref

    n = dist.get_world_size()
    if name == "gloo":
        def check(t, xs):
            bound = 2 * (n - 1) * 2.0**-24 * sum(v.abs() for v in xs)  # two fp32 orders of n terms
            return int(((t.double() - sum(v.double() for v in xs)).abs() > bound).sum())
        return (lambda t: dist.all_reduce(t)), check
    if name == "ring":
        return (lambda t: pyparallel.all_reduce(t, verify=verify)), (lambda t, xs: int((t != ref.ring_all_reduce(xs)).sum()))
    if name == "int8":
        def check(t, xs):
            err = (t.double() - sum(v.double() for v in xs)).abs()
            return int((err > ref.int8_ring_error_bound(xs) + 1e-6 * err.abs()).sum())
        return (lambda t: pyparallel.all_reduce(t, compression="int8", verify=verify)), check
    residual = torch.zeros_like(x)
    k = max(1, round(x.numel() * ratio))

    def check(t, xs):
        expect = ref.topk_all_reduce(xs, k, [torch.zeros_like(v) for v in xs])
        return int((t != expect).sum())
    return (lambda t: pyparallel.all_reduce(t, compression=pyparallel.Topk(k=k, residual=residual), verify=verify)), check


def worker(args) -> int:
    import pyparallel  # noqa: F401  (after the process group environment is set)

    rank, n = args.rank, args.ranks
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=args.timeout))
    rows, total_wrong = [], 0
    if rank == 0:
        print(f"# {'size':>10} {'count':>10} {'type':>6} {'redop':>5} {'variant':>8} {'time(us)':>11} "
              f"{'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'#wrong':>7}", flush=True)
    for size in sizes(args):
        count = size // 4
        xs = inputs(count, n, args.seed + size)
        runs, wrongs = {}, {}
        for name in args.variants.split(","):
            t = xs[rank].clone()
            run, check = make_variant(name, t, args.ratio, args.verify)
            if name != "gloo":  # the first call always checks that the ranks agree, as the hooks do
                make_variant(name, t, args.ratio, True)[0](t)
            else:
                run(t)
            wrong = check(t, xs) if count <= args.check_max or name in ("gloo", "ring", "int8") else 0
            if name != "gloo":  # our collectives promise the same bits on every rank
                digests = [None] * n
                dist.all_gather_object(digests, digest(t))
                wrong += sum(d != digests[0] for d in digests) * count
            for _ in range(args.warmup):
                run(t)
            runs[name] = (run, t)
            wrongs[name] = wrong
        # As nccl-tests: back-to-back calls, time per call averaged over a round. Rounds of the variants
        # alternate and the median round is reported, so a busy 2-core machine's drift hits all alike.
        times = torch.empty(len(runs), args.rounds, dtype=torch.float64)
        for rnd in range(args.rounds):
            for v, (run, t) in enumerate(runs.values()):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    run(t)
                times[v, rnd] = (time.perf_counter() - t0) / args.iters
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # per round, the slowest rank
        counts = torch.tensor(list(wrongs.values()), dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        for v, name in enumerate(runs):
            seconds, wrong = times[v].median().item(), int(counts[v].item())
            total_wrong += wrong
            algbw = size / seconds / 1e9
            row = dict(size=size, count=count, type="float", redop="sum", variant=name, time_us=seconds * 1e6,
                       algbw=algbw, busbw=algbw * 2 * (n - 1) / n, wrong=wrong)
            rows.append(row)
            if rank == 0:
                print(f"  {size:>10} {count:>10} {'float':>6} {'sum':>5} {name:>8} {row['time_us']:>11.1f} "
                      f"{algbw:>11.3f} {row['busbw']:>11.3f} {wrong:>7}", flush=True)
    if rank == 0:
        by_size = {}
        for row in rows:
            by_size.setdefault(row["size"], {})[row["variant"]] = row["time_us"]
        print("# speedup over gloo (time ratio):")
        for size, times in by_size.items():
            if "gloo" in times:
                print(f"#   {size:>10} B: " + ", ".join(f"{v} {times['gloo'] / t:.2f}x" for v, t in times.items() if v != "gloo"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(ranks=n, link_gbit=args.link_gbit, threads=args.threads, verify=args.verify, rows=rows,
                               wrong=total_wrong, cmd=args.cmd), f, indent=2)
        print(f"# ranks {n}, link {'loopback' if args.link_gbit is None else f'{args.link_gbit} Gbit/s (tbf)'}, "
              f"out of bounds: {total_wrong}")
    dist.destroy_process_group()
    return 1 if total_wrong else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("-b", "--begin", default="1M", help="smallest size in bytes (fp32), e.g. 64K")
    p.add_argument("-e", "--end", default="64M", help="largest size in bytes")
    p.add_argument("-f", "--factor", type=int, default=4, help="size multiplier between rows")
    p.add_argument("-w", "--warmup", type=int, default=2)
    p.add_argument("-i", "--iters", type=int, default=5, help="calls per timed round")
    p.add_argument("-r", "--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--ratio", type=float, default=0.01, help="top-k ratio")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--link-gbit", type=float, default=None, help="emulate links of this many Gbit/s (root)")
    p.add_argument("--check-max", type=int, default=4 << 20, help="largest count checked against the top-k reference")
    p.add_argument("--verify", action="store_true",
                   help="check the ranks' headers on every call (one small all-gather each); by default only the "
                        "first call checks, as the hooks do once per bucket layout")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=600, help="process-group timeout, seconds")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--master", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.worker:
        args.cmd = " ".join(["benchmarks/allreduce.py"] + argv[: argv.index("--worker")])
        return worker(args)
    return launch(__file__, argv, args.ranks, args.link_gbit, timeout_s=args.timeout * 4)


if __name__ == "__main__":
    sys.exit(main())
