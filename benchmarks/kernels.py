"""Kernel throughput: ours against the pure-PyTorch reference and a plain copy, on one device.

GB/s counts the bytes each kernel must move at least (inputs read once, outputs written once); "% copy"
compares that with ``dst.copy_(src)`` of a 4-byte-per-element buffer of the same numel measured in the
same run. "ok" says whether ours and the reference agreed (bitwise for the deterministic ops); any
disagreement makes the script exit non-zero.

    python benchmarks/kernels.py                      # CPU, 16M elements, fp32 and bf16
    python benchmarks/kernels.py --device cuda --numel 64M --json out.json
    python benchmarks/kernels.py --quick              # a smoke run: 1M elements, fp32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import pyparallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import cpu_model  # noqa: E402
from pyparallel import ops
from pyparallel import reference as ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK = ops.DEFAULT_BLOCK_SIZE
TOPK_RATIO = 0.01


def parse_count(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def time_it(fn, device: str, warmup: int, reps: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def same(a, b) -> bool:
    """Bitwise agreement (NaN equal to NaN)."""
    if isinstance(a, (tuple, list)):
        return all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) or bool(torch.allclose(a.float(), b.float(), rtol=0, atol=0, equal_nan=True))


def same_magnitudes(a, b) -> bool:
    """Top-k: torch.topk breaks ties arbitrarily, so compare the selected magnitudes, not the indices."""
    return torch.equal(torch.sort(a[0].float().abs()).values, torch.sort(b[0].float().abs()).values)


def cases(numel: int, dtype: torch.dtype, device: str):
    """(name, bytes moved, ours, reference, check) per op; check(ours_out, ref_out) or None when the op
    mutates state that the two sides do not share."""
    e = torch.empty((), dtype=dtype).element_size()
    x = torch.randn(numel, device=device).to(dtype)
    nblocks = -(-numel // BLOCK)
    q, s = ops.quantize_int8(x, BLOCK)
    k = max(1, int(numel * TOPK_RATIO))
    acc = torch.randn(numel, device=device)
    acc_ref = acc.clone()
    r, r_ref = torch.zeros_like(x), torch.zeros_like(x)
    pieces = [max(1, numel // 400), max(1, numel // 150), max(1, numel // 1000)]  # 200 tensors, mixed sizes
    sizes = [pieces[i % 3] for i in range(200)]
    grads = [torch.randn(n, device=device).to(dtype) for n in sizes]
    flat, flat_ref = torch.empty(sum(sizes), dtype=dtype, device=device), torch.empty(sum(sizes), dtype=dtype, device=device)
    flat_bytes = sum(sizes) * e
    vals, idx = ops.topk_compress(x, k, index_dtype=torch.int32)
    out, out_ref = torch.zeros_like(x), torch.zeros_like(x)
    return [
        ("quantize_int8", numel * (e + 1) + nblocks * 4,
         lambda: ops.quantize_int8(x, BLOCK), lambda: ref.quantize_int8(x, BLOCK), same),
        ("dequantize_int8", numel * (1 + e) + nblocks * 4,
         lambda: ops.dequantize_int8(q, s, BLOCK, dtype), lambda: ref.dequantize_int8(q, s, BLOCK, dtype), same),
        ("dequantize_add_", numel * 9 + nblocks * 4,
         lambda: ops.dequantize_add_(acc, q, s, BLOCK), lambda: ref.dequantize_add_(acc_ref, q, s, BLOCK), same),
        ("topk 1%", numel * e + k * (e + 8),
         lambda: ops.topk_compress(x, k), lambda: ref.topk_compress(x, k), same_magnitudes),
        ("topk 1% + EF", 3 * numel * e + k * (e + 8),
         lambda: ops.topk_compress(x, k, residual=r), lambda: ref.topk_compress(x, k, residual=r_ref), same_magnitudes),
        ("scatter_add_", k * (2 * e + 4) + k * e,
         lambda: ops.scatter_add_(out, idx, vals), lambda: ref.scatter_add_(out_ref, idx, vals), same),
        ("bucket_flatten x200", 2 * flat_bytes,
         lambda: ops.bucket_flatten(grads, flat), lambda: ref.bucket_flatten(grads, flat_ref), same),
    ]


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--numel", default="16M", help="elements per input, e.g. 1M, 64M")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, fp16, bf16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="1M elements, fp32, 3 reps (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.numel, args.dtypes, args.reps, args.warmup = "1M", "fp32", 3, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    numel = parse_count(args.numel)
    device = args.device

    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = time_it(lambda: dst.copy_(src), device, args.warmup, args.reps)
    copy_gbs = 2 * src.numel() * 4 / copy_s / 1e9
    print(f"# pyparallel {pyparallel.__version__} kernels on {device}: {machine(device)}; torch {torch.__version__}")
    print(f"# copy bandwidth: {copy_gbs:.1f} GB/s ({numel} fp32 elements, read + write)")
    header = f"{'op':<20} {'dtype':<5} {'numel':>10} {'ours(ms)':>9} {'ref(ms)':>9} {'speedup':>8} {'GB/s':>8} {'%copy':>6} {'ok':>3}"
    print(header)
    rows, wrong = [], 0
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        for op, nbytes, ours, reference, check in cases(numel, dtype, device):
            ok = check(ours(), reference())  # first calls: both sides start from the same state
            wrong += not ok
            t_ours = time_it(ours, device, args.warmup, args.reps)
            t_ref = time_it(reference, device, args.warmup, args.reps)
            gbs = nbytes / t_ours / 1e9
            row = dict(op=op, dtype=name, numel=numel, ours_ms=t_ours * 1e3, ref_ms=t_ref * 1e3,
                       speedup=t_ref / t_ours, gbps=gbs, pct_copy=100 * gbs / copy_gbs, ok=ok)
            if op == "topk 1%":  # the target compares with torch.topk itself (|x|, unsorted), not the reference
                x = torch.randn(numel, device=device).to(dtype)
                k = max(1, int(numel * TOPK_RATIO))
                t_torch = time_it(lambda: torch.topk(x.abs(), k, sorted=False), device, args.warmup, args.reps)
                row.update(torch_topk_ms=t_torch * 1e3, vs_torch_topk=t_torch / t_ours)
            rows.append(row)
            print(f"{op:<20} {name:<5} {numel:>10} {row['ours_ms']:>9.3f} {row['ref_ms']:>9.3f} "
                  f"{row['speedup']:>7.1f}x {gbs:>8.1f} {row['pct_copy']:>5.0f}% {'ok' if ok else 'NO':>3}"
                  + (f"   torch.topk {row['torch_topk_ms']:.3f} ms: {row['vs_torch_topk']:.1f}x" if "vs_torch_topk" in row
                     else ""),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, machine=machine(device), torch=torch.__version__, copy_gbps=copy_gbs,
                           rows=rows, wrong=wrong, cmd=" ".join(sys.argv)), f, indent=2)
    if wrong:
        print(f"# {wrong} results differ from the reference", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
