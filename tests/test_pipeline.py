"""Layer-split pipelines against the unsplit model: one process over devices, one stage per rank, a grid.

Tolerances: the parity tests run in float64. A pipeline computes the same sums as the unsplit model,
grouped by micro-batch (a weight gradient is the sum of per-micro-batch partial sums, the loss a weighted
sum of micro-batch means), so the results differ only by rounding, ~1e-16 relative; rtol=1e-10 leaves
room for that and still catches any mistake of substance (a micro-batch weighted n_i/N wrongly is off by
>1e-2). The int8 test hook's error has a proven bound, stated where it is checked.
"""

import random
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pyparallel
from pyparallel import ops
from pyparallel.pipeline import (DistributedPipeline, Pipeline, PipelineError, ProcessGrid, SavedActivationMeter,
                                 balance_by_params, split_stages, stage_actions)
from pyparallel.pipeline.partition import balance_by_cost

TIMEOUT = 60
F64 = dict(rtol=1e-10, atol=1e-12)


def _model(seed, dtype=torch.float64, width=16, n_in=6, n_out=5):
    """Seven layers; the same seed gives the same model in every process."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, width), nn.Tanh(), nn.Linear(width, n_out)).to(dtype)


def _data(seed, batch, dtype=torch.float64, n_in=6, n_out=5):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, n_in, generator=gen, dtype=dtype), torch.randint(0, n_out, (batch,), generator=gen)


def _reference_grads(seed, x, y, dtype=torch.float64):
    """Loss and gradients (by parameter name) of the unsplit model on the whole batch."""
    ref = _model(seed, dtype)
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in ref.named_parameters()}


def _stage_grads(full, pipe):
    """This rank's stage's gradients, by the name of the parameter in the unsplit model."""
    mine = {id(p) for p in pipe.parameters()}
    return {name: p.grad for name, p in full.named_parameters() if id(p) in mine}


# ---------------------------------------------------------------------------------------------------------
# Partition, micro-batches, schedules (no processes)

def test_balance_by_cost_is_optimal():
    def brute_force(costs, n):  # the smallest largest-stage cost over every contiguous split
        if n == 1:
            return sum(costs)
        return min(max(sum(costs[:k]), brute_force(costs[k:], n - 1)) for k in range(1, len(costs) - n + 2))

    for _ in range(200):
        costs = [random.choice([0, 1, 2, 5, 9, 30]) for _ in range(random.randint(1, 8))]
        n = random.randint(1, len(costs))
        balance = balance_by_cost(costs, n)
        assert len(balance) == n and all(b >= 1 for b in balance) and sum(balance) == len(costs)
        bounds = [sum(balance[:k]) for k in range(n + 1)]
        assert max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])) == brute_force(costs, n), (costs, balance)


def test_split_stages():
    model = _model(0)
    assert balance_by_params(model, 2) == [4, 3]  # 112 + 0 + 272 + 0 parameters | 272 + 0 + 85
    first, second = split_stages(model, n_stages=2)
    assert list(first) + list(second) == list(model), "stages share the model's layers, in order"
    assert [len(s) for s in split_stages(list(model), [1, 5, 1])] == [1, 5, 1]


@pytest.mark.parametrize("balance, n_stages, match", [
    ([3, 3], None, r"balance \[3, 3\] covers 6 layers but the model has 7"),
    ([4, 0, 3], None, "positive layer counts"),
    (None, 8, "cannot split 7 layers into 8 stages"),
    ([3, 4], 3, r"balance \[3, 4\] has 2 stages but n_stages is 3"),
    (None, None, "pass a balance list or n_stages"),
])
def test_split_stages_rejects_bad_balance(balance, n_stages, match):
    with pytest.raises(ValueError, match=match):
        split_stages(_model(0), balance, n_stages)


def test_split_stages_rejects_non_modules():
    with pytest.raises(TypeError, match="layer 1 is a builtin_function_or_method, expected an nn.Module"):
        split_stages([nn.ReLU(), torch.relu], [1, 1])


def test_microbatches_uneven_and_too_small():
    from pyparallel.pipeline.microbatch import split_microbatches
    assert [c.shape[0] for c in split_microbatches(torch.zeros(10, 2), 4)] == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="batch size 3, fewer than n_microbatches=4"):
        split_microbatches(torch.zeros(3, 2), 4)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_schedule_orders(schedule):
    for p in range(1, 5):
        for s in range(p):
            for m in range(1, 7):
                actions = stage_actions(schedule, p, s, m)
                assert sorted(actions) == sorted([(f, i) for f in (True, False) for i in range(m)])
                assert [i for f, i in actions if not f] == list(range(m)), "backwards in micro-batch order"
                live, peak = 0, 0
                for forward, i in actions:
                    assert forward or (True, i) in actions[:actions.index((False, i))], "forward before backward"
                    live += 1 if forward else -1
                    peak = max(peak, live)
                assert peak == (m if schedule == "gpipe" else min(m, p - s)), (p, s, m, actions)
    with pytest.raises(ValueError, match="schedule must be one of"):
        stage_actions("interleaved", 2, 0, 4)


def _p2p_groups(schedule, p, m, prefetch):
    """Per rank, the point-to-point operations in posting order, as groups that NCCL runs together.

    An operation is (kind, peer, channel): the n-th ("send", b, c) of rank a matches the n-th
    ("recv", a, c) of rank b. Follows Note [When to post receives].
    """
    groups = []
    for s in range(p):
        actions = stage_actions(schedule, p, s, m)
        recvs = [[] if (f and s == 0) or (not f and s == p - 1) else
                 [("recv", s - 1 if f else s + 1, "act" if f else "grad")] for f, _ in actions]
        sends = [[] if (f and s == p - 1) or (not f and s == 0) else
                 [("send", s + 1 if f else s - 1, "act" if f else "grad")] for f, _ in actions]
        if prefetch:  # each operation alone; the receive of action k + 1 goes before the sends of action k
            order = recvs[0] + [op for k in range(len(actions)) for op in sum(recvs[k + 1:k + 2], []) + sends[k]]
            groups.append([[op] for op in order])
        else:  # the receive of action k batched with the sends of action k - 1
            order = [sends[k - 1] + recvs[k] if k else recvs[0] for k in range(len(actions))] + [sends[-1]]
            groups.append([g for g in order if g])
    return groups


def _completes_in_order(groups):
    """Simulates NCCL's semantics: each rank runs its groups one after the other, and a send and its
    matching receive complete together once both are in running groups. Returns False on a deadlock."""
    count, ranks = {}, []
    for rank, rank_groups in enumerate(groups):  # name every operation by its place in its channel
        named = []
        for group in rank_groups:
            named.append([])
            for kind, peer, channel in group:
                link = (rank, peer, channel) if kind == "send" else (peer, rank, channel)
                count[kind, link] = count.get((kind, link), -1) + 1
                named[-1].append((kind, link, count[kind, link]))
        ranks.append(named)
    position, done = [0] * len(ranks), set()
    while any(position[r] < len(g) for r, g in enumerate(ranks)):
        running = {op for r, g in enumerate(ranks) if position[r] < len(g) for op in g[position[r]]} - done
        matched = {op for op in running if ("recv" if op[0] == "send" else "send", *op[1:]) in running}
        finished = [r for r, g in enumerate(ranks) if position[r] < len(g) and set(g[position[r]]) <= done | matched]
        if not matched and not finished:
            return False
        done |= matched
        for r in finished:
            position[r] += 1
    return True


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_batched_receives_cannot_deadlock_nccl(schedule):
    for p in range(2, 5):
        for m in range(1, 7):
            assert _completes_in_order(_p2p_groups(schedule, p, m, prefetch=False)), (p, m)
    # Why NCCL does not prefetch: a GPipe stage would post its first gradient receive before its last send.
    assert not _completes_in_order(_p2p_groups("gpipe", 2, 4, prefetch=True))


def test_saved_activation_meter_counts_activations_not_parameters():
    layer = nn.Linear(100, 100)
    x = torch.randn(50, 100, requires_grad=True)
    with SavedActivationMeter(layer.parameters()) as meter:
        loss = torch.tanh(layer(x)).sum()
        assert meter.current_bytes == 2 * 50 * 100 * 4, "x (by the matmul) and tanh's output; not the weight"
        loss.backward()
    assert meter.current_bytes == 0 and meter.peak_bytes == 2 * 50 * 100 * 4


# ---------------------------------------------------------------------------------------------------------
# One process, several devices

def _check_local_pipeline(devices, n_microbatches, batch, dtype=torch.float64, width=16, tol=F64):
    x, y = _data(3, batch, dtype)
    reference = _model(3, dtype, width).to(devices[-1])
    loss_ref = F.cross_entropy(reference(x.to(devices[-1])), y.to(devices[-1]))
    loss_ref.backward()
    pipe = Pipeline(_model(3, dtype, width), devices, n_microbatches=n_microbatches)
    loss = F.cross_entropy(pipe(x.to(devices[0])), y.to(devices[-1]))
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, **tol)
    for (name, p), p_ref in zip(pipe.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.to(devices[-1]), p_ref.grad, **tol, msg=name)


@pytest.mark.parametrize("n_microbatches, batch", [(1, 8), (4, 8), (3, 10)])
def test_local_pipeline_cpu_equals_unsplit(n_microbatches, batch):
    _check_local_pipeline(["cpu", "cpu"], n_microbatches, batch)


def test_local_pipeline_rejects_what_it_cannot_stream():
    class Pair(nn.Module):
        def forward(self, x):
            return x, 2 * x

    class Sum(nn.Module):
        def forward(self, pair):
            return pair[0] + pair[1]

    layers = [nn.Linear(4, 4), Pair(), Sum()]
    # Stage 0 ends in a tuple (AttributeError: 'tuple' object has no attribute 'to'), or the last stage does
    # (TypeError in torch.cat); a batch that is no tensor (AttributeError: no attribute 'device').
    for balance, stage in [([2, 1], 0), ([1, 1], 1)]:
        with pytest.raises(TypeError, match=f"stage {stage} returned a tuple; a stage must return one tensor"):
            Pipeline(layers[:sum(balance)], ["cpu", "cpu"], balance=balance, n_microbatches=2)(torch.randn(4, 4))
    with pytest.raises(TypeError, match="inputs must be a tensor whose dim 0 is the batch, got list"):
        Pipeline(layers[:1], ["cpu"])([[1.0] * 4])
    # A weight shared by stages on different devices: moving the second stage moved it away from the first
    # (on CUDA: "Expected all tensors to be on the same device" in the first stage's forward).
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"parameter 0.weight of stage 0 is also 2.weight of stage 1 \(tied weights\) "
                                         "on another device"):
        Pipeline([lin, nn.Tanh(), lin], ["cpu", "meta"], balance=[2, 1])
    assert lin.weight.device.type == "cpu"
    x = torch.randn(4, 4)
    pipe = Pipeline([lin, nn.Tanh(), lin], ["cpu", "cpu"], balance=[2, 1], n_microbatches=2)  # one device: fine
    torch.testing.assert_close(pipe(x), lin(torch.tanh(lin(x))))


CUDA_DEVICE_PAIRS = [
    pytest.param(pair, marks=pytest.mark.skipif(torch.cuda.device_count() < need,
                                                reason=f"needs {need} CUDA device(s)"))
    for pair, need in [(("cuda:0", "cuda:0"), 1), (("cpu", "cuda:0"), 1), (("cuda:0", "cpu"), 1),
                       (("cuda:0", "cuda:1"), 2)]
]


@pytest.mark.parametrize("devices", CUDA_DEVICE_PAIRS)
def test_local_pipeline_cuda_equals_unsplit(devices):
    _check_local_pipeline(list(devices), 3, 10)
    # Wide and many micro-batches: a missing event or record_stream would race and show up as wrong numbers.
    _check_local_pipeline(list(devices), 16, 4096, torch.float32, width=1024, tol=dict(rtol=1e-4, atol=1e-5))


# ---------------------------------------------------------------------------------------------------------
# One stage per rank (functions below run in the pool's ranks)

BALANCES = {2: [3, 4], 3: [3, 2, 2]}


def _parity_case(seed, schedule, n_stages, batches, n_microbatches, balance, prefetch=True):
    """Steps over ``batches`` (gradients accumulate) and checks loss and gradients against the unsplit model.

    ``prefetch=False`` runs, on Gloo, the batched receives that NCCL needs (Note [When to post receives]).
    """
    full = _model(seed)
    pipe = DistributedPipeline(full, F.cross_entropy, balance=balance, n_stages=n_stages,
                               n_microbatches=n_microbatches, schedule=schedule)
    pipe._prefetch_receives = prefetch
    expected_grads = {}
    for batch in batches:
        x, y = _data(seed + batch, batch)
        loss = pipe.step(x if pipe.grid.is_first else None, y if pipe.grid.is_last else None)
        loss_ref, grads_ref = _reference_grads(seed, x, y)
        expected_grads = {k: g + expected_grads.get(k, 0) for k, g in grads_ref.items()}
        if pipe.grid.is_last:
            torch.testing.assert_close(loss, loss_ref, **F64)
        else:
            assert loss is None
    got = _stage_grads(full, pipe)
    assert got, "every stage has parameters here"
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected_grads[name], **F64, msg=f"{schedule} m={n_microbatches} {name}")


def _parity_cases(seed, schedule, n_stages):
    # m = 1, m < p (1F1B without steady phase), m dividing 12, m not dividing 12, m = batch; then a new batch
    # size on the same pipeline (a new shape signature: the handshake dry-runs again) with uneven micro-batches.
    for m in sorted({1, n_stages - 1, 3, 5, 12} - {0}):
        _parity_case(seed, schedule, n_stages, [12], m, BALANCES[n_stages])
    _parity_case(seed, schedule, n_stages, [12, 7, 12], 4, None)  # balanced by parameter count
    _parity_case(seed, schedule, n_stages, [12, 7], 5, None, prefetch=False)


@pytest.mark.parametrize("n_stages", [2, 3])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_distributed_equals_unsplit(dist_pool, schedule, n_stages):
    dist_pool(n_stages).run(_parity_cases, random.randrange(2**20), schedule, n_stages, timeout=TIMEOUT)


def _frozen_first_stage(seed):
    """Stage 0 frozen (as with frozen embeddings): no gradients there, stage 1's still exact."""
    full, reference = _model(seed), _model(seed)
    for model in (full, reference):
        for p in model[:3].parameters():
            p.requires_grad_(False)
    pipe = DistributedPipeline(full, F.cross_entropy, balance=[3, 4], n_microbatches=3)
    x, y = _data(seed, 9)
    pipe.step(x, y)
    F.cross_entropy(reference(x), y).backward()
    for (name, p), p_ref in zip(full.named_parameters(), reference.parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
        elif id(p) in {id(q) for q in pipe.parameters()}:
            torch.testing.assert_close(p.grad, p_ref.grad, **F64, msg=name)


def test_distributed_frozen_first_stage(dist_pool):
    dist_pool(2).run(_frozen_first_stage, random.randrange(2**20), timeout=TIMEOUT)


def _inplace_at_cut(seed):
    """A stage that starts with an in-place layer (the cut falls before ReLU(inplace=True)): the unsplit model
    runs it, so the pipeline must too, on every rank (stage 1 raised, its peer waited for the timeout)."""
    def model():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True),
                             nn.Linear(16, 5)).double()

    x, y = _data(seed, 7)
    reference = model()
    F.cross_entropy(reference(x), y).backward()
    for schedule in ("gpipe", "1f1b"):
        full = model()
        pipe = DistributedPipeline(full, F.cross_entropy, balance=[1, 4], n_microbatches=3, schedule=schedule)
        pipe.step(x, y)
        for (name, p), p_ref in zip(full.named_parameters(), reference.parameters()):
            if id(p) in {id(q) for q in pipe.parameters()}:
                torch.testing.assert_close(p.grad, p_ref.grad, **F64, msg=f"{schedule} {name}")


def test_distributed_inplace_layer_at_cut(dist_pool):
    dist_pool(2).run(_inplace_at_cut, random.randrange(2**20), timeout=TIMEOUT)


def _expect_pipeline_error(match, step_inputs, step_targets, layers=None, **kwargs):
    pipe = DistributedPipeline(layers or _model(0), F.cross_entropy, **kwargs)
    with pytest.raises(PipelineError, match=match):
        pipe.step(step_inputs, step_targets)
    return pipe


def _bad_steps():
    x, y = _data(0, 8)
    # A stage that cannot take its input's shape: stage 1 expects 15 features, stage 0 gives 16.
    bad = [nn.Linear(6, 16).double(), nn.Linear(15, 5).double()]
    pipe = _expect_pipeline_error(r"stage 1 \(rank 1\) failed on an activation from stage 0 of shape \[4, 16\] and "
                                  r"dtype torch.float64: RuntimeError: mat1 and mat2 shapes cannot be multiplied",
                                  x, y, bad, balance=[1, 1], n_microbatches=2)
    with pytest.raises(PipelineError, match="shapes cannot be multiplied"):  # again: failures are never cached
        pipe.step(x, y)
    _expect_pipeline_error(r"stage 0 \(rank 0\): inputs has batch size 8, fewer than n_microbatches=9",
                           x, y, n_microbatches=9)
    _expect_pipeline_error(r"stage 0 \(rank 0\): inputs must be a tensor", None, y, n_microbatches=2)
    _expect_pipeline_error(r"stage 1 \(rank 1\): targets have batch size 7 but the inputs on stage 0 have 8",
                           x, y[:7], n_microbatches=2)
    _expect_pipeline_error(r"stage 1 \(rank 1\): loss_fn failed on an output of shape \[4, 5\]",
                           x, y.double(), n_microbatches=2)
    with torch.no_grad():
        _expect_pipeline_error("step\\(\\) needs autograd", x, y, n_microbatches=2)
    # BatchNorm in training rejects a micro-batch of one sample: the dry run must run in training mode to see
    # it (in eval mode it passed, and stage 1 raised alone mid-step while stage 0 waited for the timeout).
    def with_batch_norm():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 5)).double()

    bn = with_batch_norm()
    pipe = _expect_pipeline_error(r"stage 1 \(rank 1\) failed on an activation from stage 0 of shape \[1, 16\] and "
                                  r"dtype torch.float64: ValueError: Expected more than 1 value per channel when "
                                  r"training", x, y, bn, balance=[1, 3], n_microbatches=8)
    # The dry runs leave no trace: after a good step the statistics are those of its two micro-batches alone.
    pipe = DistributedPipeline(bn, F.cross_entropy, balance=[1, 3], n_microbatches=2)
    pipe.step(x, y)
    reference = with_batch_norm()
    with torch.no_grad():
        for chunk in x.tensor_split(2):
            reference(chunk)
    if pipe.grid.is_last:
        assert bn[1].num_batches_tracked.item() == 2
        torch.testing.assert_close(bn[1].running_mean, reference[1].running_mean, **F64)
        torch.testing.assert_close(bn[1].running_var, reference[1].running_var, **F64)
    # The pool's ranks are still in step: a good step works after all the rejected ones.
    pipe = DistributedPipeline(_model(0), F.cross_entropy, n_microbatches=2)
    assert (pipe.step(x, y) is not None) == pipe.grid.is_last


def _bad_configurations():
    for kwargs, error, match in [
        (dict(balance=[3, 3]), ValueError, r"covers 6 layers but the model has 7"),
        (dict(balance=[3, 2, 2]), ValueError, "the pipeline has 3 stages but the world has only 2 ranks"),
        (dict(n_stages=2, schedule="zero-bubble"), ValueError, "schedule must be one of"),
        (dict(n_stages=2, n_microbatches=0), ValueError, "n_microbatches must be a positive int"),
    ]:
        with pytest.raises(error, match=match):
            DistributedPipeline(_model(0), F.cross_entropy, **kwargs)
    # Tied weights across stages (an output layer reusing the embedding's matrix): each rank would train its
    # own copy on part of the gradient. Within one stage, sharing is fine.
    tied = _model(0)
    tied[4].weight = tied[2].weight
    with pytest.raises(ValueError, match=r"parameter 2.weight of stage 0 is also 4.weight of stage 1 \(tied weights\)"):
        DistributedPipeline(tied, F.cross_entropy, balance=[3, 4])
    DistributedPipeline(tied, F.cross_entropy, balance=[5, 2])  # 2 and 4 in stage 0


def test_distributed_bad_configuration_raises_on_every_rank(dist_pool):
    dist_pool(2).run(_bad_configurations, timeout=TIMEOUT)


def test_distributed_bad_step_raises_on_every_rank(dist_pool):
    dist_pool(2).run(_bad_steps, timeout=TIMEOUT)


def _stage_raises_mid_step():
    """Stage 1 raises in the loss of micro-batch 1 (a target out of range: the dry run on zeros cannot see it)."""
    pipe = DistributedPipeline(_model(0), F.cross_entropy, balance=[3, 4], n_microbatches=2)  # 1F1B
    x, y = _data(0, 4)
    y[3] = 99
    start = time.monotonic()
    try:
        pipe.step(x, y)
    except Exception as e:
        return time.monotonic() - start, type(e).__name__, str(e)
    return None


def test_stage_raising_mid_step_is_named_by_its_peer():
    # The group does not survive the timeout: a pool of its own, with a short timeout.
    from dist_harness import WorkerPool
    pool = WorkerPool(2, pg_timeout_s=5)
    try:
        (status0, failure0), (status1, failure1) = pool.outcomes(_stage_raises_mid_step, timeout=TIMEOUT)
    finally:
        pool.kill()
    assert status1 == "ok" and failure1 is not None and failure1[1] == "IndexError", failure1
    assert status0 == "ok" and failure0 is not None, failure0
    elapsed, _, message = failure0
    assert elapsed < 5 + 10, f"stage 0 raised after {elapsed:.1f} s, the group's timeout is 5 s"
    # Stage 0 waits for micro-batch 1's gradient (F0 F1 B0 B1; stage 1 ran F0 B0 and raised in F1). Gloo's own
    # message names neither the peer nor what was expected.
    expected = "stage 0 (rank 0): receiving micro-batch 1's gradient from stage 1 (rank 1) failed"
    assert message.startswith(expected), message
    assert "did not call step() for this batch" in message, message


def _activation_peaks(n_microbatches):
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        full = _model(0, torch.float32, width=64)
        pipe = DistributedPipeline(full, F.cross_entropy, balance=[3, 4], n_microbatches=n_microbatches,
                                   schedule=schedule)
        x, y = _data(0, 8 * n_microbatches, torch.float32)
        with SavedActivationMeter([*pipe.parameters(), x, y]) as meter:  # the batch is the caller's
            pipe.step(x, y)
        peaks[schedule] = meter.peak_bytes
    return peaks


def test_1f1b_keeps_fewer_activations_than_gpipe(dist_pool):
    m = 6
    for stage, peaks in enumerate(dist_pool(2).run(_activation_peaks, m, timeout=TIMEOUT)):
        # GPipe holds all m micro-batches; 1F1B at most p - stage of them.
        assert peaks["1f1b"] * m == peaks["gpipe"] * (2 - stage), (stage, peaks)


# ---------------------------------------------------------------------------------------------------------
# Data x pipeline: 2 stages x 2 replicas on 4 ranks

def int8_allgather_hook(group, bucket):
    """Test hook with the DDP signature: int8-quantize, all-gather, dequantize and average in rank order.

    Every rank decodes the same bytes in the same order, so replicas stay bitwise identical.
    """
    q, scales = ops.quantize_int8(bucket.buffer())
    n = dist.get_world_size(group)
    qs, ss = [torch.empty_like(q) for _ in range(n)], [torch.empty_like(scales) for _ in range(n)]
    works = [dist.all_gather(qs, q, group=group, async_op=True),
             dist.all_gather(ss, scales, group=group, async_op=True)]

    def average(_):
        acc = torch.zeros_like(bucket.buffer(), dtype=torch.float32)
        for q_rank, s_rank in zip(qs, ss):
            ops.dequantize_add_(acc, q_rank, s_rank)
        return acc.div_(n)

    return torch.futures.collect_all([w.get_future() for w in works]).then(average)


def _grid_case(seed, dtype, hook, make_state=None):
    """One step on a 2x2 grid; returns (this stage's grads, the unsplit model's grads, the grads' error bound)."""
    full = _model(seed, dtype)
    grid = ProcessGrid(2)
    state = make_state(grid) if make_state is not None else None
    pipe = DistributedPipeline(full, F.cross_entropy, n_microbatches=3, grid=grid, comm_hook=hook, hook_state=state)
    x, y = _data(seed, 16, dtype)  # the whole data-parallel batch; replica r takes half r
    half = slice(8 * grid.replica, 8 * grid.replica + 8)
    pipe.step(x[half], y[half])
    _, grads_ref = _reference_grads(seed, x, y, dtype)
    # int8: each replica's gradient is rounded to within half a quantization step, absmax/127/2 of its block,
    # so the average is within the largest such half step of any replica.
    local_max = max(max(g.abs().max() for g in _reference_grads(seed, x[h], y[h], dtype)[1].values())
                    for h in (slice(0, 8), slice(8, 16)))
    return _stage_grads(full, pipe), grads_ref, float(local_max) / 254


def _grid_default_hook(seed):
    got, expected, _ = _grid_case(seed, torch.float64, None)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], **F64, msg=name)
    # Replicas with batches of different sizes (9 and 5 of 14 samples): still the gradient of the concatenation
    # (it was the average of the two batches' mean-loss gradients), and each replica's own mean loss.
    full = _model(seed)
    pipe = DistributedPipeline(full, F.cross_entropy, n_stages=2, n_microbatches=3)
    x, y = _data(seed, 14)
    mine = slice(0, 9) if pipe.grid.replica == 0 else slice(9, 14)
    loss = pipe.step(x[mine], y[mine])
    _, grads_ref = _reference_grads(seed, x, y)
    for name, grad in _stage_grads(full, pipe).items():
        torch.testing.assert_close(grad, grads_ref[name], **F64, msg=f"uneven replicas: {name}")
    if pipe.grid.is_last:
        torch.testing.assert_close(loss, _reference_grads(seed, x[mine], y[mine])[0], **F64)
    # A step rejected by one replica (wrong targets on rank 3) is rejected by all four ranks.
    pipe = DistributedPipeline(_model(seed), F.cross_entropy, n_stages=2, n_microbatches=2)
    x, y = _data(seed, 8)
    bad_replica = pipe.grid.replica == 1
    match = "targets have batch size 7" if bad_replica else "another data-parallel replica rejected"
    with pytest.raises(PipelineError, match=match):
        pipe.step(x, y[:7] if bad_replica else y)


def _grid_replicas_start_equal(seed):
    """Replicas built from different seeds (a per-rank seed) start from the first replica's parameters;
    before, they stayed apart forever. Replicas of different shapes raise on every rank of the grid."""
    full = _model(seed + dist.get_rank())
    pipe = DistributedPipeline(full, F.cross_entropy, n_stages=2, n_microbatches=2)
    first = _model(seed + pipe.grid.rank_of(pipe.grid.stage, 0))
    mine = {id(p) for p in pipe.parameters()}
    for (name, p), p_first in zip(full.named_parameters(), first.parameters()):
        if id(p) in mine:
            assert torch.equal(p, p_first), name
    narrow = dist.get_rank() == 3  # a replica of stage 1
    with pytest.raises(ValueError, match=r"the replicas of stage 1 \(global ranks 2 and 3, ranks 0 and 1 of its "
                                         r"data group\) must hold the same layers, but parameter 4.weight has shape "
                                         r"\[16, 16\] and dtype torch.float64 on rank 0 but shape \[15, 15\]"):
        DistributedPipeline(_model(seed, width=15 if narrow else 16), F.cross_entropy, balance=[3, 4])


def _grid_int8_trains(seed):
    got, expected, bound = _grid_case(seed, torch.float32, int8_allgather_hook)
    for name, grad in got.items():
        err = (grad - expected[name]).abs().max().item()
        assert err <= bound * 1.01 + 1e-7, f"{name}: int8 error {err:.3g} above its bound {bound:.3g}"
    full = _model(seed, torch.float32)
    pipe = DistributedPipeline(full, F.cross_entropy, n_stages=2, n_microbatches=4, comm_hook=int8_allgather_hook)
    opt = torch.optim.Adam(pipe.parameters(), lr=0.05)
    x, y = _data(seed, 64, torch.float32)
    mine = slice(32 * pipe.grid.replica, 32 * pipe.grid.replica + 32)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        losses.append(pipe.step(x[mine], y[mine]))
        opt.step()
    return [p.detach() for p in pipe.parameters()], losses


def _grid_pyparallel_int8_hook(seed):
    from pyparallel import hooks

    got, expected, half_step = _grid_case(seed, torch.float32, hooks.int8_hook,
                                          lambda grid: hooks.Int8State(process_group=grid.data_group, transport="ring"))
    # The int8 ring over 2 replicas: ((1 + 1/254)^2 - 1) * (sum of both block absmaxes) / 2 per element
    # (pyparallel.Int8), at most ((1 + 1/254)^2 - 1) * local max = 2.004 * half_step.
    for name, grad in got.items():
        err = (grad - expected[name]).abs().max().item()
        assert err <= 2.01 * half_step + 1e-7, f"{name}: int8 ring error {err:.3g} above {2.01 * half_step:.3g}"
    return {name: g.clone() for name, g in got.items()}


def test_grid_with_pyparallel_int8_hook(dist_pool):
    results = dist_pool(4).run(_grid_pyparallel_int8_hook, random.randrange(2**20), timeout=TIMEOUT)
    for a, b in [(0, 1), (2, 3)]:  # replicas of one stage decode the same int8 bytes: identical gradients
        assert all(torch.equal(results[a][k], results[b][k]) for k in results[a])


def test_grid_default_hook_equals_unsplit(dist_pool):
    dist_pool(4).run(_grid_default_hook, random.randrange(2**20), timeout=TIMEOUT)


def _grid_pyparallel_hooks_without_state(seed):
    """pyparallel's hooks given without a state get a state of the class they take on the data group (they got
    the bare group: an AttributeError on the ProcessGroup after backward)."""
    from pyparallel import hooks

    full = _model(seed)
    pipe = DistributedPipeline(full, F.cross_entropy, n_stages=2, n_microbatches=3, comm_hook=hooks.allreduce_hook)
    x, y = _data(seed, 16)
    half = slice(8 * pipe.grid.replica, 8 * pipe.grid.replica + 8)
    pipe.step(x[half], y[half])
    _, grads_ref = _reference_grads(seed, x, y)
    for name, grad in _stage_grads(full, pipe).items():
        torch.testing.assert_close(grad, grads_ref[name], **F64, msg=name)
    full = _model(seed, torch.float32)
    pipe = DistributedPipeline(full, F.cross_entropy, n_stages=2, n_microbatches=3, comm_hook=hooks.int8_hook)
    x, y = _data(seed, 16, torch.float32)
    pipe.step(x[half], y[half])
    return [p.grad for p in pipe.parameters()]


def test_grid_pyparallel_hooks_without_state(dist_pool):
    grads = dist_pool(4).run(_grid_pyparallel_hooks_without_state, random.randrange(2**20), timeout=TIMEOUT)
    for a, b in [(0, 1), (2, 3)]:  # the int8 ring: replicas of a stage decode the same bytes
        assert all(torch.equal(g, h) for g, h in zip(grads[a], grads[b]))


def test_grid_replicas_start_equal(dist_pool):
    dist_pool(4).run(_grid_replicas_start_equal, random.randrange(2**20), timeout=TIMEOUT)


def test_grid_int8_hook_trains(dist_pool):
    results = dist_pool(4).run(_grid_int8_trains, random.randrange(2**20), timeout=TIMEOUT)
    for a, b in [(0, 1), (2, 3)]:  # ranks of one stage: the replicas must stay identical
        for p, q in zip(results[a][0], results[b][0]):
            assert torch.equal(p, q)
    for rank in (2, 3):  # last stage: the loss of each replica's half batch goes down
        losses = [float(l) for l in results[rank][1]]
        # Unsplit in fp32, these 20 steps end at 0.10-0.47 of the first loss (120 half batches, 60 seeds).
        assert losses[-1] < 0.7 * losses[0], losses


def test_public_api():
    assert pyparallel.pipeline.DistributedPipeline is DistributedPipeline
