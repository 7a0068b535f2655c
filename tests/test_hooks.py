"""Communication hooks under torch's DDP and under pyparallel.DataParallel, in spawned Gloo ranks."""

import pickle
import random
import threading
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pyparallel
from pyparallel import comm, hooks
from pyparallel.train import load_digits_split, make_model

from dist_harness import assert_resume_is_bitwise, train_cli

# These tests are about the hooks' compression, which applies across hosts only: they run the ring
# (test_transport.py covers "auto").
HOOKS = {
    "allreduce": (hooks.allreduce_hook, lambda: hooks.HookState(transport="ring")),
    "fp16": (hooks.fp16_hook, lambda: hooks.HookState(transport="ring")),
    "bf16": (hooks.bf16_hook, lambda: hooks.HookState(transport="ring")),
    "int8": (hooks.int8_hook, lambda: hooks.Int8State(transport="ring")),
    "topk": (hooks.topk_hook, lambda: hooks.TopkState(ratio=0.05, transport="ring")),
}


def _bound(name, n, g_ref, m):
    """Allowed |hooked - full-batch| per element; m = the largest |local gradient| on any rank.

    allreduce: fp32 reassociation only (the batch is split across ranks, so sums run in another order).
    fp16/bf16: the cast of g/n and the n - 1 per-hop roundings each err by at most 2^-11 (2^-8) of a
        partial sum, and partial sums are at most m in magnitude: 2n * eps * m is a safe bound.
    int8: ((1 + 1/254)^n - 1) * (sum of the ranks' block absmaxes) / n <= ((1 + 1/254)^n - 1) * m
        (pyparallel.Int8), plus fp32 rounding.
    """
    if name == "allreduce":
        return 1e-5 * g_ref.abs() + 1e-6 * m
    if name in ("fp16", "bf16"):
        return 2 * n * (2.0**-11 if name == "fp16" else 2.0**-8) * m
    return ((1 + 1 / 254) ** n - 1) * m * (1 + 1e-5) + 1e-6 * m


def _batch(seed, n=120):  # divisible by every world size used, so shard means average to the batch mean
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _reference_grads(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _shard(t, rank, world):
    return t.chunk(world)[rank]


# ---- worker-side cases ----

def _gradients_match_full_batch(seed, wrapper):
    """Each rank backpropagates its shard; the hooked average must match one process on the full batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = _batch(seed)
    expect = _reference_grads(make_model(128, 2, seed), x, y)
    local = [_reference_grads(make_model(128, 2, seed), _shard(x, r, world), _shard(y, r, world)) for r in range(world)]
    m = max(g.abs().max().item() for grads in local for g in grads)
    out = {}
    for name, (hook, make_state) in HOOKS.items():
        if name == "topk":
            continue
        model = make_model(128, 2, seed)
        if wrapper == "torch":
            wrapped = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.05)
            wrapped.register_comm_hook(make_state(), hook)
        else:
            wrapped = pyparallel.DataParallel(model, bucket_cap_mb=0.05, first_bucket_mb=0.01, comm_hook=hook,
                                              hook_state=make_state())
        nn.functional.cross_entropy(wrapped(_shard(x, rank, world)), _shard(y, rank, world)).backward()
        for p, g in zip(model.parameters(), expect):
            assert p.grad is not None
            bound = _bound(name, world, g, m)
            assert bool(((p.grad - g).abs() <= bound).all()), (name, wrapper, (p.grad - g).abs().max().item(), m)
        out[name] = [p.grad.clone() for p in model.parameters()]
    return out


def _topk_trains_under_ddp(seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y, _, _ = load_digits_split(seed)
    model = make_model(64, 1, seed)
    state = hooks.TopkState(ratio=0.05, warmup_steps=2, transport="ring")
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(state, hooks.topk_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(40):
        idx = torch.arange(step * 64, (step + 1) * 64) % len(x)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(_shard(x[idx], rank, world)), _shard(y[idx], rank, world))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert state.iteration == 40 and state.residuals, "error feedback kept a residual per bucket"
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, state.bytes_sent


def _overlap_events(seed):
    """Record when bucket communication starts (on the worker thread) and when gradients become ready."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    model = nn.Sequential(*layers)
    log, lock = [], threading.Lock()

    def stamp(what):
        with lock:
            log.append((what, time.perf_counter_ns()))

    def logging_hook(state: hooks.HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        return comm.submit(bucket.buffer(), None, "avg", on_start=lambda: stamp(("comm_start", bucket.index())))

    dp = pyparallel.DataParallel(model, bucket_cap_mb=1, first_bucket_mb=1, comm_hook=logging_hook)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: stamp(("grad", 0)))
    dp(torch.randn(256, 512)).sum().backward()
    starts = [t for (what, _), t in log if what == "comm_start"]
    grads = [t for (what, _), t in log if what == "grad"]
    launches = [b for what, b in dp.events if what == "launch"]
    end_at = [i for i, (what, _) in enumerate(dp.events) if what == "end"][0]
    return len(dp.bucket_sizes), launches, end_at, [e for e, _ in dp.events].index("launch"), min(starts), max(grads)


def _no_sync_accumulates(seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    x1, y1 = _batch(seed)
    x2, y2 = _batch(seed + 1)
    ref_model = make_model(64, 1, seed)
    ref_model.zero_grad()
    (nn.functional.cross_entropy(ref_model(x1), y1) + nn.functional.cross_entropy(ref_model(x2), y2)).backward()
    model = make_model(64, 1, seed)
    dp = pyparallel.DataParallel(model)
    with dp.no_sync():
        nn.functional.cross_entropy(dp(_shard(x1, rank, world)), _shard(y1, rank, world)).backward()
    local = [p.grad.clone() for p in model.parameters()]
    nn.functional.cross_entropy(dp(_shard(x2, rank, world)), _shard(y2, rank, world)).backward()
    for p, g in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, g.grad, rtol=1e-5, atol=1e-6)
    return [t.sum().item() for t in local]


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        return self.used(self.body(x))


def _unused_parameters(find_unused):
    torch.manual_seed(0)
    dp = pyparallel.DataParallel(_TwoHeads(), find_unused_parameters=find_unused)
    try:
        dp(torch.randn(4, 8)).sum().backward()
    except RuntimeError as e:
        return str(e)
    return [p.grad.abs().sum().item() for p in dp.module.unused.parameters()]


def _second_backward_through_one_forward():
    """A second backward through a forward whose gradients were already averaged must raise, not leave
    this rank's part local (the ranks' gradients would silently diverge); inside no_sync() it is meant
    to stay local, and a new forward makes the next backward reduce again."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = make_model(16, 1, 0)
    dp = pyparallel.DataParallel(model)
    x = torch.randn(4, 64) + rank
    out = dp(x)
    out.square().mean().backward(retain_graph=True)
    try:
        out.abs().mean().backward(retain_graph=True)
    except RuntimeError as e:
        message = str(e)
    else:
        message = None
    with dp.no_sync():  # on purpose: stays local
        out.abs().mean().backward()
    model.zero_grad()
    dp(x).square().mean().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, grads)
    return message, all(torch.equal(g, grads) for g in everyone)


def _hook_errors(states, make_model, x, errors) -> dict:
    """{(hook name, wrapper): message} of the errors one forward + backward of ``make_model()`` on ``x``
    raises under each hook of ``states`` ({name: (hook, make_state)}), with torch's DDP and with ours."""
    out = {}
    for name, (hook, make_state) in states.items():
        for wrapper in ("torch", "pyparallel"):
            torch.manual_seed(0)
            model = make_model()
            if wrapper == "torch":
                wrapped = nn.parallel.DistributedDataParallel(model)
                wrapped.register_comm_hook(make_state(), hook)
            else:
                wrapped = pyparallel.DataParallel(model, comm_hook=hook, hook_state=make_state())
            try:
                wrapped(x).sum().backward()
            except errors as e:
                out[name, wrapper] = str(e)
    return out


def _sparse_gradients_are_refused():
    """nn.Embedding(sparse=True) under every hook (torch's DDP and ours) and a sparse tensor at the front
    door: a clear error naming the problem, not a failure deep inside an op."""
    rank = dist.get_rank()
    states = dict(HOOKS, powersgd=(hooks.powersgd_hook, lambda: hooks.PowerSGDState(start_powerSGD_iter=0)))
    out = _hook_errors(states, lambda: nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2)),
                       torch.tensor([rank, 3]), (RuntimeError, ValueError))
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2), (4,))
    for async_op in (False, True):
        try:
            pyparallel.all_reduce(sparse, async_op=async_op)
        except ValueError as e:
            out["all_reduce", async_op] = str(e)
    return out


def _float64_bucket_under_compressed_hooks():
    """A float64 bucket: allreduce_hook averages it with torch; a compressed hook refuses it, naming the hook
    and the dtype, when the hook is called (not from a callback, as an error about an internal op)."""
    states = {"int8": (hooks.int8_hook, lambda: hooks.Int8State(transport="ring")),
              "topk": (hooks.topk_hook, lambda: hooks.TopkState(ratio=0.5, warmup_steps=1, transport="ring")),
              "powersgd": (hooks.powersgd_hook, lambda: hooks.PowerSGDState(start_powerSGD_iter=0, transport="ring"))}
    one_float64_bucket = lambda: nn.Sequential(nn.Linear(4, 8).double(), nn.Linear(8, 2).double())  # noqa: E731
    return _hook_errors(states, one_float64_bucket, torch.randn(3, 4, dtype=torch.float64), (RuntimeError, TypeError))


def _unused_on_one_rank_only():
    """Rank 1 leaves a head unused (no find_unused_parameters): it raises, and the other rank's collectives
    of that step must not pair with rank 1's next step, which would average one rank's step-1 gradients
    with the other's step-2 gradients without a word."""
    rank, world = dist.get_rank(), dist.get_world_size()

    class Heads(_TwoHeads):
        def forward(self, x, both):
            h = self.body(x)
            return self.used(h) + (self.unused(h) if both else 0)

    torch.manual_seed(0)
    dp = pyparallel.DataParallel(Heads(), bucket_cap_mb=1e-4, first_bucket_mb=1e-4)
    try:
        dp(torch.randn(4, 8), rank != 1).sum().backward()
        message = None
    except RuntimeError as e:
        message = str(e)
    dp.module.zero_grad()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    dp(x, True).sum().backward()
    grads = [p.grad.clone() for p in dp.module.parameters()]
    local = Heads()
    local.load_state_dict(dp.module.state_dict())
    local(x, True).sum().backward()
    expect = [p.grad.clone() for p in local.parameters()]
    for e in expect:
        dist.all_reduce(e)
        e /= world
    return message, all(torch.allclose(g, e, rtol=1e-5, atol=1e-6) for g, e in zip(grads, expect))


def _custom_hook_and_bad_config():
    calls = []

    def my_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls.append((bucket.index(), bucket.buffer().numel(), len(bucket.gradients()), bucket.is_last()))
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer() * 0 + 1)  # a hook may return a new tensor
        return fut

    model = make_model(32, 1, 0)
    dp = pyparallel.DataParallel(model, comm_hook=my_hook)
    dp(torch.randn(4, 64)).sum().backward()
    assert all(bool((p.grad == 1).all()) for p in model.parameters())
    with pytest.raises(ValueError, match="no parameters that require gradients"):
        pyparallel.DataParallel(nn.ReLU())
    return calls


_train = train_cli


# ---- tests ----

@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("wrapper", ["torch", "pyparallel"])
def test_hooked_gradients_match_full_batch(dist_pool, world_size, wrapper):
    results = dist_pool(world_size).run(_gradients_match_full_batch, random.randrange(2**30), wrapper)
    for name in results[0]:  # every hook leaves the same bits on every rank
        for r in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0][name], r[name])), name


def test_topk_hook_trains_under_torch_ddp(dist_pool):
    for first, last, sent in dist_pool(2).run(_topk_trains_under_ddp, random.randrange(2**30)):
        assert last < 0.5 * first
        assert sent > 0


def test_buckets_communicate_during_backward(dist_pool):
    for nbuckets, launches, end_at, first_launch_at, first_comm_start, last_grad in dist_pool(2).run(
            _overlap_events, random.randrange(2**30)):
        assert nbuckets >= 3
        assert launches == list(range(nbuckets)), "buckets launch in index order"
        assert first_launch_at < end_at, "the first bucket is launched before backward ends"
        assert first_comm_start < last_grad, "bucket 0's all-reduce started while gradients were still being computed"


def test_no_sync_accumulates_then_reduces(dist_pool):
    local = dist_pool(2).run(_no_sync_accumulates, random.randrange(2**30))
    assert local[0] != local[1], "inside no_sync the gradients stay local"


def test_unused_parameters(dist_pool):
    messages = dist_pool(2).run(_unused_parameters, False)
    for msg in messages:
        assert "2 parameter(s) received no gradient in this backward: unused.weight, unused.bias" in msg
    for grads in dist_pool(2).run(_unused_parameters, True):
        assert grads == [0.0, 0.0]
    (none, same0), (message, same1) = dist_pool(2).run(_unused_on_one_rank_only, timeout=60)
    assert none is None and "received no gradient in this backward: unused.weight, unused.bias" in message
    assert same0 and same1, "the next step is the average of that step's gradients on every rank"


def test_second_backward_through_one_forward_raises(dist_pool):
    for message, same in dist_pool(2).run(_second_backward_through_one_forward):
        assert message is not None and "already averaged" in message and "parameter 2.bias" in message, message
        assert same, "a new forward and backward reduce again"


def test_sparse_gradients_are_refused_clearly(dist_pool):
    for out in dist_pool(2).run(_sparse_gradients_are_refused):
        for name in list(HOOKS) + ["powersgd"]:
            assert "sparse gradient" in out.get((name, "torch"), ""), (name, out.get((name, "torch")))
            assert "0.weight" in out.get((name, "pyparallel"), "") and "sparse gradient" in out[name, "pyparallel"], \
                (name, out.get((name, "pyparallel")))
        for async_op in (False, True):
            assert "sparse" in out.get(("all_reduce", async_op), ""), out.get(("all_reduce", async_op))


def test_compressed_hooks_refuse_float64_buckets_clearly(dist_pool):
    for out in dist_pool(2).run(_float64_bucket_under_compressed_hooks):
        for name in ("int8", "topk", "powersgd"):
            for wrapper in ("torch", "pyparallel"):
                message = out.get((name, wrapper), "")
                assert f"{name}_hook: bucket" in message and "torch.float64 gradients" in message, (name, wrapper, message)
                assert "callback" not in message, message


def test_custom_hook_gets_a_gradbucket_like_object(dist_pool):
    calls = dist_pool(2).run(_custom_hook_and_bad_config)[0]
    assert calls and calls[-1][3] is True and sum(c[1] for c in calls) == sum(
        p.numel() for p in make_model(32, 1, 0).parameters())


def test_state_pickles_without_process_group_and_round_trips():
    state = hooks.TopkState(process_group=object(), ratio=0.1, warmup_steps=3)
    state.register_model(nn.Linear(5, 2))
    state.residuals["weight"] = torch.randn(10)
    state.bytes_sent, state.iteration = 123, 4
    clone = pickle.loads(pickle.dumps(state))
    assert clone.process_group is None and clone.ratio == 0.1 and clone.iteration == 4
    assert not clone.model_registered, "the model does not travel with the state"
    assert torch.equal(clone.residuals["weight"], state.residuals["weight"])
    fresh = hooks.TopkState()
    fresh.load_state_dict(state.state_dict())
    assert fresh.bytes_sent == 123 and fresh.iteration == 4
    assert torch.equal(fresh.residuals["weight"], state.residuals["weight"])
    with pytest.raises(ValueError, match="ratio must be in"):
        hooks.TopkState(ratio=0)
    with pytest.raises(ValueError, match="block_size must be positive"):
        hooks.Int8State(block_size=0)


def test_topk_residual_follows_its_parameter_when_buckets_change():
    a, b = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(12))
    model = nn.ParameterList([a, b])
    state = hooks.TopkState().register_model(model)
    first = state.residual_for(pyparallel.grad_bucket.Bucket(0, torch.zeros(10), [a], True))
    first += torch.arange(10.0)
    assert state.residual_for(pyparallel.grad_bucket.Bucket(0, torch.zeros(10), [a], True)) is first
    # Rebuilt buckets: a and b together, in an order that is not canonical (b comes first: reverse
    # registration order), and a new bucket index. a's residual moves with it; b's starts at zero.
    both = pyparallel.grad_bucket.Bucket(3, torch.zeros(22), [a, b], True)
    assert state.layout(both).names == ("1", "0") and not state.layout(both).identity
    flat = state.residual_for(both)
    assert torch.equal(flat[12:], torch.arange(10.0)) and not bool(flat[:12].any())
    assert torch.equal(state.residual_of(a), torch.arange(10.0)) and state.residual_of(a).data_ptr() == flat[12:].data_ptr()
    with pytest.raises(ValueError, match="not in the model given to register_model"):
        state.residual_for(pyparallel.grad_bucket.Bucket(0, torch.zeros(3), [torch.zeros(3)], True))


def test_compressed_training_accuracy_close_to_fp32(dist_pool):
    # Same data, model, seed and epochs; int8 must land within 1 point of fp32, top-k 1% within 2.
    pool = dist_pool(2)
    common = dict(epochs=12, hidden=128, threads=1)
    acc = {h: pool.run(_train, dict(common, hook=h), timeout=300)[0]["test_accuracy"] for h in ("allreduce", "int8", "topk")}
    assert acc["allreduce"] > 0.9, acc
    assert acc["int8"] >= acc["allreduce"] - 0.01, acc
    assert acc["topk"] >= acc["allreduce"] - 0.02, acc


def test_resume_is_bitwise_identical(dist_pool, tmp_path):
    assert_resume_is_bitwise(dist_pool(2), dict(hook="topk", ratio=0.05, hidden=64, seed=3), epochs=4, stop_at=2,
                             directory=str(tmp_path))
