"""Typed wrappers over ``torch.ops.pyparallel.*`` and their fake implementations.

One small function per op; the semantics are those of the C++ notes cited in each docstring. Every
op has a pure-PyTorch twin in :mod:`pyparallel.reference` that the tests compare against.
"""

from __future__ import annotations

import torch

_ops = torch.ops.pyparallel

DEFAULT_BLOCK_SIZE = 256
"""Elements per int8 quantization block: 4 bytes of scale per 256 bytes of payload (1.6% overhead)."""

FIRST_BUCKET_BYTES = 1024 * 1024
BUCKET_CAP_BYTES = 25 * 1024 * 1024


def quantize_int8(
    x: torch.Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise symmetric int8 quantization (Note [Int8 arithmetic], csrc/cpu/quantize.cpp).

    Args:
        x: float32, float16 or bfloat16 tensor of any shape; blocks run over the flattened tensor and
            the last block may be partial.
        block_size: elements per block.
        stochastic: round ``x / scale`` to ``floor(x / scale + u)``, ``u ~ U[0, 1)`` (unbiased) instead
            of to nearest even.
        generator: random source for stochastic rounding (the device's default generator if None).

    Returns:
        ``(q, scales)``: int8 values shaped like ``x`` in [-127, 127] and one float32 scale per block
        (``absmax / 127``; 0 for all-zero blocks; NaN/Inf when the block holds NaN/Inf).

    Example:
        >>> q, s = quantize_int8(torch.randn(1000))
        >>> x_hat = dequantize_int8(q, s)
    """
    return _ops.quantize_int8(x, block_size, stochastic, generator)


def dequantize_int8(
    q: torch.Tensor, scales: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Returns ``q * scale`` per block as ``dtype`` (float32 by default), shaped like ``q``."""
    return _ops.dequantize_int8(q, scales, block_size, dtype)


def dequantize_add_(
    acc: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """Fused ``acc += dequantize_int8(q, scales)`` into a contiguous float32 accumulator; returns ``acc``."""
    _ops.dequantize_add_(acc, q, scales, block_size)
    return acc


def quantize_int8_into_(
    q: torch.Tensor,
    scales: torch.Tensor,
    x: torch.Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    add_q: torch.Tensor | None = None,
    add_scales: torch.Tensor | None = None,
    divisor: float = 1.0,
) -> None:
    """Quantizes ``(x + dequantize_int8(add_q, add_scales)) / divisor`` into the preallocated ``q`` and
    ``scales`` in one pass (each step rounded in fp32): the fused hop of the int8 ring."""
    _ops.quantize_int8_into_(q, scales, x, block_size, add_q, add_scales, divisor)


def dequantize_int8_into_(
    out: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """``out[:] = dequantize_int8(q, scales)`` in ``out``'s dtype, without allocating; returns ``out``."""
    _ops.dequantize_int8_into_(out, q, scales, block_size)
    return out


def topk_compress(
    x: torch.Tensor,
    k: int,
    residual: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by magnitude, with optional error feedback (Note [Exact top-k selection], csrc/cpu/topk.cpp).

    Args:
        x: float tensor of any shape (flattened).
        k: number of entries to keep, ``0 <= k <= x.numel()``.
        residual: error-feedback memory with x's dtype and numel, updated in place to
            ``residual + x`` minus what was selected, so that
            ``residual_new + scatter(values, indices) == residual_old + x`` exactly.
        index_dtype: torch.int64 or torch.int32 (halves the index bytes on the wire).

    Returns:
        ``(values, indices)`` of length k in ascending index order; NaN counts as the largest magnitude.

    Example:
        >>> r = torch.zeros(10_000)
        >>> values, indices = topk_compress(torch.randn(10_000), 100, residual=r)
    """
    return _ops.topk_compress(x, k, residual, index_dtype)


def scatter_add_(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out.view(-1)[indices] += values`` (duplicates summed; in order on CPU); returns ``out``."""
    _ops.scatter_add_(out, indices, values)
    return out


def bucket_assignment(
    tensors: list[torch.Tensor], size_limits: tuple[int, ...] = (FIRST_BUCKET_BYTES, BUCKET_CAP_BYTES)
) -> list[list[int]]:
    """Deterministic assignment of tensors to buckets (Note [Bucket assignment], csrc/bucket_assignment.cpp).

    Buckets hold one (dtype, device) each and are filled walking ``tensors`` in reverse order; the n-th
    bucket of a (dtype, device) closes once it holds ``size_limits[n]`` bytes (the last limit repeats).

    Returns:
        Bucket index lists in the order the buckets were opened; each list is in reverse tensor order,
        which is the order in which backward produces gradients.

    Example:
        >>> bucket_assignment([p.grad for p in model.parameters()])
    """
    keys: dict[tuple[torch.dtype, torch.device], int] = {}
    group_keys = [keys.setdefault((t.dtype, t.device), len(keys)) for t in tensors]
    bucket_of = _ops.bucket_assignment(
        [t.numel() for t in tensors], [t.element_size() for t in tensors], group_keys, list(size_limits)
    )
    buckets: list[list[int]] = [[] for _ in range(max(bucket_of, default=-1) + 1)]
    for i in reversed(range(len(tensors))):
        buckets[bucket_of[i]].append(i)
    return buckets


def bucket_flatten(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Copies ``tensors`` end to end into the 1-D ``out`` (allocated if None): one launch on CUDA."""
    if out is None:
        if not tensors:
            raise ValueError("bucket_flatten: pass out= when tensors is empty (dtype and device are unknown)")
        out = tensors[0].new_empty(sum(t.numel() for t in tensors))
    _ops.bucket_flatten(tensors, out)
    return out


def bucket_unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copies consecutive slices of ``flat`` back into ``tensors`` (the inverse of bucket_flatten)."""
    _ops.bucket_unflatten(flat, tensors)


# Fake (meta) implementations: shapes and dtypes only, so the ops trace under torch.compile.
@torch.library.register_fake("pyparallel::quantize_int8")
def _quantize_int8_fake(x, block_size, stochastic=False, generator=None):
    torch._check(block_size > 0, lambda: f"quantize_int8: block_size must be positive, got {block_size}")
    nblocks = (x.numel() + block_size - 1) // block_size
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((nblocks,), dtype=torch.float32)


@torch.library.register_fake("pyparallel::dequantize_int8")
def _dequantize_int8_fake(q, scales, block_size, dtype=None):
    return q.new_empty(q.shape, dtype=dtype or torch.float32)


@torch.library.register_fake("pyparallel::dequantize_add_")
def _dequantize_add_fake(acc, q, scales, block_size):
    return None


@torch.library.register_fake("pyparallel::quantize_int8_into_")
def _quantize_int8_into_fake(q, scales, x, block_size, add_q=None, add_scales=None, divisor=1.0):
    return None


@torch.library.register_fake("pyparallel::dequantize_int8_into_")
def _dequantize_int8_into_fake(out, q, scales, block_size):
    return None


@torch.library.register_fake("pyparallel::topk_compress")
def _topk_compress_fake(x, k, residual=None, index_dtype=None):
    return x.new_empty((k,)), x.new_empty((k,), dtype=index_dtype or torch.int64)


@torch.library.register_fake("pyparallel::scatter_add_")
def _scatter_add_fake(out, indices, values):
    return None


@torch.library.register_fake("pyparallel::bucket_flatten")
def _bucket_flatten_fake(tensors, out):
    return None


@torch.library.register_fake("pyparallel::bucket_unflatten")
def _bucket_unflatten_fake(flat, tensors):
    return None


# The collectives mutate their input in place and return the bytes sent, which a trace cannot know: 0.
@torch.library.register_fake("pyparallel::ring_all_reduce_")
def _ring_all_reduce_fake(tensor, group_name, average=False, segment_bytes=0):
    return 0


@torch.library.register_fake("pyparallel::ring_all_reduce_int8_")
def _ring_all_reduce_int8_fake(tensor, group_name, average=False, block_size=0, segment_bytes=0):
    return 0


@torch.library.register_fake("pyparallel::topk_all_reduce_")
def _topk_all_reduce_fake(tensor, group_name, k, residual=None, average=False):
    return 0


@torch.library.register_fake("pyparallel::shm_all_reduce_")
def _shm_all_reduce_fake(tensor, comm, average=False):
    return 0


@torch.library.register_fake("pyparallel::hierarchical_all_reduce_")
def _hierarchical_all_reduce_fake(tensor, comm, cross_group_name, world_size, average=False, compression=0, param=0,
                                  residual=None, piece_bytes=0):
    return 0


@torch.library.register_fake("pyparallel::ipc_all_reduce_")
def _ipc_all_reduce_fake(tensor, comm, average=False):
    return 0
