"""Pure-PyTorch references for every compiled op.

They define the expected results in the tests and are the baselines in ``benchmarks/kernels.py``. They
follow the same fp32 arithmetic as the kernels (Note [Int8 arithmetic]), so deterministic outputs match
bitwise; they are written the way a PyTorch user would write them (vectorized tensor ops), not as loops.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
MIN_ABSMAX = 2.0**-120  # blocks below this quantize to zero: 127 / absmax would overflow fp32


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """x flattened to fp32 and zero-padded to whole blocks, shaped (nblocks, block_size)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // block_size)
    return torch.nn.functional.pad(flat, (0, nblocks * block_size - n)).view(nblocks, block_size), n


def quantize_int8(x, block_size, stochastic=False, generator=None):
    blocks, n = _blocks(x, block_size)
    absmax = blocks.abs().amax(dim=1)  # propagates NaN
    special = (absmax < MIN_ABSMAX) | ~torch.isfinite(absmax)
    # Tensor-by-tensor division: `127 / t` and `t / 127` may be computed through a reciprocal in PyTorch
    # (two roundings); the kernels divide once, correctly rounded.
    full127 = torch.full_like(absmax, INT8_MAX)
    v = blocks * (full127 / absmax)[:, None]
    if stochastic:
        v = torch.floor(v + torch.rand(v.shape, generator=generator, device=v.device))
    else:
        v = torch.round(v)  # half to even
    q = torch.where(special[:, None], 0.0, v.clamp(-INT8_MAX, INT8_MAX)).to(torch.int8)
    scales = torch.where(absmax < MIN_ABSMAX, 0.0, torch.where(torch.isfinite(absmax), absmax / full127, absmax))
    return q.reshape(-1)[:n].reshape(x.shape), scales


def dequantize_int8(q, scales, block_size, dtype=None):
    blocks, n = _blocks(q, block_size)
    out = (blocks * scales[:, None]).reshape(-1)[:n]
    return out.reshape(q.shape).to(dtype or torch.float32)


def dequantize_add_(acc, q, scales, block_size):
    acc.add_(dequantize_int8(q, scales, block_size).view(acc.shape))
    return acc


def topk_compress(x, k, residual=None, index_dtype=torch.int64):
    y = x.reshape(-1) if residual is None else residual.view(-1).add_(x.reshape(-1))
    _, idx = torch.topk(y.abs(), k, sorted=False)
    idx, _ = torch.sort(idx)
    values = y[idx]
    if residual is not None:
        residual.view(-1)[idx] = 0
    return values, idx.to(index_dtype)


def scatter_add_(out, indices, values):
    out.view(-1).index_add_(0, indices.long(), values)
    return out


def bucket_assignment(tensors, size_limits):
    """Note [Bucket assignment], written out in Python."""
    open_bucket: dict = {}  # (dtype, device) -> [bucket id, bytes, limit]
    opened: dict = {}
    buckets: list[list[int]] = []
    for i in reversed(range(len(tensors))):
        t = tensors[i]
        key = (t.dtype, t.device)
        if key not in open_bucket:
            n = opened.get(key, 0)
            opened[key] = n + 1
            open_bucket[key] = [len(buckets), 0, size_limits[min(n, len(size_limits) - 1)]]
            buckets.append([])
        slot = open_bucket[key]
        buckets[slot[0]].append(i)
        slot[1] += t.numel() * t.element_size()
        if slot[1] >= slot[2]:
            del open_bucket[key]
    return buckets


def bucket_flatten(tensors, out):
    torch.cat([t.reshape(-1) for t in tensors], out=out)
    return out


def bucket_unflatten(flat, tensors):
    for t, piece in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
        t.copy_(piece.view(t.shape))
