"""int8 quantize / dequantize / dequantize_add_ against pyparallel.reference, on every device."""

import math

import pytest
import torch

from pyparallel import ops
from pyparallel import reference as ref

from conftest import DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 2, 7, 31, 255, 256, 257, 1000, 4099, 65537]
BLOCKS = [1, 3, 64, 256, 1000]


def _shapes(n):
    """1-D, and an n-D shape with the same numel where one exists."""
    yield (n,)
    if n % 7 == 0 and n:
        yield (7, n // 7)
    elif n % 2 == 0 and n:
        yield (2, 1, n // 2)


def _random(shape, dtype, device):
    # Mixed magnitudes per block so that scales differ, with exact zeros sprinkled in.
    x = torch.randn(shape, device=device) * torch.exp(2 * torch.randn(shape, device=device))
    x[torch.rand(shape, device=device) < 0.05] = 0
    return x.to(dtype)


def _assert_same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCKS)
def test_quantize_matches_reference_bitwise(device, dtype, block_size):
    for n in SIZES:
        for shape in _shapes(n):
            x = _random(shape, dtype, device)
            q, s = ops.quantize_int8(x, block_size)
            q_ref, s_ref = ref.quantize_int8(x, block_size)
            _assert_same(q, q_ref)
            _assert_same(s, s_ref)
            for out_dtype in DTYPES:
                _assert_same(ops.dequantize_int8(q, s, block_size, out_dtype),
                             ref.dequantize_int8(q, s, block_size, out_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_error_within_half_a_step(device, dtype):
    # |x - q*scale| <= scale/2 from rounding; fp32 rounding of inv, x*inv, scale and q*scale adds at most
    # 4 * 127 * 2^-24 * scale < 3.1e-5 * scale (|x| <= 127 * scale), so the bound checked is (0.5 + 1e-4) * scale.
    for block_size in BLOCKS:
        x = _random((40_000,), dtype, device)
        q, s = ops.quantize_int8(x, block_size)
        err = (ops.dequantize_int8(q, s, block_size) - x.float()).abs()
        per_elem_scale = s.repeat_interleave(block_size)[: x.numel()]
        assert bool((err <= (0.5 + 1e-4) * per_elem_scale).all())
        assert int(q.abs().max()) <= 127


@pytest.mark.parametrize("device", DEVICES)
def test_special_blocks(device):
    bs = 4
    x = torch.tensor([0, 0, 0, 0,                      # all zero
                      1, -2, 3, 4,                     # normal
                      1, float("nan"), 2, 3,           # NaN
                      1, float("inf"), -1, 0,          # Inf
                      1e-38, -1e-37, 0, 0,             # below 2^-120: flushed to zero
                      -127, 127, 0.5, -0.5],           # exact steps, half-to-even
                     device=device)
    q, s = ops.quantize_int8(x, bs)
    assert s[0] == 0 and not bool(q[:4].any())
    assert math.isnan(s[2]) and not bool(q[8:12].any())
    assert math.isinf(s[3]) and not bool(q[12:16].any())
    assert s[4] == 0 and not bool(q[16:20].any())
    assert q[20:24].tolist() == [-127, 127, 0, 0]  # 0.5 and -0.5 round to even (0)
    d = ops.dequantize_int8(q, s, bs)
    assert bool(torch.isnan(d[8:16]).all()), "non-finite blocks must decode to NaN so they cannot go unnoticed"
    assert bool(torch.isfinite(d[:8]).all()) and bool(torch.isfinite(d[16:]).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [1, 5, 256, 999])
def test_dequantize_add_matches_reference_bitwise(device, block_size):
    for n in SIZES:
        x = _random((n,), torch.float32, device)
        q, s = ops.quantize_int8(x, block_size)
        acc = torch.randn(n, device=device)
        expect = ref.dequantize_add_(acc.clone(), q, s, block_size)
        out = ops.dequantize_add_(acc, q, s, block_size)
        assert out is acc
        _assert_same(acc, expect)


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_views(device):
    # Slices that start mid-buffer (as ring chunks do) take the scalar paths on CUDA.
    base = _random((10_001,), torch.float32, device)
    for off in (1, 3, 5):
        x = base[off:]
        q, s = ops.quantize_int8(x, 256)
        q_ref, s_ref = ref.quantize_int8(x, 256)
        _assert_same(q, q_ref)
        _assert_same(s, s_ref)
        qbuf = torch.zeros(q.numel() + off, dtype=torch.int8, device=device)
        qbuf[off:] = q
        acc = torch.zeros(q.numel() + off, device=device)
        ops.dequantize_add_(acc[off:], qbuf[off:], s, 256)
        _assert_same(acc[off:], ref.dequantize_int8(q, s, 256))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_is_unbiased(device, dtype):
    # Each element's code is floor(v) or floor(v) + 1 with v = x * 127 / absmax, and E[q] = v.
    # Hoeffding: S = sum over N elements and M draws of (q - v), each term within an interval of length 1,
    # so P(|S| >= t) <= 2 exp(-2 t^2 / (N M)). With t = sqrt(N M ln(2e9) / 2) a correct kernel fails with
    # probability below 1e-9, while a bias of 0.005 per draw (round-to-nearest shows ~0.25) exceeds t.
    n, draws, bs = 4096, 200, 256
    x = _random((n,), dtype, device)
    _, s = ops.quantize_int8(x, bs)
    blocks, _ = ref._blocks(x, bs)
    absmax = blocks.abs().amax(dim=1)
    v = (blocks * (torch.full_like(absmax, 127.0) / absmax)[:, None]).reshape(-1)[:n]
    total = torch.zeros((), dtype=torch.float64, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(torch.randint(0, 2**62, ()).item())
    for _ in range(draws):
        q, s2 = ops.quantize_int8(x, bs, stochastic=True, generator=gen)
        _assert_same(s2, s)
        qf = q.double()
        lo = torch.floor(v).double()
        assert bool(((qf == lo) | (qf == lo + 1)).all()), "stochastic codes must be floor(v) or floor(v) + 1"
        total += (qf - v.double()).sum()
    t = math.sqrt(n * draws * math.log(2e9) / 2)
    assert abs(total.item()) < t, f"bias {total.item() / (n * draws):.4f} per draw"
    assert t / (n * draws) < 0.005


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_follows_the_generator(device):
    x = torch.randn(10_000, device=device)
    g1, g2 = torch.Generator(device=device), torch.Generator(device=device)
    g1.manual_seed(7)
    g2.manual_seed(7)
    a, _ = ops.quantize_int8(x, 256, stochastic=True, generator=g1)
    b, _ = ops.quantize_int8(x, 256, stochastic=True, generator=g2)
    c, _ = ops.quantize_int8(x, 256, stochastic=True, generator=g1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises(device):
    x = torch.randn(100, device=device)
    q, s = ops.quantize_int8(x, 10)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.quantize_int8(torch.ones(10, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.quantize_int8(x.double())
    with pytest.raises(RuntimeError, match="block_size must be positive"):
        ops.quantize_int8(x, 0)
    with pytest.raises(RuntimeError, match="scales has 9 elements"):
        ops.dequantize_int8(q, s[:9], 10)
    with pytest.raises(RuntimeError, match="q must be int8"):
        ops.dequantize_int8(q.int(), s, 10)
    with pytest.raises(RuntimeError, match="acc must be a float32 accumulator"):
        ops.dequantize_add_(x.half(), q, s, 10)
    with pytest.raises(RuntimeError, match="acc has 99 elements"):
        ops.dequantize_add_(x[:99].clone(), q, s, 10)
    with pytest.raises(RuntimeError, match="dtype must be float32"):
        ops.dequantize_int8(q, s, 10, torch.int32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_raises():
    q, s = ops.quantize_int8(torch.randn(100, device="cuda"), 10)
    with pytest.raises(RuntimeError, match="acc is on cpu but q is on cuda"):
        ops.dequantize_add_(torch.zeros(100), q, s, 10)
    with pytest.raises(RuntimeError, match="q is on cuda:0 but scales is on cpu"):
        ops.dequantize_int8(q, s.cpu(), 10)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(3, 100, device=device)
    q, s = ops.quantize_int8(x, 64)
    torch.library.opcheck(torch.ops.pyparallel.quantize_int8.default, (x, 64, False, None))
    torch.library.opcheck(torch.ops.pyparallel.quantize_int8.default, (x.half(), 7, False, None))
    torch.library.opcheck(torch.ops.pyparallel.dequantize_int8.default, (q, s, 64, torch.bfloat16))
    torch.library.opcheck(torch.ops.pyparallel.dequantize_add_.default, (torch.zeros(3, 100, device=device), q, s, 64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_into_fused_hop_matches_reference(device, dtype):
    for n in [1, 255, 4099, 65_537]:
        for block_size in (256, 33):
            x = _random((n,), dtype, device)
            add_q, add_s = ops.quantize_int8(_random((n,), torch.float32, device), block_size)
            for add in (False, True):
                for divisor in (1.0, 3.0, 4.0):
                    q = torch.empty(n, dtype=torch.int8, device=device)
                    s = torch.empty(-(-n // block_size), device=device)
                    q_ref, s_ref = torch.empty_like(q), torch.empty_like(s)
                    args = (add_q, add_s) if add else (None, None)
                    ops.quantize_int8_into_(q, s, x, block_size, *args, divisor)
                    ref.quantize_int8_into_(q_ref, s_ref, x, block_size, *args, divisor)
                    _assert_same(q, q_ref)
                    _assert_same(s, s_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_into_matches_reference(device, dtype):
    x = _random((10_007,), torch.float32, device)
    q, s = ops.quantize_int8(x, 100)
    out = torch.empty(10_007, dtype=dtype, device=device)
    assert ops.dequantize_int8_into_(out, q, s, 100) is out
    _assert_same(out, ref.dequantize_int8(q, s, 100, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_into_ops_bad_input(device):
    x = torch.randn(100, device=device)
    q, s = ops.quantize_int8(x, 10)
    with pytest.raises(RuntimeError, match="pass both add_q and add_scales, or neither"):
        ops.quantize_int8_into_(q, s, x, 10, q, None)
    with pytest.raises(RuntimeError, match="divisor must be finite and non-zero"):
        ops.quantize_int8_into_(q, s, x, 10, divisor=0.0)
    with pytest.raises(RuntimeError, match="q has 100 elements but x has 99"):
        ops.quantize_int8_into_(q, s, x[:99], 10)
    with pytest.raises(RuntimeError, match="out has 99 elements but q has 100"):
        ops.dequantize_int8_into_(torch.empty(99, device=device), q, s, 10)
    with pytest.raises(RuntimeError, match="out must be float32"):
        ops.dequantize_int8_into_(torch.empty(100, dtype=torch.int32, device=device), q, s, 10)


@pytest.mark.parametrize("device", DEVICES)
def test_into_ops_opcheck(device):
    x = torch.randn(300, device=device)
    q, s = ops.quantize_int8(x, 64)
    torch.library.opcheck(torch.ops.pyparallel.quantize_int8_into_.default,
                          (torch.empty_like(q), torch.empty_like(s), x, 64, q, s, 2.0))
    torch.library.opcheck(torch.ops.pyparallel.dequantize_int8_into_.default, (torch.empty_like(x), q, s, 64))
