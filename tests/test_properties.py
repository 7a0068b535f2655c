"""Property tests (hypothesis): the int8 codec, exact top-k with error feedback, and the ring partition.

The example-based tests pin chosen sizes and distributions; these let hypothesis pick the inputs (odd
sizes, subnormals, ties, zeros, NaN/Inf, tiny and huge magnitudes in one block) and shrink any failure to
a small case. Kept fast: bounded ``max_examples``, small tensors, no deadline (a shared 2-core machine).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyparallel import ops
from pyparallel import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FINITE_MAX = {torch.float32: 2.0**127, torch.float16: 65504.0, torch.bfloat16: 2.0**127}  # exact in fp32
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw, max_numel=600, specials=False, ties=False):
    """A 1-D tensor of a drawn dtype: floats of any exponent (subnormals and zeros included) scaled per
    draw, or few distinct small integers (many ties), optionally with NaN/Inf sprinkled in."""
    dtype = draw(st.sampled_from(DTYPES))
    numel = draw(st.integers(0, max_numel))
    if ties and draw(st.booleans()):
        values = draw(st.lists(st.integers(-3, 3), min_size=numel, max_size=numel))
    else:
        bound = FINITE_MAX[dtype]
        element = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
        values = draw(st.lists(element, min_size=numel, max_size=numel))
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    if specials and numel:
        for _ in range(draw(st.integers(0, 3))):
            x[draw(st.integers(0, numel - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return x


# ---- int8 codec ----

@FAST
@given(x=tensors(specials=True), block_size=st.integers(1, 300))
def test_int8_codec_matches_reference_and_scales_are_absmax_over_127(x, block_size):
    q, s = ops.quantize_int8(x, block_size)
    q_ref, s_ref = ref.quantize_int8(x, block_size)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)
    assert s.numel() == math.ceil(x.numel() / block_size) and q.dtype == torch.int8
    assert int(q.abs().max()) <= 127 if q.numel() else True
    if not x.numel():
        return
    nb = s.numel()
    blocks = torch.nn.functional.pad(x.float(), (0, nb * block_size - x.numel())).view(nb, block_size)
    qb = torch.nn.functional.pad(q.view(-1), (0, nb * block_size - x.numel())).view(nb, block_size)
    has_nan, has_inf = torch.isnan(blocks).any(1), torch.isinf(blocks).any(1)
    # Non-finite blocks: the scale says so (NaN if any NaN, else +Inf), q is 0.
    assert bool(torch.isnan(s[has_nan]).all()) and not bool(qb[has_nan].any())
    inf_only = has_inf & ~has_nan
    assert bool((s[inf_only] == math.inf).all()) and not bool(qb[inf_only].any())
    finite = ~(has_nan | has_inf)
    m = blocks[finite].abs().amax(1)
    tiny = m < ref.MIN_ABSMAX  # all zero, or too small for 127 / absmax: scale 0, q 0
    assert not bool(s[finite][tiny].any()) and not bool(qb[finite][tiny].any())
    # scale = absmax / 127, one correctly rounded fp32 division; the absmax element maps to +-127
    normal = m[~tiny]
    assert torch.equal(s[finite][~tiny], normal / torch.full_like(normal, 127.0))
    assert bool((qb[finite][~tiny].abs().amax(1) == 127).all())


@FAST
@given(x=tensors(), block_size=st.integers(1, 300), stochastic=st.booleans(), seed=st.integers(0, 2**31))
def test_int8_error_within_a_rounding_step_of_the_scale(x, block_size, stochastic, seed):
    # Nearest rounding errs by at most scale / 2, stochastic rounding by less than one scale. The fp32
    # roundings of 127 / m, x * inv and q * scale add at most 4 * 127 * 2^-24 < 3.1e-5 scales (Note [Int8
    # arithmetic]); a scale in fp32's subnormal range (absmax < 127 * 2^-126) is rounded to a multiple of
    # 2^-149, which q * scale can amplify up to 127 * 2^-149 (absolute). Blocks with absmax below 2^-120
    # quantize to zero, an error of at most that absmax.
    gen = torch.Generator().manual_seed(seed)
    q, s = ops.quantize_int8(x, block_size, stochastic=stochastic, generator=gen)
    err = (ops.dequantize_int8(q, s, block_size) - x.float()).abs()
    step = s.repeat_interleave(block_size)[:x.numel()].double()
    absmax = torch.stack([b.abs().max() for b in x.float().split(block_size)]) if x.numel() else torch.zeros(0)
    absmax = absmax.repeat_interleave(block_size)[:x.numel()].double()
    bound = (1.0 if stochastic else 0.5) * step + 3.1e-5 * step + 127 * 2.0**-149
    bound = torch.where(absmax < ref.MIN_ABSMAX, absmax, bound)
    assert bool((err.double() <= bound).all()), (err.double() - bound).max().item()


# ---- top-k with error feedback ----

def _spec(y: torch.Tensor, k: int) -> list[int]:
    """The documented rule: largest |y| first, NaN larger than any number, ties to the lower index;
    returned in ascending index order."""
    vals = y.float().tolist()
    order = sorted(range(len(vals)), key=lambda i: (not math.isnan(vals[i]), -abs(vals[i]) if not math.isnan(vals[i]) else 0, i))
    return sorted(order[:k])


@FAST
@given(data=st.data(), x=tensors(max_numel=400, specials=True, ties=True), with_residual=st.booleans(),
       index_dtype=st.sampled_from([torch.int64, torch.int32]))
def test_topk_selects_exactly_and_keeps_the_error_feedback_invariant(data, x, with_residual, index_dtype):
    k = data.draw(st.integers(0, x.numel()))
    residual = old = None
    if with_residual:
        old = (torch.randn(x.numel()) * data.draw(st.sampled_from([0.0, 1e-3, 1.0, 100.0]))).to(x.dtype)
        residual = old.clone()
    y = x if residual is None else residual + x  # what the selection must rank, in x's dtype
    values, indices = ops.topk_compress(x, k, residual=residual, index_dtype=index_dtype)
    assert indices.dtype == index_dtype and values.dtype == x.dtype and values.numel() == k
    assert indices.tolist() == _spec(y, k), "exact selection by the tie rule"
    torch.testing.assert_close(values, y[indices.long()], rtol=0, atol=0, equal_nan=True)
    if residual is not None:
        # residual_new + scatter(values, indices) == residual_old + x, exactly
        rebuilt = residual.clone()
        rebuilt[indices.long()] += values
        torch.testing.assert_close(rebuilt, y, rtol=0, atol=0, equal_nan=True)
        assert not bool(residual[indices.long()].any()), "what was sent leaves the residual"
    v_ref, i_ref = ref.topk_compress(x, k, None if residual is None else old.clone(), index_dtype)
    assert torch.equal(i_ref, indices)


# ---- the ring partition ----

@settings(max_examples=400, deadline=None)
@given(numel=st.one_of(st.integers(0, 10**4), st.integers(0, 10**9)), n=st.integers(1, 64),
       align=st.sampled_from([1, 2, 16, 64, 256, 1000]),
       segment_elems=st.one_of(st.integers(0, 64), st.integers(0, 1 << 22), st.integers(1 << 22, 1 << 31)))
def test_ring_partition_covers_every_element_exactly_once(numel, n, align, segment_elems):
    per_chunk = math.ceil(math.ceil(numel / n) / align) * align
    assume(per_chunk <= 4096 * max(align, segment_elems))  # the segment list stays short enough to walk
    parts = ref.ring_partition(numel, n, align, segment_elems)
    assert len(parts) == n and len({len(p) for p in parts}) == 1, "every chunk has the same segment count"
    position = 0
    for c, segments in enumerate(parts):
        chunk_start = segments[0].start
        for seg in segments:  # segments of a chunk follow each other, chunks follow each other
            assert seg.start == position and seg.start <= seg.stop, (c, seg, position)
            position = seg.stop
        size = position - chunk_start
        if position < numel:  # every chunk but the one reaching the end is a whole number of alignments
            assert size % align == 0 and size > 0
    assert position == numel, "the chunks end exactly at numel: nothing left out, nothing twice"
    per_chunk = parts[0][-1].stop - parts[0][0].start
    assert per_chunk >= math.ceil(numel / n) or per_chunk == numel, "n chunks are enough"
    assert len(parts[0]) >= 1


@settings(max_examples=200, deadline=None)
@given(numel=st.integers(0, 10**7), n=st.integers(1, 64))
def test_shm_regions_cover_every_element_exactly_once(numel, n):
    regions = ref.shm_regions(numel, n)
    assert len(regions) == n
    position = 0
    for r in regions:
        assert r.start == position and r.start <= r.stop
        position = r.stop
    assert position == numel


# The real C++ ring, for sizes and segment lengths hypothesis picks, in the shared worker pools: every
# element is reduced exactly once (a missed element would keep the rank's own value, a doubled one would
# count some rank twice).

def _ring_covers_once(numel, segment_bytes):
    import torch.distributed as dist

    rank, n = dist.get_rank(), dist.get_world_size()
    pattern = torch.arange(numel, dtype=torch.float32) % 7 + 1  # small integers: sums are exact
    t = pattern * (rank + 1)
    torch.ops.pyparallel.ring_all_reduce_(t, dist.group.WORLD.group_name, False, segment_bytes)
    dense_ok = torch.equal(t, pattern * (n * (n + 1) // 2))
    g = torch.Generator().manual_seed(numel)
    xs = [torch.randn(numel, generator=g) for _ in range(n)]
    t8 = xs[rank].clone()
    torch.ops.pyparallel.ring_all_reduce_int8_(t8, dist.group.WORLD.group_name, False, 64, segment_bytes)
    int8_ok = torch.equal(t8, ref.ring_all_reduce_int8(xs, False, 64))
    return dense_ok, int8_ok


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_reduces_every_element_exactly_once(dist_pool, world_size):
    pool = dist_pool(world_size)

    @settings(max_examples=15, deadline=None)
    @given(numel=st.integers(0, 3000), segment_bytes=st.sampled_from([64, 100, 256, 1024, 4096, 1 << 20]))
    def check(numel, segment_bytes):
        for dense_ok, int8_ok in pool.run(_ring_covers_once, numel, segment_bytes, timeout=60):
            assert dense_ok, ("dense", numel, segment_bytes)
            assert int8_ok, ("int8", numel, segment_bytes)

    check()
