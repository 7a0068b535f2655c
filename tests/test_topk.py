"""topk_compress and scatter_add_ against references, on every device."""

import pytest
import torch

from pyparallel import ops
from pyparallel import reference as ref

from conftest import DEVICES
from topk_adversary import cpu_sample_positions

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 2, 7, 100, 2047, 2048, 2049, 70_001, 300_000]


def _spec(y, k):
    """The exact selection rule: largest |y| first (NaN largest), ties to the lower index, output by index."""
    flat = y.reshape(-1)
    order = torch.sort(flat.float().abs(), descending=True, stable=True).indices[:k]
    idx = torch.sort(order).values
    return flat[idx], idx


def _random(n, dtype, device, ties=False):
    x = torch.randn(n, device=device)
    if ties:  # few distinct magnitudes, both signs: many ties at the threshold
        x = torch.randint(-4, 5, (n,), device=device).float()
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_matches_exact_rule(device, dtype, ties):
    for n in SIZES:
        x = _random(n, dtype, device, ties)
        for k in sorted({0, 1, n // 100, n // 3, n - 1, n}):
            values, indices = ops.topk_compress(x, k)
            v_spec, i_spec = _spec(x, k)
            assert torch.equal(indices, i_spec), (n, k)
            assert torch.equal(values, v_spec)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_same_set_as_torch_topk(device):
    # Continuous random fp32 values have no ties, so the sets must agree exactly.
    for n in SIZES:
        x = torch.randn(n, device=device)
        k = max(1, n // 100)
        values, indices = ops.topk_compress(x.view(-1, 1) if n % 2 else x, k)
        v_ref, i_ref = ref.topk_compress(x, k)
        assert torch.equal(indices, i_ref)
        assert torch.equal(values, v_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_error_feedback_invariant_is_exact(device, dtype, index_dtype):
    # residual_new + scatter(values, indices) == residual_old + x, bitwise, over several steps.
    n = 50_003
    residual = torch.zeros(n, dtype=dtype, device=device)
    for step in range(4):
        x = _random(n, dtype, device, ties=step % 2 == 1)
        old = residual.clone()
        values, indices = ops.topk_compress(x, n // 100, residual=residual, index_dtype=index_dtype)
        assert indices.dtype == index_dtype
        expect = old + x
        rebuilt = residual.clone()
        rebuilt[indices.long()] += values
        assert torch.equal(rebuilt, expect)
        assert not bool(residual[indices.long()].any()), "sent entries must leave the residual"
        v_spec, i_spec = _spec(expect, n // 100)
        assert torch.equal(indices.long(), i_spec)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_edge_cases(device):
    empty = torch.empty(0, device=device)
    v, i = ops.topk_compress(empty, 0, residual=torch.empty(0, device=device))
    assert v.numel() == 0 and i.numel() == 0
    x = torch.tensor([1.0, float("nan"), -3.0, float("-inf"), 0.0], device=device)
    v, i = ops.topk_compress(x, 2)
    assert i.tolist() == [1, 3], "NaN and Inf have the largest magnitudes and must be sent"
    zeros = torch.zeros(1000, device=device)
    v, i = ops.topk_compress(zeros, 10)
    assert i.tolist() == list(range(10))
    r = torch.randn(100, device=device)
    old = r.clone()
    v, i = ops.topk_compress(torch.ones(100, device=device), 0, residual=r)
    assert v.numel() == 0 and torch.equal(r, old + 1), "k = 0 still accumulates into the residual"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_matches_reference(device, dtype):
    for n in [1, 10, 70_001]:
        out = torch.randn(n, device=device).to(dtype)
        for index_dtype in (torch.int64, torch.int32):
            k = max(1, n // 10)
            idx = torch.randperm(n, device=device)[:k].to(index_dtype)
            vals = torch.randn(k, device=device).to(dtype)
            expect = ref.scatter_add_(out.clone(), idx, vals)
            got = ops.scatter_add_(out.clone(), idx, vals)
            assert torch.equal(got, expect)


def test_scatter_add_duplicates_in_order_on_cpu():
    out = torch.zeros(4)
    ops.scatter_add_(out, torch.tensor([1, 1, 3, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert out.tolist() == [0.0, 7.0, 0.0, 3.0]


@pytest.mark.parametrize("device", DEVICES)
def test_decode_roundtrip(device):
    x = torch.randn(10_000, device=device)
    v, i = ops.topk_compress(x, 500)
    dense = ops.scatter_add_(torch.zeros_like(x), i, v)
    kept = dense != 0
    assert int(kept.sum()) == 500 and torch.equal(dense[kept], x[kept])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises(device):
    x = torch.randn(100, device=device)
    with pytest.raises(RuntimeError, match=r"k must be in \[0, x.numel\(\)\] = \[0, 100\], got 101"):
        ops.topk_compress(x, 101)
    with pytest.raises(RuntimeError, match="got -1"):
        ops.topk_compress(x, -1)
    with pytest.raises(RuntimeError, match="residual must have x's dtype"):
        ops.topk_compress(x, 5, residual=torch.zeros(100, dtype=torch.float16, device=device))
    with pytest.raises(RuntimeError, match="residual has 99 elements but x has 100"):
        ops.topk_compress(x, 5, residual=torch.zeros(99, device=device))
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.topk_compress(torch.arange(10, device=device), 5)
    with pytest.raises(RuntimeError, match="index_dtype must be int64 or int32"):
        ops.topk_compress(x, 5, index_dtype=torch.int16)
    with pytest.raises(RuntimeError, match="values must have out's dtype"):
        ops.scatter_add_(x.clone(), torch.tensor([1], device=device), torch.ones(1, dtype=torch.half, device=device))
    with pytest.raises(RuntimeError, match="indices has 2 elements but values has 1"):
        ops.scatter_add_(x.clone(), torch.tensor([1, 2], device=device), torch.ones(1, device=device))


def test_scatter_add_out_of_range_leaves_out_untouched():
    out = torch.zeros(5)
    with pytest.raises(RuntimeError, match="index 5 at position 1 is out of range for out with 5 elements"):
        ops.scatter_add_(out, torch.tensor([0, 5]), torch.ones(2))
    assert not bool(out.any())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(1000, device=device)
    torch.library.opcheck(torch.ops.pyparallel.topk_compress.default, (x, 10, None, None))
    torch.library.opcheck(torch.ops.pyparallel.topk_compress.default, (x, 10, torch.zeros_like(x), torch.int32))
    idx = torch.randperm(1000, device=device)[:10]
    torch.library.opcheck(torch.ops.pyparallel.scatter_add_.default, (torch.zeros_like(x), idx, torch.ones(10, device=device)))


def test_topk_exact_when_the_sample_misses_the_large_values():
    # White-box: every large value sits where the CPU's sampler does not look, so the bracket it derives
    # is wrong (far too many keys above it) and the exact fallback must take over.
    n = 1 << 20
    x = torch.randn(n) * 10
    x[cpu_sample_positions(n)] = torch.randn(1 << 16) * 1e-3
    for k in (n // 64, n // 2, n - 10):
        r = torch.zeros(n)
        values, indices = ops.topk_compress(x, k, residual=r)
        v_spec, i_spec = _spec(x, k)
        assert torch.equal(indices, i_spec) and torch.equal(values, v_spec)
