"""The C++ ring all-reduce (dense, int8, top-k) in real spawned Gloo processes, world sizes 2 to 4.

Every rank builds all ranks' inputs from a shared seed, runs the collective on its own, and checks the
result against pyparallel.reference (which replays the ring's order of additions, so the comparison is
bitwise). The parent then checks that all ranks hold the same bits.
"""

import hashlib
import os
import random
import threading
import time

import pytest
import torch
import torch.distributed as dist

import pyparallel
from pyparallel import reference as ref

import topk_adversary

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 2, 3, 5, 16, 17, 1000, 4099, 65_537, 300_001]
WORLD_SIZES = [2, 3, 4]
_ops = torch.ops.pyparallel


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _all_inputs(seed, shape, dtype, world):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * (r + 1)).to(dtype) for r in range(world)]


def _all_reduce(*args, **kwargs):
    """pyparallel.all_reduce on the ring (these tests are about the ring; test_transport.py has the rest)."""
    return pyparallel.all_reduce(*args, transport="ring", **kwargs)


def _group():
    return dist.group.WORLD.group_name


# ---- worker-side cases (module level: they are pickled by reference) ----

def _dense_cases(seed):
    rank, n = dist.get_rank(), dist.get_world_size()
    digests = []
    for dtype in DTYPES:
        for numel in SIZES:
            for average in (False, True):
                xs = _all_inputs(seed + numel, (numel,), dtype, n)
                expect = ref.dense_all_reduce(xs, average)
                # default segments through the front door, and tiny segments (deep pipelines) through the op
                t = xs[rank].clone()
                _all_reduce(t, op="avg" if average else "sum")
                assert torch.equal(t, expect), (dtype, numel, average)
                t2 = xs[rank].clone()
                sent = _ops.ring_all_reduce_(t2, _group(), average, segment_bytes=256)
                assert torch.equal(t2, expect), (dtype, numel, average, "small segments")
                nbytes = numel * t.element_size()
                carried = nbytes <= ref.CARRY_BYTES  # a 1 KiB row with the header, then what did not fit
                assert sent <= (2 * nbytes if not carried else (n - 1) * (1024 + max(0, nbytes - (1024 - 56))))
                if dtype == torch.float32 and not average:
                    # Against Gloo's own all-reduce: two fp32 sums of n terms in different orders differ by at
                    # most 2 (n - 1) 2^-24 sum_i |x_i| per element.
                    gloo = xs[rank].clone()
                    dist.all_reduce(gloo)
                    bound = 2 * (n - 1) * 2.0**-24 * sum(x.abs() for x in xs)
                    assert bool(((t - gloo).abs() <= bound).all())
                digests.append(_digest(t))
    # torch's ReduceOp spellings mean the same; the ops we do not have are refused before anything moves
    xs = _all_inputs(seed, (1001,), torch.float32, n)
    for op, average in ((dist.ReduceOp.SUM, False), (dist.ReduceOp.AVG, True)):
        t = xs[rank].clone()
        _all_reduce(t, op=op)
        assert torch.equal(t, ref.dense_all_reduce(xs, average)), op
    for op in (dist.ReduceOp.MAX, "max", 0):
        with pytest.raises(ValueError, match="op must be 'sum' or 'avg'"):
            _all_reduce(xs[rank].clone(), op=op)
    # the ring's traffic: 2 (n - 1) / n of the tensor per rank
    x = torch.randn(16 * n * 1000)
    assert _ops.ring_all_reduce_(x, _group(), False) == 2 * (n - 1) * x.numel() // n * 4
    return digests


def _shape_cases(seed):
    rank, n = dist.get_rank(), dist.get_world_size()
    xs = _all_inputs(seed, (3, 7, 11), torch.float32, n)
    t = xs[rank].clone()
    _all_reduce(t)
    assert t.shape == (3, 7, 11) and torch.equal(t, ref.dense_all_reduce(xs))
    # non-contiguous input: reduced in place through a contiguous copy
    base = xs[rank].clone().transpose(0, 2)
    _all_reduce(base)
    assert torch.equal(base, ref.dense_all_reduce([x.transpose(0, 2) for x in xs]))
    return _digest(t)


def _int8_cases(seed):
    rank, n = dist.get_rank(), dist.get_world_size()
    digests = []
    for dtype in DTYPES:
        for numel in SIZES:
            for average in (False, True):
                for block in (256, 33):
                    xs = _all_inputs(seed + numel + block, (numel,), dtype, n)
                    t = xs[rank].clone()
                    _all_reduce(t, op="avg" if average else "sum", compression=pyparallel.Int8(block))
                    expect = ref.ring_all_reduce_int8(xs, average, block)
                    assert torch.equal(t, expect), (dtype, numel, average, block)
                    if 1000 < numel < 100_000:  # deep pipelines: segments of three blocks, through the op
                        t2 = xs[rank].clone()
                        _ops.ring_all_reduce_int8_(t2, _group(), average, block, segment_bytes=3 * block)
                        assert torch.equal(t2, expect), (dtype, numel, average, block, "small segments")
                    exact = sum(x.double() for x in xs) / (n if average else 1)
                    bound = ref.int8_ring_error_bound(xs, block) / (n if average else 1)
                    # fp32 arithmetic inside the ring and the final rounding to fp16/bf16 add to the stated bound.
                    slack = exact.abs() * (2.0**-8 if dtype == torch.bfloat16 else 2.0**-10 if dtype == torch.float16 else 1e-6)
                    assert bool(((t.double() - exact).abs() <= bound + slack).all()), (dtype, numel, average)
                    digests.append(_digest(t))
    # int8 sends about a quarter of fp32's bytes
    x = torch.randn(1 << 18)
    dense = _ops.ring_all_reduce_(x.clone(), _group(), False)
    int8 = _ops.ring_all_reduce_int8_(x.clone(), _group(), False, 256)
    assert int8 <= 0.27 * dense, (int8, dense)
    return digests


def _topk_cases(seed):
    rank, n = dist.get_rank(), dist.get_world_size()
    digests = []
    for dtype in DTYPES:
        for numel in [1, 7, 1000, 65_537]:
            for average in (False, True):
                k = max(1, numel // 100)
                residuals = [torch.zeros(numel, dtype=dtype) for _ in range(n)]
                mine = residuals[rank].clone()
                for step in range(3):
                    xs = _all_inputs(seed + numel + step, (numel,), dtype, n)
                    t = xs[rank].clone()
                    old = mine.clone()
                    _all_reduce(t, op="avg" if average else "sum",
                                          compression=pyparallel.Topk(k=k, residual=mine))
                    expect = ref.topk_all_reduce(xs, k, residuals, average)
                    assert torch.equal(t, expect), (dtype, numel, average, step)
                    assert torch.equal(mine, residuals[rank])
                    # error feedback: what this rank did not send stays in its residual
                    assert int((mine != old + xs[rank]).sum()) <= k
                    digests.append(_digest(t))
    # 1% top-k sends (n - 1) * k * (4 + 4) bytes (+ an 8-byte status per peer on the streamed fp32 path):
    # about 8% of one fp32 copy of the tensor per peer
    x = torch.randn(100_000)
    sent = _ops.topk_all_reduce_(x, _group(), 1000, None, False)
    assert sent == (n - 1) * (1000 * 8 + 8)
    sent = _ops.topk_all_reduce_(x.half(), _group(), 1000, None, False)
    assert sent == (n - 1) * 1000 * (4 + 2)
    return digests


def _topk_stream_cases(seed):
    """fp32 CPU tensors take the streamed path (Note [Streamed sparse all-gather]): several messages per
    peer sent during the selection, and the recovery when the selection's bracket misses, on some ranks
    only (the other ranks' streamed entries must stand)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    numel = (1 << 19) + 3
    digests = []
    makers = {
        "random": lambda g: torch.randn(numel, generator=g),
        "ties": lambda g: torch.randint(-3, 4, (numel,), generator=g).float(),  # many ties at the threshold
        "evading": lambda g: topk_adversary.evading(numel, g),        # threshold above the bracket
        "sample_only": lambda g: topk_adversary.sample_only(numel, g),  # threshold below the bracket
    }
    for case, make in makers.items():
        for k in (numel // 32, numel // 100):  # 4 and 2 messages of 4096 entries
            for average, feedback in ((False, True), (True, False)):
                residuals = [torch.zeros(numel) for _ in range(n)] if feedback else None
                mine = torch.zeros(numel) if feedback else None
                for step in range(2 if feedback else 1):
                    g = torch.Generator().manual_seed(seed + step)
                    # even ranks get the case, odd ranks plain noise: misses on some ranks only
                    xs = [make(g) if q % 2 == 0 else torch.randn(numel, generator=g) for q in range(n)]
                    t = xs[rank].clone()
                    old = None if mine is None else mine.clone()
                    sent = _ops.topk_all_reduce_(t, _group(), k, mine, average)
                    expect = ref.topk_all_reduce(xs, k, residuals, average)
                    assert torch.equal(t, expect), (case, k, average, step)
                    if feedback:
                        assert torch.equal(mine, residuals[rank]), (case, k, step)
                        assert int((mine != old + xs[rank]).sum()) <= k
                    missed = case in ("evading", "sample_only") and rank % 2 == 0
                    assert sent == (n - 1) * (k * 8 * (2 if missed else 1) + 8), (case, k, sent)
                    digests.append(_digest(t))
    return digests


def _async_progress():
    """A Python loop keeps running while a large all-reduce moves bytes in C++ (the GIL is released)."""
    t = torch.ones(8 << 20)
    t0 = time.perf_counter()
    fut = _all_reduce(t, async_op=True)
    spins = 0
    while not fut.done():
        spins += 1
    elapsed = time.perf_counter() - t0
    assert fut.wait() is t and bool((t == dist.get_world_size()).all())
    sync = torch.ones(8 << 20)
    assert _all_reduce(sync) is None and torch.equal(sync, t)
    return spins, elapsed


def _collective_from_callback():
    """A callback of one of our futures (it runs on the group's worker thread) may itself call
    all_reduce, sync or async, without deadlocking the worker."""
    n = dist.get_world_size()
    big, small = torch.ones(8 << 20), torch.full((1001,), 2.0)
    threads = []

    def callback(fut):
        threads.append(threading.current_thread().name)
        _all_reduce(small)                         # sync
        _all_reduce(small, async_op=True).wait()   # async
        return fut.value()

    _all_reduce(big, async_op=True).then(callback).wait()
    assert bool((big == n).all()) and bool((small == 2.0 * n * n).all())
    return threads


def _mismatch(kind):
    rank = dist.get_rank()
    if kind == "numel":
        t = torch.ones(100 + rank)
    elif kind == "numel_far":  # carried on rank 0, too large to carry elsewhere: rows of one size anyway
        t = torch.ones(10 if rank == 0 else 50_000)
    elif kind == "compression":
        t = torch.ones(1000)
    elif kind == "dtype":
        t = torch.ones(100, dtype=torch.float32 if rank == 0 else torch.float16)
    elif kind == "op":
        t = torch.ones(100)
    elif kind == "unsupported":
        t = torch.ones(100, dtype=torch.float64)
    before = t.clone()
    try:
        if kind == "op":
            _all_reduce(t, op="avg" if rank == 0 else "sum")
        elif kind == "compression":
            _all_reduce(t, compression="int8" if rank == 1 else None)
        else:
            _all_reduce(t)
    except RuntimeError as e:
        assert torch.equal(t, before), "a failed collective must not touch the tensor"
        msg = str(e).splitlines()[0]
    else:
        msg = None
    # the group is still usable afterwards
    ok = torch.ones(10)
    _all_reduce(ok)
    assert bool((ok == dist.get_world_size()).all())
    return msg


def _die_mid_operation(kind):
    """Rank 1 exits while collectives are running; the others must raise within the group's timeout."""
    t = torch.randn(8 << 20)
    compression = {"dense": None, "int8": "int8",
                   "topk": pyparallel.Topk(ratio=0.01, residual=torch.zeros_like(t))}[kind]  # the streamed path
    if dist.get_rank() == 1:
        threading.Timer(0.5, lambda: os._exit(17)).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            _all_reduce(t, op="avg", compression=compression)
        except RuntimeError as e:
            return time.monotonic() - t0, str(e).splitlines()[0]
    return None, None


# ---- tests ----

@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_dense_ring_bitwise_vs_reference_and_gloo(dist_pool, world_size):
    digests = dist_pool(world_size).run(_dense_cases, random.randrange(2**30), timeout=300)
    assert all(d == digests[0] for d in digests), "ranks disagree"


@pytest.mark.parametrize("world_size", [2, 3])
def test_shapes_and_non_contiguous(dist_pool, world_size):
    digests = dist_pool(world_size).run(_shape_cases, random.randrange(2**30))
    assert len(set(digests)) == 1


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_int8_ring_bitwise_vs_reference_and_error_bound(dist_pool, world_size):
    digests = dist_pool(world_size).run(_int8_cases, random.randrange(2**30), timeout=300)
    assert all(d == digests[0] for d in digests), "ranks disagree"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_topk_sparse_allgather_exact(dist_pool, world_size):
    digests = dist_pool(world_size).run(_topk_cases, random.randrange(2**30), timeout=300)
    assert all(d == digests[0] for d in digests), "ranks disagree"


@pytest.mark.parametrize("world_size", [2, 3])
def test_topk_streamed_path_exact_even_when_the_sample_misses(dist_pool, world_size):
    digests = dist_pool(world_size).run(_topk_stream_cases, random.randrange(2**30), timeout=300)
    assert all(d == digests[0] for d in digests), "ranks disagree"


def test_async_leaves_the_python_thread_free(dist_pool):
    results = dist_pool(2).run(_async_progress)
    for spins, elapsed in results:
        # With the GIL held for the whole collective the loop could not run at all.
        assert spins > 1000, f"only {spins} loop iterations during a {elapsed * 1e3:.0f} ms all-reduce"


def test_all_reduce_from_a_future_callback_does_not_deadlock(dist_pool):
    for threads in dist_pool(2).run(_collective_from_callback, timeout=60):
        # the 8M all-reduce is still running when .then() registers, so the callback runs on the worker
        assert threads and threads[0].startswith("pyparallel-"), threads


@pytest.mark.parametrize("kind,expect", [
    ("numel", "ranks disagree on the numel (rank 0: 100, rank 1: 101"),
    ("numel_far", "ranks disagree on the numel (rank 0: 10, rank 1: 50000"),
    ("compression", "ranks disagree on the collective (rank 0: "),
    ("dtype", "ranks disagree on the dtype (rank 0: Float, rank 1: Half"),
    ("op", "ranks disagree on the reduction (rank 0: average, rank 1: sum"),
    ("unsupported", "tensor must be float32, float16 or bfloat16, got Double"),
])
def test_mismatch_raises_on_every_rank(dist_pool, kind, expect):
    messages = dist_pool(3).run(_mismatch, kind, timeout=60)
    for msg in messages:
        assert msg is not None and expect in msg, msg
    # every rank raises the same error (the op named first is each rank's own: dense or int8)
    assert len({m.split(": ", 1)[1] for m in messages}) == 1, messages


@pytest.mark.parametrize("kind", ["dense", "int8", "topk"])
def test_dead_rank_makes_the_others_raise_within_the_timeout(kind):
    from dist_harness import WorkerPool

    pool = WorkerPool(2, pg_timeout_s=5)
    try:
        outcomes = pool.outcomes(_die_mid_operation, kind, timeout=60)
    finally:
        pool.kill()
    assert outcomes[1][0] == "died"
    status, value = outcomes[0]
    assert status == "ok", value
    elapsed, message = value
    assert message is not None, "the surviving rank must raise"
    assert elapsed < 5 + 10, f"raised after {elapsed:.1f} s, group timeout 5 s"
