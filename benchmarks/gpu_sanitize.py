"""Run each of pyparallel's CUDA kernels once on moderate sizes and check the results: the driver that
benchmarks/gpu_check.py runs under compute-sanitizer (memcheck, racecheck), and a smoke test that needs
neither pytest nor anything but torch.

    python benchmarks/gpu_sanitize.py --kernels      # every kernel, odd sizes, every dtype, vs the reference
    python benchmarks/gpu_sanitize.py --ipc 2        # the CUDA IPC all-reduce, 2 processes on this node
    python benchmarks/gpu_sanitize.py --kernels --device cpu   # the same checks on the CPU kernels

Prints "SANITIZE OK" and exits 0 when every result matched; exits 1 (after the other checks) otherwise.
Sizes stay small (at most 300K elements) because the sanitizer runs kernels tens of times slower.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pyparallel  # noqa: E402
from pyparallel import ops  # noqa: E402
from pyparallel import reference as ref  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 1000, 65_537, 300_007]
failures: list[str] = []


def check(name: str, ok: bool) -> None:
    if not ok:
        failures.append(name)
        print(f"MISMATCH {name}", flush=True)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu(), b.cpu())


def kernels(device: str) -> None:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for numel in SIZES:
            for block in (32, 256, 1000):
                x = (torch.randn(numel, generator=g) * 3).to(dtype)
                name = f"{dtype} numel={numel} block={block}"
                q, s = ops.quantize_int8(x.to(dev), block)
                rq, rs = ref.quantize_int8(x, block)
                check(f"quantize_int8 {name}", same(q, rq) and same(s, rs))
                check(f"dequantize_int8 {name}", same(ops.dequantize_int8(q, s, block, dtype),
                                                      ref.dequantize_int8(rq, rs, block, dtype)))
                acc = torch.randn(numel, generator=g)
                acc_dev = acc.to(dev, copy=True)  # a copy also on the CPU: both sides add into their own
                ops.dequantize_add_(acc_dev, q, s, block)
                check(f"dequantize_add_ {name}", same(acc_dev, ref.dequantize_add_(acc.clone(), rq, rs, block)))
                # fused re-quantization of (x + dequantize(add)) / 2, as the int8 ring's hop does
                q2, s2 = torch.empty_like(q), torch.empty_like(s)
                ops.quantize_int8_into_(q2, s2, x.to(dev), block, q, s, 2.0)
                rq2, rs2 = torch.empty_like(rq), torch.empty_like(rs)
                ref.quantize_int8_into_(rq2, rs2, x, block, rq, rs, 2.0)
                check(f"quantize_int8_into_ {name}", same(q2, rq2) and same(s2, rs2))
                out = torch.empty(numel, dtype=dtype, device=dev)
                ops.dequantize_int8_into_(out, q, s, block)
                check(f"dequantize_int8_into_ {name}", same(out, ref.dequantize_int8(rq, rs, block, dtype)))
            if numel:  # stochastic rounding: each value is rounded down or up, never further
                q, _ = ops.quantize_int8(x.to(dev), 256, stochastic=True)
                rq, _ = ref.quantize_int8(x, 256)
                check(f"quantize_int8 stochastic {dtype} {numel}",
                      bool((q.cpu().int() - rq.int()).abs().max() <= 1) and bool((q.abs() <= 127).all()))
            # top-k with and without error feedback, both index dtypes; a misaligned slice
            for k in sorted(k for k in {0, 1, max(1, numel // 100), numel} if k <= numel):
                for index_dtype in (torch.int64, torch.int32):
                    xd = x.to(dev)
                    v, i = ops.topk_compress(xd, k, index_dtype=index_dtype)
                    rv, ri = ref.topk_compress(x, k, index_dtype=index_dtype)
                    check(f"topk_compress {dtype} numel={numel} k={k} {index_dtype}", same(v, rv) and same(i, ri))
                r = torch.randn(numel, generator=g).to(dtype)
                rd = r.to(dev, copy=True)
                v, i = ops.topk_compress(x.to(dev), k, residual=rd)
                rv, ri = ref.topk_compress(x, k, residual=r)
                check(f"topk_compress+EF {dtype} numel={numel} k={k}", same(v, rv) and same(i, ri) and same(rd, r))
                out = torch.zeros(numel, dtype=dtype, device=dev)
                ops.scatter_add_(out, i, v)
                check(f"scatter_add_ {dtype} numel={numel} k={k}",
                      same(out, ref.scatter_add_(torch.zeros(numel, dtype=dtype), ri, rv)))
            if numel > 1:
                xs = x.to(dev)[1:]  # starts 1 element in: the unaligned paths
                q, s = ops.quantize_int8(xs, 256)
                rq, rs = ref.quantize_int8(x[1:], 256)
                check(f"quantize_int8 misaligned {dtype} {numel}", same(q, rq) and same(s, rs))
        # buckets: 200 tensors of mixed sizes, some starting at odd offsets
        sizes = [(i * 7919) % 5003 + (i % 3) for i in range(200)]
        base = torch.randn(sum(sizes) + 400, generator=g).to(dtype).to(dev)
        tensors, offset = [], 0
        for i, n in enumerate(sizes):
            offset += i % 2
            tensors.append(base[offset:offset + n])
            offset += n
        flat = ops.bucket_flatten(tensors)
        check(f"bucket_flatten {dtype}", same(flat, torch.cat([t.reshape(-1) for t in tensors])))
        back = [torch.empty_like(t) for t in tensors]
        ops.bucket_unflatten(flat, back)
        check(f"bucket_unflatten {dtype}", all(same(a, b) for a, b in zip(back, tensors)))
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _ipc_rank(rank: int, world: int, init_file: str, results, timeout_s: float) -> None:
    try:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        os.environ["PYPARALLEL_IPC_BUFFER_BYTES"] = str(64 << 10)  # two-shot with many chunks too
        bad = []
        for dtype in DTYPES:
            for numel in (0, 1, 1000, 16_385, 100_003):
                for average in (False, True):
                    gen = torch.Generator().manual_seed(numel)
                    xs = [(torch.randn(numel, generator=gen) * (r + 1)).to(dtype) for r in range(world)]
                    t = xs[rank].to(dev)
                    pyparallel.all_reduce(t, op="avg" if average else "sum", transport="ipc")
                    if not torch.equal(t.cpu(), ref.shm_all_reduce(xs, average)):
                        bad.append(f"ipc_all_reduce {dtype} numel={numel} average={average} rank={rank}")
        pyparallel.release()
        dist.destroy_process_group()
        results.put((rank, bad))
    except BaseException:
        results.put((rank, [f"rank {rank} raised:\n{traceback.format_exc()}"]))


def ipc(world: int, timeout_s: float) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(prefix="gpu-sanitize-"), "store")
    procs = [ctx.Process(target=_ipc_rank, args=(r, world, init_file, results, timeout_s)) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(world):
        try:
            rank, bad = results.get(timeout=timeout_s + 240)  # + CUDA setup of the ranks under the sanitizer
        except Exception:  # queue.Empty: a rank hung or died without reporting
            break
        got[rank] = bad
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    for r in range(world):
        if r not in got:
            failures.append(f"ipc rank {r} did not report")
        for b in got.get(r, []):
            check(b, False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", action="store_true", help="every kernel once, checked against the reference")
    p.add_argument("--ipc", type=int, default=0, metavar="N", help="the CUDA IPC all-reduce with N processes")
    p.add_argument("--timeout", type=float, default=120, metavar="S",
                   help="--ipc: the group's timeout, which bounds each all-reduce's wait for the other ranks")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="where --kernels runs (cpu: to check this driver itself without a GPU)")
    args = p.parse_args(argv)
    if (args.device == "cuda" or args.ipc) and not torch.cuda.is_available():
        print("no CUDA device: nothing to sanitize", file=sys.stderr)
        return 2
    if not args.kernels and not args.ipc:
        p.error("say what to run: --kernels and/or --ipc N")
    if args.kernels:
        kernels(args.device)
    if args.ipc:
        ipc(args.ipc, args.timeout)
    if failures:
        print(f"{len(failures)} checks failed", file=sys.stderr)
        return 1
    print("SANITIZE OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
