"""All-reduce benchmark in the style of NVIDIA nccl-tests: pyparallel's transports against Gloo, same run.

Variants (``--transport`` and ``--compression`` choose among those that apply; ``--variants`` names them):

    gloo                    torch.distributed.all_reduce on Gloo (the baseline)
    ring, ring-int8, ring-topk   pyparallel.all_reduce(transport="ring"), fp32 / int8 / top-k
    shm                     transport="shm": only when all ranks are on one host (exact, never compressed)
    shm-reg                 the same on a tensor from pyparallel.shm_empty: peers read it in place, no
                            staging (Note [Registered buffers], csrc/comm/shm.h)
    hier, hier-int8, hier-topk   transport="hierarchical": only with >= 2 hosts and > 1 rank per host
                            (compression only on the inter-host hop)

Hosts: ``--hosts H`` spreads the ranks evenly over H emulated hosts (launch.py: torchrun's environment
and PYPARALLEL_HOST); with ``--link-gbit G`` each host is a network namespace with one G Gbit/s link
(netns.py). Default: all ranks on one host on loopback, one host per rank with ``--link-gbit``.

Rows per size, as nccl-tests: the time per call (median of ``--rounds`` rounds of ``--iters``
back-to-back calls, a round timed from the first rank's start to the last rank's end; rounds of the
variants interleaved, so a busy machine's drift hits all alike; the tensor is reset to the input before each round, outside the timing, so sums never overflow),
algbw = size / time (size: the fp32 tensor's bytes, so compressed variants show their effective
bandwidth), busbw = algbw * 2(n-1)/n, ``vs gloo`` = Gloo's time / this time, and ``%bound``:

* ``mem`` (shm): the time of one memcpy of the tensor, measured in the same run at the same size with
  every rank of the host copying its own tensor at once, over this variant's time. Each rank must at
  least read its N input bytes and write its N output bytes, and a memcpy of N bytes does exactly that
  (its GB/s below count both: 2N / time); so the bound is ``2N`` bytes per rank at the memcpy's rate.
  The shm algorithm itself (Note [Shared-memory collectives], csrc/comm/shm.h) touches more, N*(5-2/L)
  per rank above 64 KiB, but everything beyond the tensor's own read and write goes through its slots
  (1 MiB per rank, two sets), which stay in cache: counted as memory traffic they gave 190-220% of
  "bound" at 16-64 MiB, so they are not counted. A memcpy into another buffer also pays the
  destination's read-for-ownership, which an in-place all-reduce does not, so a little above 100% is
  possible.
* ``link`` (fp32 variants over emulated links, >= 2 hosts): ``2(H-1)/H * size`` (what each host's link
  must carry each way, for any exact algorithm) at G Gbit/s.
* ``n/a`` otherwise (TCP on loopback; compressed variants).

``#wrong`` counts elements that fail the check of the first call: ``ring`` bitwise against the
reference ring (pyparallel.reference); ``gloo``, ``shm`` and ``hier`` within the fp32 reassociation
bound ``2(n-1) * 2^-24 * sum_i |x_i|``; ``ring-int8`` within Int8's bound (pyparallel.comm.Int8) over
n hops; ``hier-int8`` within the same bound over H hops applied to the host sums, with each element's
block absmax taken over the 511-element window around it (the inter-host slices need not start on a
block boundary), plus the fp32 bound for the sums inside the hosts; ``ring-topk`` equal to the
reference top-k (up to ``--check-max`` elements); ``hier-topk``: see check_hier_topk. Every pyparallel
variant must also give the same bits on every rank. Any wrong result exits non-zero.

``--latency``: small messages (8 B .. 64 KiB, factor 2, fp32 variants only unless asked), one table of
the median time per call in microseconds per variant and its ratio to Gloo.

    python benchmarks/allreduce.py -n 2 -b 4M -e 64M
    python benchmarks/allreduce.py -n 4 --latency
    python benchmarks/allreduce.py -n 4 --hosts 2 --link-gbit 1 -b 64M -e 64M --json out.json   # root
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import check_hosts, cpu_model, default_hosts, launch  # noqa: E402

# variant -> (transport passed to pyparallel.all_reduce, compression); gloo is torch.distributed's
VARIANTS = {
    "gloo": (None, None),
    "ring": ("ring", None), "ring-int8": ("ring", "int8"), "ring-topk": ("ring", "topk"),
    "shm": ("shm", None), "shm-reg": ("shm", None),
    "hier": ("hierarchical", None), "hier-int8": ("hierarchical", "int8"), "hier-topk": ("hierarchical", "topk"),
}
REGISTERED = {"shm-reg"}  # the tensor comes from pyparallel.shm_empty
ALIASES = {"int8": "ring-int8", "topk": "ring-topk", "hierarchical": "hier"}  # older names
TRANSPORTS = ("gloo", "ring", "shm", "hierarchical")
COMPRESSIONS = ("none", "int8", "topk")
INT8_BLOCK = 256  # pyparallel.ops.DEFAULT_BLOCK_SIZE, the block the int8 variants use


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def sizes(args) -> list[int]:
    out, size = [], parse_bytes(args.begin)
    while size <= parse_bytes(args.end):
        out.append(size)
        size *= args.factor
    return out


def applicable(name: str, ranks: int, hosts: int) -> str | None:
    """Why variant ``name`` does not apply to this layout (None when it does)."""
    transport = VARIANTS[name][0]
    if transport == "shm" and hosts != 1:
        return f"shm needs all ranks on one host (here {hosts} hosts)"
    if transport == "hierarchical" and (hosts < 2 or ranks // hosts < 2):
        return f"hierarchical needs >= 2 hosts with > 1 rank each (here {hosts} hosts x {ranks // hosts} ranks)"
    return None


def choose_variants(args, hosts: int) -> list[str]:
    """The variants to run, in order; raises ValueError for a name that is unknown or does not apply."""
    if args.variants:
        names = [ALIASES.get(v, v) for v in args.variants.split(",")]
        for v in names:
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
            why = applicable(v, args.ranks, hosts)
            if why:
                raise ValueError(f"variant {v}: {why}")
        return names
    transports = None
    if args.transport:
        transports = [{"hier": "hierarchical"}.get(t, t) for t in args.transport.split(",")]
        for t in transports:
            if t not in TRANSPORTS:
                raise ValueError(f"unknown transport {t!r}; choose from {', '.join(TRANSPORTS)}")
            probe = {"ring": "ring", "shm": "shm", "hierarchical": "hier"}.get(t)
            why = probe and applicable(probe, args.ranks, hosts)
            if why:
                raise ValueError(f"transport {t}: {why}")
    compressions = args.compression.split(",") if args.compression else (["none"] if args.latency else list(COMPRESSIONS))
    for c in compressions:
        if c not in COMPRESSIONS:
            raise ValueError(f"unknown compression {c!r}; choose from {', '.join(COMPRESSIONS)}")
    out = []
    for name, (transport, compression) in VARIANTS.items():
        if transports is not None and (transport or "gloo") not in transports:
            continue
        if (compression or "none") not in compressions and name != "gloo":
            continue
        if applicable(name, args.ranks, hosts) is None:
            out.append(name)
    return out


def inputs(count: int, world: int, seed: int) -> list[torch.Tensor]:
    """Every rank's input, reproducible anywhere, so each rank can compute the references itself."""
    return [torch.randn(count, generator=torch.Generator().manual_seed(seed + r)) for r in range(world)]


def digest(t: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).digest()[:7], "little")


class Reference:
    """What the checks need, computed once per size (in float64)."""

    def __init__(self, xs: list[torch.Tensor], hosts: int):
        self.xs, self.n, self.hosts = xs, len(xs), hosts
        self._cache = {}

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def exact(self) -> torch.Tensor:
        return self._get("exact", lambda: sum(v.double() for v in self.xs))

    @property
    def abs_sum(self) -> torch.Tensor:
        return self._get("abs_sum", lambda: sum(v.double().abs() for v in self.xs))

    def fp32_bound(self) -> torch.Tensor:
        """Any order of fp32 additions of the n terms: 2(n-1) * 2^-24 * sum_i |x_i| (twice the classic
        (n-1)u bound, so it covers two orders' worth, as for Gloo)."""
        return self._get("fp32_bound", lambda: 2 * (self.n - 1) * 2.0**-24 * self.abs_sum)

    def host_sums(self) -> list[torch.Tensor]:
        per = self.n // self.hosts
        return self._get("host_sums", lambda: [sum(v.double() for v in self.xs[h * per:(h + 1) * per])
                                               for h in range(self.hosts)])

    def host_abs_sums(self) -> list[torch.Tensor]:
        per = self.n // self.hosts
        return self._get("host_abs", lambda: [sum(v.double().abs() for v in self.xs[h * per:(h + 1) * per])
                                              for h in range(self.hosts)])


def window_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element, the largest |x| within ``block - 1`` elements either side: at least the absmax of any
    block of ``block`` consecutive elements that contains it, wherever the blocks start."""
    a = x.abs().reshape(1, 1, -1)
    return torch.nn.functional.max_pool1d(a, 2 * block - 1, stride=1, padding=block - 1).reshape(x.shape)


def count_out_of(t: torch.Tensor, expect: torch.Tensor, bound: torch.Tensor) -> int:
    err = (t.double() - expect).abs()
    return int((~(err <= bound)).sum())  # NaN counts as wrong


def check_hier_int8(t: torch.Tensor, ref: Reference) -> int:
    """|result - exact| <= ((1 + 1/254)^H - 1) * S + fp32 bound, S = sum over hosts of the windowed absmax
    of the host's fp32 sum (its exact sum plus the fp32 bound of the sum inside the host)."""
    per, u = ref.n // ref.hosts, 2.0**-24
    s = sum(window_absmax(h.abs() + 2 * max(per - 1, 1) * u * a, INT8_BLOCK)
            for h, a in zip(ref.host_sums(), ref.host_abs_sums()))
    bound = ((1 + 1 / 254) ** ref.hosts - 1) * s + ref.fp32_bound()
    return count_out_of(t, ref.exact, bound)


def check_hier_topk(t: torch.Tensor, ref: Reference, k: int) -> int:
    """Which entries each host's top-k selects depends on the fp32 bits of its host sum, so it is not
    modelled; what is checked instead: the first call (zero residual) adds up, per element, the host sums
    of the hosts that selected it, so each element must be within the fp32 bound of the sum of some
    subset of the H host sums (all 2^H subsets are tried, H <= 6; beyond that only |result - exact| <=
    sum_h |host_sum_h|), and at most H * (k + L) elements are nonzero (each host selects, in each of the L
    regions, ceil(k * region / numel)). Agreement of the bits across ranks is checked separately."""
    hs, per = ref.host_sums(), ref.n // ref.hosts
    t64, bound = t.double(), ref.fp32_bound()
    if ref.hosts <= 6:
        ok = torch.zeros(t.shape, dtype=torch.bool)
        for subset in range(1 << ref.hosts):
            expect = sum((hs[h] for h in range(ref.hosts) if subset >> h & 1), torch.zeros_like(t64))
            ok |= (t64 - expect).abs() <= bound
        wrong = int((~ok).sum())
    else:
        wrong = count_out_of(t, ref.exact, sum(h.abs() for h in hs) + bound)
    excess = int((t != 0).sum()) - ref.hosts * (k + per)
    return wrong + max(0, excess)


class Variant:
    """One variant's call and the check of its first result."""

    def __init__(self, name: str, x: torch.Tensor, ratio: float, has_transport: bool):
        import pyparallel

        self.name = name
        self.transport, compression = VARIANTS[name]
        self.residual = None
        self.k = max(1, round(x.numel() * ratio))
        if compression == "topk":
            self.residual = torch.zeros_like(x)
            compression = pyparallel.Topk(k=self.k, residual=self.residual)
        if name == "gloo":
            self.run = lambda t: dist.all_reduce(t)
        else:
            kw = dict(transport=self.transport) if has_transport else {}
            self.run = lambda t: pyparallel.all_reduce(t, compression=compression, **kw)

    def reset(self, t: torch.Tensor, x: torch.Tensor) -> None:
        t.copy_(x)
        if self.residual is not None:
            self.residual.zero_()

    def wrong(self, t: torch.Tensor, ref: Reference, check_max: int) -> int:
        from pyparallel import reference as pref

        name = self.name
        if name == "ring":
            return int((t != pref.dense_all_reduce(ref.xs)).sum())
        if name in ("gloo", "shm", "shm-reg", "hier"):
            return count_out_of(t, ref.exact, ref.fp32_bound())
        if name == "ring-int8":
            return count_out_of(t, ref.exact, pref.int8_ring_error_bound(ref.xs, INT8_BLOCK) + ref.fp32_bound())
        if name == "hier-int8":
            return check_hier_int8(t, ref)
        if name == "ring-topk":
            if t.numel() > check_max:
                return 0  # agreement across ranks only
            expect = pref.topk_all_reduce(ref.xs, self.k, [torch.zeros_like(v) for v in ref.xs])
            return int((t != expect).sum())
        if name == "hier-topk":
            return check_hier_topk(t, ref, self.k)
        raise AssertionError(name)


def shm_bytes(size: int, local: int) -> float:
    """Bytes one rank must move at least in an all-reduce through memory: read its input, write its output."""
    return 2.0 * size if local > 1 else 0.0


def bound_kind(name: str, hosts: int, link_gbit: float | None) -> str:
    if VARIANTS[name][0] == "shm":
        return "mem"
    if link_gbit is not None and hosts >= 2 and VARIANTS[name][1] is None:
        return "link"
    return "n/a"


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, Gloo"


def worker(args) -> int:
    import pyparallel

    rank = int(os.environ.get("RANK", args.rank))
    n = args.ranks
    hosts = args.hosts or default_hosts(n, args.link_gbit)
    per_host = n // hosts
    assert int(os.environ.get("LOCAL_WORLD_SIZE", per_host)) == per_host, "launcher and worker disagree on hosts"
    torch.set_num_threads(args.threads)
    init = "env://" if "MASTER_ADDR" in os.environ else f"tcp://{args.master}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=args.timeout))
    has_transport = "transport" in inspect.signature(pyparallel.all_reduce).parameters
    resolve = getattr(getattr(pyparallel, "comm", None), "resolve_transport", None)
    names = choose_variants(args, hosts)
    skipped = []
    if not has_transport:  # an older pyparallel: only its ring exists
        skipped = [v for v in names if VARIANTS[v][0] not in (None, "ring")]
    if not hasattr(pyparallel, "shm_empty"):  # an older pyparallel: no registered buffers
        skipped += [v for v in names if v in REGISTERED and v not in skipped]
    names = [v for v in names if v not in skipped]
    measure_memcpy = any(VARIANTS[v][0] == "shm" for v in names)
    link = "loopback" if args.link_gbit is None else f"{args.link_gbit:g} Gbit/s per host (tbf, both ways)"
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(f"# {machine()}")
    say(f"# ranks {n} = {hosts} host(s) x {per_host}, link {link}, torch threads per rank {args.threads}, "
        f"median of {args.rounds} rounds x {args.iters} calls, first start to last end")
    if skipped:
        say(f"# SKIPPED {', '.join(skipped)}: this pyparallel has no transport= argument or no shm_empty")
    if measure_memcpy:
        say(f"# %bound mem: memcpy time / time: each rank reads N and writes N at least, a memcpy of N "
            f"(all {per_host} ranks copying at once, measured below; GB/s count read+written bytes, 2N per copy)")
    if args.link_gbit is not None and hosts >= 2:
        say(f"# %bound link: 2(H-1)/H*size each way per host link (H={hosts}) at {args.link_gbit:g} Gbit/s")

    rows, mem_rows, total_wrong = [], [], 0
    if not args.latency:
        say(f"# {'size':>10} {'count':>10} {'type':>6} {'redop':>5} {'variant':>9} {'time(us)':>11} "
            f"{'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'#wrong':>7} {'vs gloo':>8} {'%bound':>9}")
    else:
        say("# latency: median time per call (us), first start to last end; (x) = Gloo's time / this time")
        say(f"# {'size':>8} {'count':>8} " + " ".join(f"{v:>17}" for v in names) + f" {'#wrong':>7}")
    for size in sizes(args):
        count = size // 4
        xs = inputs(count, n, args.seed + size)
        ref = Reference(xs, hosts)
        auto = resolve(xs[rank], None, "auto") if resolve is not None else None
        variants, wrongs, tensors = {}, {}, {}
        for name in names:
            if name in REGISTERED:
                t = pyparallel.shm_empty(count)  # collective: every rank, same order
                t.copy_(xs[rank])
            else:
                t = xs[rank].clone()
            var = Variant(name, t, args.ratio, has_transport)
            var.run(t)
            wrong = var.wrong(t, ref, args.check_max)
            if name != "gloo":  # our collectives promise the same bits on every rank
                digests = [None] * n
                dist.all_gather_object(digests, digest(t))
                wrong += sum(d != digests[0] for d in digests) * count
            for _ in range(args.warmup):
                var.run(t)
            variants[name], wrongs[name], tensors[name] = var, wrong, t
        if measure_memcpy:
            src, dst = xs[rank].clone(), torch.empty_like(xs[rank])
            for _ in range(max(1, args.warmup)):
                dst.copy_(src)
        ref = None  # the references are no longer needed: free their memory before timing
        # As nccl-tests: back-to-back calls, time per call averaged over a round; the rounds of the
        # variants alternate and the median round is reported.
        # A round lasts from the first rank's start to the last rank's end (perf_counter is CLOCK_MONOTONIC,
        # one clock for every process of a host, and emulated hosts share the kernel): with more ranks than
        # cores, a rank that waits for a core starts its clock late, and its own duration alone would
        # time the memcpy of 4 ranks on 2 cores as if each had a core of its own.
        order = list(variants) + (["memcpy"] if measure_memcpy else [])
        starts = torch.empty(len(order), args.rounds, dtype=torch.float64)
        ends = torch.empty_like(starts)
        for rnd in range(args.rounds):
            for v, name in enumerate(order):
                if name == "memcpy":
                    run, t = (lambda _: dst.copy_(src)), None
                else:
                    run, t = variants[name].run, tensors[name]
                    variants[name].reset(t, xs[rank])
                dist.barrier()
                starts[v, rnd] = time.perf_counter()
                for _ in range(args.iters):
                    run(t)
                ends[v, rnd] = time.perf_counter()
        dist.all_reduce(starts, op=dist.ReduceOp.MIN)
        dist.all_reduce(ends, op=dist.ReduceOp.MAX)
        times = (ends - starts) / args.iters
        counts = torch.tensor([wrongs[v] for v in variants], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        med = {name: times[v].median().item() for v, name in enumerate(order)}
        mem = None
        if measure_memcpy:
            mem = dict(size=size, time_us=med["memcpy"] * 1e6, gbps=2 * size / med["memcpy"] / 1e9,
                       ranks_copying=per_host)
            mem_rows.append(mem)
        size_rows = []
        for v, name in enumerate(variants):
            seconds, wrong = med[name], int(counts[v].item())
            total_wrong += wrong
            algbw = size / seconds / 1e9
            kind = bound_kind(name, hosts, args.link_gbit)
            if kind == "mem":
                bound_s = shm_bytes(size, per_host) / (mem["gbps"] * 1e9)
            elif kind == "link":
                bound_s = 2 * (hosts - 1) / hosts * size / (args.link_gbit * 1e9 / 8)
            else:
                bound_s = None
            transport, compression = VARIANTS[name]
            row = dict(size=size, count=count, type="float", redop="sum", variant=name,
                       transport=transport or "gloo", compression=compression, time_us=seconds * 1e6,
                       algbw=algbw, busbw=algbw * 2 * (n - 1) / n, wrong=wrong,
                       vs_gloo=med["gloo"] / seconds if "gloo" in med else None,
                       bound=kind, bound_pct=100 * bound_s / seconds if bound_s else None, auto=auto)
            rows.append(row)
            size_rows.append(row)
            if rank == 0 and not args.latency:
                vs = f"{row['vs_gloo']:.2f}x" if row["vs_gloo"] is not None else "n/a"
                bound = f"{row['bound_pct']:.0f}% {kind}" if row["bound_pct"] is not None else "n/a"
                print(f"  {size:>10} {count:>10} {'float':>6} {'sum':>5} {name:>9} {row['time_us']:>11.1f} "
                      f"{algbw:>11.3f} {row['busbw']:>11.3f} {wrong:>7} {vs:>8} {bound:>9}", flush=True)
        if args.latency:
            cells = []
            for row in size_rows:
                ratio = f"({row['vs_gloo']:.2f}x)" if row["vs_gloo"] is not None and row["variant"] != "gloo" else ""
                cells.append(f"{row['time_us']:>9.1f} {ratio:>7}")
            say(f"  {size:>8} {count:>8} " + " ".join(cells) + f" {sum(r['wrong'] for r in size_rows):>7}")
        elif mem is not None:
            say(f"#   memcpy {size} B, {per_host} ranks at once: {mem['time_us']:.1f} us, "
                f"{mem['gbps']:.2f} GB/s per rank (read+write)" + (f"; auto -> {auto}" if auto else ""))
        elif auto:
            say(f"#   auto -> {auto}")
        del xs, variants, tensors
    if rank == 0:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(machine=machine(), ranks=n, hosts=hosts, ranks_per_host=per_host,
                               link_gbit=args.link_gbit, threads=args.threads, iters=args.iters,
                               rounds=args.rounds, latency=args.latency, skipped=skipped, rows=rows,
                               memcpy=mem_rows, wrong=total_wrong, cmd=args.cmd), f, indent=2)
        print(f"# out of bounds: {total_wrong}")
    dist.destroy_process_group()
    return 1 if total_wrong else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--hosts", type=int, default=None,
                   help="emulated hosts, ranks spread evenly (default: 1 on loopback, one per rank with --link-gbit)")
    p.add_argument("-b", "--begin", default=None, help="smallest size in bytes (fp32), e.g. 64K (default 1M; 8 with --latency)")
    p.add_argument("-e", "--end", default=None, help="largest size in bytes (default 64M; 64K with --latency)")
    p.add_argument("-f", "--factor", type=int, default=None, help="size multiplier between rows (default 4; 2 with --latency)")
    p.add_argument("-w", "--warmup", type=int, default=2)
    p.add_argument("-i", "--iters", type=int, default=None, help="calls per timed round (default 5; 20 with --latency)")
    p.add_argument("-r", "--rounds", type=int, default=None, help="timed rounds, the median is reported (default 5; 21 with --latency)")
    p.add_argument("--latency", action="store_true", help="small-message table: time per call and ratio to Gloo")
    p.add_argument("--transport", default=None,
                   help="comma list of " + ", ".join(TRANSPORTS) + " (default: all that apply to the host layout)")
    p.add_argument("--compression", default=None,
                   help="comma list of " + ", ".join(COMPRESSIONS) + " (default: all; none with --latency)")
    p.add_argument("--variants", default=None, help="exact comma list of variants, overriding --transport/--compression: "
                   + ", ".join(VARIANTS))
    p.add_argument("--ratio", type=float, default=0.01, help="top-k ratio")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--link-gbit", type=float, default=None, help="emulate one link of this many Gbit/s per host (root)")
    p.add_argument("--check-max", type=int, default=4 << 20, help="largest count checked against the top-k reference")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=600, help="process-group timeout, seconds")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--master", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, normal, latency in (("begin", "1M", "8"), ("end", "64M", "64K"), ("factor", 4, 2),
                                 ("iters", 5, 20), ("rounds", 5, 21)):
        if getattr(args, key) is None:
            setattr(args, key, latency if args.latency else normal)
    hosts = args.hosts or default_hosts(args.ranks, args.link_gbit)
    why = check_hosts(args.ranks, hosts)
    if why:
        p.error(why)
    try:
        names = choose_variants(args, hosts)
    except ValueError as e:
        p.error(str(e))
    if not names:
        p.error("no variant applies to this selection and host layout")
    # The tensor is reset every round, so a round's sums grow by at most n^iters: keep that inside fp32.
    if args.iters * math.log2(max(args.ranks, 2)) > 110:
        p.error(f"-i {args.iters} with {args.ranks} ranks would overflow fp32 within a round "
                f"(n^iters > 2^110); use fewer calls per round and more rounds")
    if args.worker:
        args.cmd = " ".join(["benchmarks/allreduce.py"] + argv[: argv.index("--worker")])
        return worker(args)
    return launch(__file__, argv, args.ranks, args.link_gbit, timeout_s=args.timeout * 4, hosts=hosts)


if __name__ == "__main__":
    sys.exit(main())
