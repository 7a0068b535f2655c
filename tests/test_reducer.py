"""The one reducer (pyparallel.reducer) behind DataParallel and the pipeline's GradSync."""

import inspect
import random

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pyparallel
from pyparallel import hooks, reducer
from pyparallel.pipeline.grad_sync import GradSync
from pyparallel.train import make_model, parser


def _model(seed, dtype=torch.float32):
    return make_model(48, 2, seed).to(dtype)


def _local_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _reduce_directly(seed, dtype):
    """Reducer.reduce() after backward, and GradSync's default: the average of every rank's gradients."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6 * world, 64, generator=g, dtype=dtype), torch.randint(0, 10, (6 * world,), generator=g)
    local = [_local_grads(_model(seed, dtype), x.chunk(world)[r], y.chunk(world)[r]) for r in range(world)]
    expect = [sum(gs) / world for gs in zip(*local)]
    out = []
    for make in (lambda m: reducer.Reducer(m.parameters(), bucket_cap_mb=0.01, first_bucket_mb=0.01),
                 lambda m: GradSync(m.parameters(), dist.group.WORLD)):
        model = _model(seed, dtype)
        sync = make(model)
        hook = sync.comm_hook if isinstance(sync, reducer.Reducer) else sync._reducer.comm_hook
        assert hook is hooks.allreduce_hook
        _local_grads(model, x.chunk(world)[rank], y.chunk(world)[rank])
        sync.reduce()
        # float32: our ring sums in another order than `sum` here; float64 goes through torch's all_reduce.
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        for p, e in zip(model.parameters(), expect):
            torch.testing.assert_close(p.grad, e, **tol)
        out.append([p.grad.clone() for p in model.parameters()])
    return out


def _bad_hooks():
    def wrong_shape(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer()[:-1])
        return fut

    model = _model(0)
    dp = pyparallel.DataParallel(model, comm_hook=wrong_shape)
    try:
        dp(torch.randn(4, 64)).sum().backward()
    except TypeError as e:
        message = str(e)
    else:
        message = None
    sync = reducer.Reducer(model.parameters())
    sync.start()
    try:
        sync.finish()
    except RuntimeError as e:
        return message, str(e)
    return message, None


def _hooks_without_state():
    """pyparallel's hooks given without a state get one of the class they take (a plain HookState raised
    AttributeError: no 'block_size' / 'iteration' after backward); torch's hooks keep what they had."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    states = []
    for hook in (hooks.int8_hook, hooks.topk_hook, hooks.allreduce_hook):
        model = _model(0)
        dp = pyparallel.DataParallel(model, comm_hook=hook)
        dp(torch.randn(4, 64)).sum().backward()
        states.append(type(dp.hook_state))
    assert states == [hooks.Int8State, hooks.TopkState, hooks.HookState]
    assert reducer.state_for(default_hooks.allreduce_hook, None) is None
    sync = GradSync(_model(0).parameters(), dist.group.WORLD, default_hooks.allreduce_hook)
    assert sync._reducer.hook_state is dist.group.WORLD


def test_hooks_without_state_get_theirs(dist_pool):
    dist_pool(2).run(_hooks_without_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reduce_and_gradsync_default_average(dist_pool, dtype):
    results = dist_pool(2).run(_reduce_directly, random.randrange(2**20), dtype)
    for a, b in zip(results[0], results[1]):  # the same bits on both ranks
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_hook_result_and_early_finish(dist_pool):
    for message, early in dist_pool(2).run(_bad_hooks):
        assert message is not None and "comm hook must return a Future of the bucket's reduced 1-D tensor" in message
        assert early is not None and "not launched" in early


def test_defaults_are_defined_once():
    assert reducer.FIRST_BUCKET_MB == 1 and reducer.BUCKET_CAP_MB == 25 and reducer.BLOCK_SIZE == 256
    dp = inspect.signature(pyparallel.DataParallel).parameters
    assert dp["bucket_cap_mb"].default == reducer.BUCKET_CAP_MB
    assert dp["first_bucket_mb"].default == reducer.FIRST_BUCKET_MB
    args = parser().parse_args([])
    assert args.bucket_cap_mb == reducer.BUCKET_CAP_MB and args.block_size == reducer.BLOCK_SIZE
    assert hooks.Int8State().block_size == reducer.BLOCK_SIZE and pyparallel.Int8().block_size == reducer.BLOCK_SIZE
    with pytest.raises(ValueError, match="bucket sizes must be positive"):
        reducer.Reducer([nn.Parameter(torch.zeros(3))], bucket_cap_mb=0)
