"""Fault-tolerant training on torchft: our hooks and transports on torchft's per-quorum groups, errors
reported to the manager, healing state, and whole runs in which a replica is SIGKILLed."""

import datetime
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("torchft")

import pyparallel  # noqa: E402
from pyparallel import fault_tolerance as ft  # noqa: E402
from pyparallel import hooks, transport  # noqa: E402
from pyparallel.grad_bucket import Bucket  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the hook's contract with the manager (no servers needed) ----

class FakeManager:
    """The part of torchft.Manager that managed_hook uses."""

    def __init__(self, participants=1, participating=True):
        self.errors, self.participants, self.participating = [], participants, participating
        self.step = 0
        self.fail_commit = False  # the next should_commit says no (a peer's failure)
        self.state_fns = {}

    def register_state_dict_fn(self, key, load, save):
        self.state_fns[key] = (load, save)

    def start_quorum(self):
        self.errors = []

    def should_commit(self):
        if self.errors or self.fail_commit:
            self.fail_commit = False
            return False
        self.step += 1
        return True

    def current_step(self):
        return self.step

    def errored(self):
        return self.errors[-1] if self.errors else None

    def wait_quorum(self):
        pass

    def num_participants(self):
        return self.participants

    def is_participating(self):
        return self.participating

    def report_error(self, exc):
        self.errors.append(exc)

    def wrap_future(self, fut, default):
        def swallow(f):
            try:
                return f.value()
            except Exception as exc:  # noqa: BLE001
                self.report_error(exc)
                return default

        return fut.then(swallow)


class OneRank:
    def size(self):
        return 1


class FakeGroup(ft.ManagedGroup):
    def __init__(self, current):
        super().__init__()
        self._current = current


def _bucket(n=10):
    return Bucket(0, torch.arange(n, dtype=torch.float32), [torch.zeros(n)], is_last=True)


def test_hook_errors_are_reported_not_raised():
    manager = FakeManager()

    def raising_hook(state, bucket):
        raise RuntimeError("peer died")

    bucket = _bucket()
    state = ft.ManagedHookState(manager, FakeGroup(OneRank()), raising_hook, hooks.HookState())
    assert ft.managed_hook(state, bucket).wait() is bucket.buffer()
    assert [str(e) for e in manager.errors] == ["peer died"]

    def failing_future_hook(state, bucket):
        fut = torch.futures.Future()
        fut.set_exception(RuntimeError("connection reset"))
        return fut

    manager = FakeManager()
    state = ft.ManagedHookState(manager, FakeGroup(OneRank()), failing_future_hook, hooks.HookState())
    assert ft.managed_hook(state, bucket).wait() is bucket.buffer()
    assert [str(e) for e in manager.errors] == ["connection reset"]

    calls = []  # once the step failed, later buckets do not communicate at all
    state = ft.ManagedHookState(manager, FakeGroup(OneRank()), lambda s, b: calls.append(b), hooks.HookState())
    assert ft.managed_hook(state, bucket).wait() is bucket.buffer() and calls == []


def test_hook_runs_on_the_current_group_and_rescales_for_non_participants():
    class Group:
        def size(self):
            return 4

    group = Group()
    seen = []

    def hook(state, bucket):
        seen.append(state.process_group)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer().clone())
        return fut

    state = ft.ManagedHookState(FakeManager(participants=2), FakeGroup(group), hook, hooks.HookState())
    bucket = _bucket()
    out = ft.managed_hook(state, bucket).wait()
    assert seen == [group] and torch.equal(out, torch.arange(10, dtype=torch.float32) * 2)
    spare = ft.ManagedHookState(FakeManager(participants=4, participating=False), FakeGroup(group), hook,
                                hooks.HookState())
    assert not ft.managed_hook(spare, _bucket()).wait().any()  # a spare contributes zeros
    with pytest.raises(TypeError, match="ManagedGroup"):
        ft.ManagedHookState(FakeManager(), object(), hook, hooks.HookState())


def test_healing_state_copies_everything_but_error_feedback_residuals():
    def make():
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        return net, opt, hooks.TopkState(ratio=0.5, warmup_steps=3).register_model(net)

    net, opt, topk = make()
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    with torch.no_grad():
        net.weight.add_(1.0)
    topk.iteration, topk.bytes_sent = 7, 1234
    topk.residuals.update(weight=torch.randn(3, 4), bias=torch.randn(3))  # per parameter, by name
    extra = {"position": 42}
    donor = ft.TrainingState(net, opt, topk, extra=(lambda: dict(extra), extra.update))

    net2, opt2, topk2 = make()
    topk2.residuals.update(weight=torch.randn(3, 4), bias=torch.randn(3))
    extra2 = {}
    healed = ft.TrainingState(net2, opt2, topk2, extra=(lambda: dict(extra2), extra2.update))
    healed.load_state_dict(donor.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    momentum = [o.state_dict()["state"][0]["momentum_buffer"] for o in (opt, opt2)]
    assert torch.equal(*momentum)
    assert topk2.iteration == 7 and topk2.bytes_sent == 1234 and extra2 == {"position": 42}
    assert sorted(topk2.residuals) == ["bias", "weight"]
    assert not any(r.any() for r in topk2.residuals.values()) and all(r.any() for r in topk.residuals.values())
    assert healed.heals == 1
    with pytest.raises(ValueError, match="no hook state"):
        healed.load_state_dict({"model": net.state_dict(), "optimizer": opt.state_dict()})


def test_healing_state_gives_powersgd_its_qs_iteration_and_generator_but_not_its_errors():
    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        return net, opt, hooks.PowerSGDState(matrix_approximation_rank=1, start_powerSGD_iter=1).register_model(net)

    net, opt, donor = make()
    saved = donor.state_dict()  # a state that has been through compressed iterations (what the hook leaves)
    saved.update(iter=7, shapes={0: [4, 6], 1: [4], 2: [3, 4], 3: [3]},
                 errors={k: torch.randn(n) for k, n in ((0, 24), (1, 4), (2, 12), (3, 3))},
                 qs={0: torch.randn(6, 1), 1: torch.zeros(0, 1), 2: torch.randn(4, 1), 3: torch.zeros(0, 1)})
    donor.load_state_dict(saved)
    donor.rng.randint(1000, size=5)  # the generator has drawn (first Qs of other buckets)
    net2, opt2, healed = make()
    ft.TrainingState(net2, opt2, healed).load_state_dict(ft.TrainingState(net, opt, donor).state_dict())
    assert healed.iter == 7
    assert sorted(healed._q_of) == [0, 1, 2, 3]
    assert all(torch.equal(healed._q_of[k], donor._q_of[k]) for k in donor._q_of)  # warm start as its peers
    assert healed.rng.randint(2**30) == donor.rng.randint(2**30)  # the same next draw on every replica
    assert healed._error_of == {} and len(donor._error_of) == 4 and all(e.any() for e in donor._error_of.values())


# ---- our collectives on torchft's reconfigured groups (two ranks of the worker pool) ----

def _reconfigure_case():
    rank = dist.get_rank()
    server = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False) if rank == 0 else None
    port = [server.port if server else None]
    dist.broadcast_object_list(port, src=0)
    group = ft.ManagedGroup(timeout=datetime.timedelta(seconds=20))
    out = {}
    try:
        for quorum in (1, 2):
            group.configure(f"localhost:{port[0]}/torchft/{quorum}/0", "replica", rank, 2, quorum_id=quorum,
                            group_rank=0, group_world_size=1)
            g = group.current()
            torch.manual_seed(100 + rank)
            x = torch.randn(1001)
            total = x * 0
            for r in range(2):
                torch.manual_seed(100 + r)
                total += torch.randn(1001)
            results = {}
            for name, kwargs in {"ring": dict(transport="ring"), "shm": dict(transport="shm"),
                                 "int8": dict(transport="ring", compression="int8")}.items():
                t = x.clone()
                pyparallel.all_reduce(t, group=g, **kwargs)
                results[name] = t
            residual = torch.zeros(1001)
            sparse = x.clone()
            pyparallel.all_reduce(sparse, group=g, compression=pyparallel.Topk(ratio=0.1, residual=residual),
                                  transport="ring")
            out[quorum] = {
                "name": g.group_name,
                "exact": bool(torch.equal(results["ring"], total)) and bool(torch.equal(results["shm"], total)),
                "int8_err": float((results["int8"] - total).abs().max()),
                "digest": torch.cat([results["int8"], sparse]).sum().item(),
            }
            if quorum == 1:
                old = g
        out["old_resources_released"] = old.group_name not in transport._resources
        try:
            pyparallel.all_reduce(torch.ones(3), group=old, transport="ring")
            out["old_group_usable"] = True
        except Exception as exc:  # noqa: BLE001
            out["old_group_usable"] = False
            out["old_group_error"] = str(exc)[:200]
    finally:
        group.shutdown()
    return out


def test_collectives_run_on_each_quorums_group_and_the_old_one_is_released(dist_pool):
    a, b = dist_pool(2).run(_reconfigure_case, timeout=120)
    for q in (1, 2):
        assert a[q]["name"] == b[q]["name"] == f"pyparallel-ft/quorum{q}/rank0"
        assert a[q]["exact"] and b[q]["exact"]  # ring and shared memory: the exact sum
        assert a[q]["int8_err"] < 0.1
        assert a[q]["digest"] == b[q]["digest"]  # bitwise identical on both ranks
    assert a["old_resources_released"] and not a["old_group_usable"], a


# ---- hook state across a heal and a discarded step (two replicas: the two ranks of the worker pool) ----

def _two_replica_group():
    """A ManagedGroup over the pool's two ranks, configured as torchft configures it for a quorum of two
    (the store server must outlive the group)."""
    rank = dist.get_rank()
    server = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False) if rank == 0 else None
    port = [server.port if server else None]
    dist.broadcast_object_list(port, src=0)
    group = ft.ManagedGroup(timeout=datetime.timedelta(seconds=20))
    group.configure(f"localhost:{port[0]}/torchft/1/0", "replica", rank, 2, quorum_id=1, group_rank=0,
                    group_world_size=1)
    return group, server


class _Replica:
    """One replica of the pool's two: a small model whose one bucket goes through managed_hook with the
    given hook (a step may be made to fail after the hook communicated: what a peer's death in the last
    moment looks like), under a FakeManager and our optimizer wrapper (torchft's, with the rollback)."""

    def __init__(self, kind, group):
        torch.manual_seed(0)  # the same model on both replicas
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
        if kind == "topk":
            self.hook, self.state = hooks.topk_hook, hooks.TopkState(ratio=0.2, transport="ring")
        else:  # compresses both weights (rank 1), sends the biases exactly; the first step is exact
            self.hook = hooks.powersgd_hook
            self.state = hooks.PowerSGDState(matrix_approximation_rank=1, start_powerSGD_iter=1, transport="ring")
        self.state.register_model(self.net)
        self.inner = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        self.training = ft.TrainingState(self.net, self.inner, self.state)
        self.manager = FakeManager(participants=2)
        self.managed = ft.ManagedHookState(self.manager, group, self._hook, self.state)
        self.optimizer = ft.Optimizer(self.manager, self.inner, self.training)
        self.fail = False

    def _hook(self, state, bucket):
        fut = self.hook(state, bucket)
        if not self.fail:
            return fut

        def lost(f):
            f.value()
            raise RuntimeError("injected: the step failed after the hook communicated")

        return fut.then(lost)

    def step(self, seed, fail=False):
        """One training step on gradients drawn from ``seed`` (and the rank); returns the reduced bucket
        (None if the step was discarded)."""
        self.optimizer.zero_grad()
        params = list(self.net.parameters())
        gen = torch.Generator().manual_seed(1000 * seed + dist.get_rank())
        bucket = Bucket(0, torch.randn(sum(p.numel() for p in params), generator=gen), params, is_last=True)
        self.fail = fail
        out = ft.managed_hook(self.managed, bucket).wait().clone()
        for p, g in zip(params, out.split([p.numel() for p in params])):
            p.grad = g.view(p.shape).clone()
        committed = self.manager.current_step()
        self.optimizer.step()
        return out if self.manager.current_step() > committed else None

    def shared_state(self):
        """The hook state every replica must agree on (not the per-replica error feedback)."""
        d = self.state.state_dict()
        for key in ("residuals", "errors", "bytes_sent", "buckets_reduced"):
            d.pop(key, None)
        return d


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _heal_and_discard_case(kind):
    import copy

    rank = dist.get_rank()
    group, server = _two_replica_group()
    out = {}
    try:
        me = _Replica(kind, group)
        for s in range(3):
            assert me.step(s) is not None
        # Replica 1 dies and comes back: a fresh process heals from replica 0 (what torchft sends it). The
        # reference: replica 1 never died but forgot its error feedback. Both pairs run the same next step
        # and must give the same bits, so the healed replica got everything else it needed (PowerSGD:
        # the Qs for the warm start, the iteration, the generator; top-k: the iteration).
        sent = [me.training.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(sent, src=0)
        if rank == 0:
            healed, reference = me, _Replica(kind, group)
            copied = copy.deepcopy(sent[0])
            reference.net.load_state_dict(copied["model"])
            reference.inner.load_state_dict(copied["optimizer"])
            reference.state.load_state_dict(copied["hook"])
        else:
            healed = _Replica(kind, group)
            healed.training.load_state_dict(sent[0])
            out["healed_error_feedback"] = ([bool(r.any()) for r in healed.state.residuals.values()] if kind == "topk"
                                            else list(healed.state._error_of))
            out["heals"] = healed.training.heals
            reference = me
            reference.state.reset_error_feedback()
        out["healed_step"] = healed.step(3)
        out["reference_step"] = reference.step(3)
        # A discarded step (the hook ran, then the step failed): nothing is applied, the hook state is put
        # back as it was (Note [Discarded steps]), so the pair goes on exactly as the reference pair, which
        # never took that step: the same bits, the same hook state (error feedback included).
        before = [p.detach().clone() for p in healed.net.parameters()]
        out["discarded"] = healed.step(4, fail=True) is None and healed.manager.errors != []
        out["unchanged_by_discard"] = all(torch.equal(p, q) for p, q in zip(before, healed.net.parameters()))
        out["shared_state"] = healed.shared_state()
        out["after"] = healed.step(5)
        out["reference_after"] = reference.step(5)
        mine, ref = healed.state.state_dict(), reference.state.state_dict()
        out["bytes_counted"] = mine.pop("bytes_sent") > ref.pop("bytes_sent")  # the discarded step's bytes were sent
        out["same_hook_state_as_reference"] = _same(mine, ref)
        out["params"] = [p.detach().clone() for p in healed.net.parameters()]
        out["reference_params"] = [p.detach().clone() for p in reference.net.parameters()]
    finally:
        group.shutdown()
        del server
    return out


@pytest.mark.parametrize("kind", ["topk", "powersgd"])
def test_healed_replica_continues_with_its_peers_hook_state_and_a_discarded_step_leaves_no_trace(dist_pool, kind):
    a, b = dist_pool(2).run(_heal_and_discard_case, kind, timeout=120)
    assert b["heals"] == 1
    assert b["healed_error_feedback"] in ([], [False] * 4)  # powersgd: no error remembered; top-k: zeros
    for r in (a, b):
        assert r["healed_step"] is not None and torch.equal(r["healed_step"], r["reference_step"])
        assert r["discarded"] and r["unchanged_by_discard"]
    assert _same(a["shared_state"], b["shared_state"])
    assert torch.equal(a["after"], b["after"])
    for r in (a, b):
        assert torch.equal(r["after"], r["reference_after"]) and r["same_hook_state_as_reference"]
        assert r["bytes_counted"]
        assert all(torch.equal(p, q) for p, q in zip(r["params"], r["reference_params"]))
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


# ---- LocalSGD / DiLoCo rounds across a heal and a discarded round (two replicas of the worker pool) ----

class _RoundReplica:
    """One replica of the pool's two, training a small regression with ManagedDiLoCo / ManagedLocalSGD
    (rounds of 3 inner steps) under a FakeManager; what torchft would send a healing peer is what the
    manager's registered functions save."""

    def __init__(self, algo, compression, group):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        self.inner = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        self.manager = FakeManager(participants=2)
        self.training = ft.TrainingState(self.net, self.inner)
        self.manager.register_state_dict_fn("pyparallel", self.training.load_state_dict, self.training.state_dict)
        cls = ft.ManagedDiLoCo if algo == "diloco" else ft.ManagedLocalSGD
        self.opt = cls(self.manager, group, self.net, self.inner, 3, compression=compression, transport="ring")

    def round(self, fail=False):
        r = self.opt.start_round()
        for j in range(3):
            gen = torch.Generator().manual_seed(1000 * r + 10 * j + dist.get_rank())
            x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 3, generator=gen)
            self.opt.zero_grad()
            torch.nn.functional.mse_loss(self.net(x), y).backward()
            self.manager.fail_commit = fail and j == 2
            self.opt.step()
        return self.opt.last_round_committed

    def heal_state(self):
        return {key: save() for key, (_, save) in self.manager.state_fns.items()}

    def heal(self, sent, step):
        for key, (load, _) in self.manager.state_fns.items():  # as torchft's _apply_pending_state_dict
            load(sent[key])
        self.manager.step = step

    def state(self):
        """Model and LocalSGD / DiLoCo state (anchor, outer and inner optimizers, residual, counters)."""
        out = ft.detached_copy({"model": self.net.state_dict(), "opt": self.opt.state_dict()})
        out["opt"].pop("bytes_sent")  # a discarded round's bytes did go on the wire
        return out


def _rounds_case(algo, compression):
    rank = dist.get_rank()
    group, server = _two_replica_group()
    out = {}
    try:
        me = _RoundReplica(algo, compression, group)
        assert me.round()
        # Replica 1 heals from replica 0 after round 0, through what the manager's registered functions
        # send. The reference pair loads replica 0's whole checkpoint instead (model, and LocalSGD /
        # DiLoCo's state_dict: inner optimizer, anchor, outer optimizer, residual, counters), and replica 1
        # of it forgets the residual: the heal must have carried everything else.
        sent = [(me.heal_state(), me.manager.step, me.net.state_dict(), me.opt.state_dict()) if rank == 0 else None]
        # What a donor serves must not change while it trains on (torchft sends it from memory).
        kept = me.heal_state()
        kept_then = ft.detached_copy(kept)
        dist.broadcast_object_list(sent, src=0)
        heal, step, model, checkpoint = ft.detached_copy(sent[0])  # rank 0's holds its live tensors
        healed, reference = (me, _RoundReplica(algo, compression, group)) if rank == 0 else \
            (_RoundReplica(algo, compression, group), me)
        reference.net.load_state_dict(model)
        reference.opt.load_state_dict(checkpoint)
        reference.manager.step = step
        if rank == 1:
            healed.heal(heal, step)
            out["healed_residual_zero"] = all(not f.residual.any() for frag in healed.opt._fragments
                                              for f in frag.flats if f.residual is not None)
            reference.opt.reset_error_feedback()
        # A discarded round (the all-reduce went through, then should_commit said no): anchor, outer
        # optimizer and model as before it; inner optimizer, residual and counters back to the round's start.
        before = healed.state()
        out["discarded"] = healed.round(fail=True) is False
        out["discard_left_no_trace"] = _same(healed.state(), before)
        out["model_is_anchor"] = all(torch.equal(p, a) for p, a in zip(
            healed.net.parameters(), healed.opt.global_parameters()))
        # The retried round and the next: exactly the reference pair's two rounds.
        out["committed"] = [healed.round(), healed.round(), reference.round(), reference.round()]
        out["same_as_reference"] = _same(healed.state(), reference.state())
        out["anchor"] = [a.clone() for a in healed.opt.global_parameters()]
        out["params"] = [p.detach().clone() for p in healed.net.parameters()]
        out["rounds"] = healed.manager.step
        out["heal_state_kept"] = _same(kept, kept_then)
    finally:
        group.shutdown()
        del server
    return out


@pytest.mark.parametrize("algo,compression", [("diloco", "topk"), ("localsgd", None)])
def test_rounds_heal_with_the_outer_state_and_a_discarded_round_leaves_no_trace(dist_pool, algo, compression):
    a, b = dist_pool(2).run(_rounds_case, algo, compression, timeout=120)
    if compression == "topk":
        assert b["healed_residual_zero"]
    for r in (a, b):
        assert r["discarded"] and r["discard_left_no_trace"] and r["model_is_anchor"]
        assert r["committed"] == [True] * 4 and r["rounds"] == 3
        assert r["same_as_reference"] and r["heal_state_kept"]
    assert all(torch.equal(x, y) for x, y in zip(a["anchor"] + a["params"], b["anchor"] + b["params"]))


def test_managed_rounds_refuse_what_they_do_not_support():
    net = torch.nn.Linear(3, 2)
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="overlap=True is not supported"):
        ft.ManagedDiLoCo(FakeManager(), FakeGroup(OneRank()), net, inner, 4, overlap=True)
    with pytest.raises(ValueError, match="fragments > 1"):
        ft.ManagedLocalSGD(FakeManager(), FakeGroup(OneRank()), net, inner, 4, fragments=2)
    with pytest.raises(TypeError, match="ManagedGroup"):
        ft.ManagedDiLoCo(FakeManager(), object(), net, inner, 4)
    with pytest.raises(TypeError, match="no process_group"):
        ft.ManagedDiLoCo(FakeManager(), FakeGroup(OneRank()), net, inner, 4, process_group=None)


# ---- replicas of two ranks: exact inside, compressed across (four ranks of the worker pool) ----

def _replica_group_case(seed):
    from pyparallel import reference

    rank = dist.get_rank()
    replicas = [[0, 1], [2, 3]]  # replica r holds ranks 2r, 2r+1; local rank l crosses with local rank l
    inside = [dist.new_group(ranks) for ranks in replicas]
    across = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = ft.ReplicaGroup(inside[rank // 2], across[rank % 2])
    out = {"rank": group.rank(), "size": group.size()}
    for numel in (1001, 17, 0, 40000):
        for name, kw in {"dense": {}, "int8": dict(compression="int8"), "avg": dict(op="avg"),
                         "int8_avg": dict(compression="int8", op="avg"), "topk": {"k": 30},
                         "dense_fp16": {}, "avg_bf16": dict(op="avg"), "int8_bf16": dict(compression="int8"),
                         }.items():
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name.rsplit("_", 1)[-1], torch.float32)
            gen = torch.Generator().manual_seed(seed + numel)
            inputs = [torch.randn(numel, generator=gen).to(dtype) for _ in range(4)]
            residuals = [torch.randn(numel, generator=gen) * 0.1 for _ in range(4)]
            x = inputs[rank].clone()
            if name == "topk":
                k = min(numel, 30)
                r = residuals[rank].clone()
                pyparallel.all_reduce(x, group=group, compression=pyparallel.Topk(k=k, residual=r))
                ref_residuals = [t.clone() for t in residuals]
                want = reference.hierarchical_all_reduce(inputs, replicas, compression="topk", k=k,
                                                         residuals=ref_residuals)
                out[(name, numel, "residual")] = bool(torch.equal(r, ref_residuals[rank]))
            else:
                pyparallel.all_reduce(x, group=group, **kw)
                want = reference.hierarchical_all_reduce(inputs, replicas, average=kw.get("op") == "avg",
                                                         compression=kw.get("compression"))
            out[(name, numel)] = bool(torch.equal(x, want))
            out[(name, numel, "digest")] = x.sum().item() if numel else 0.0
            # The C++ hierarchical op, given this replica's shared memory and the cross group by name (one
            # piece), computes the same bits: ReplicaGroup differs from it only on the failure path.
            code, param = (2, min(numel, 30)) if name == "topk" else (1, 256) if "compression" in kw else (0, 0)
            y = inputs[rank].clone()
            r = residuals[rank].clone() if name == "topk" else None
            torch.ops.pyparallel.hierarchical_all_reduce_(
                y, transport.resources(group.replica).shared_memory(), group.cross.group_name, 4,
                kw.get("op") == "avg", code, param, r, 0)
            out[(name, numel, "c++ op")] = bool(torch.equal(x, y))
    # PowerSGD with the ReplicaGroup as its group (sums of P and Q through it) equals PowerSGD on the flat
    # group of the 4 ranks up to summation order, and gives the same bits on every rank.
    for which, g, how in (("replicas", group, "auto"), ("flat", dist.group.WORLD, "ring")):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
        state = hooks.PowerSGDState(g, how, matrix_approximation_rank=2, start_powerSGD_iter=1).register_model(net)
        params = list(net.parameters())
        for step in range(3):  # the first step is exact, then compressed with error feedback
            grads = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(10 * step + rank))
            out[("powersgd", which, step)] = hooks.powersgd_hook(state, Bucket(0, grads, params, is_last=True)).wait()
    # A cross-replica step that fails for local rank 0 only (its two ranks disagree on the int8 block size,
    # which the header check catches): every rank of both replicas raises, and the next all-reduce works
    # (the shared memory stays in step).
    x = torch.ones(1000)
    try:
        pyparallel.all_reduce(x, group=group, compression=pyparallel.Int8(block_size=128 if rank == 2 else 256))
        out["mismatch"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["mismatch"] = str(exc).splitlines()[0][:300]
    x = torch.full((1000,), float(rank))
    pyparallel.all_reduce(x, group=group)
    out["after"] = bool(torch.equal(x, torch.full((1000,), 6.0)))
    with pytest.raises(ValueError, match="transport must be 'auto' or 'hierarchical'"):
        pyparallel.all_reduce(torch.ones(3), group=group, transport="ring")
    pyparallel.comm.release(group)
    return out


def test_replica_group_is_the_hierarchical_all_reduce_with_replicas_for_hosts(dist_pool):
    import random

    results = dist_pool(4).run(_replica_group_case, random.randrange(2**20), timeout=180)
    assert [r["rank"] for r in results] == [0, 1, 2, 3] and all(r["size"] == 4 for r in results)
    for step in range(3):
        mine = [r.pop(("powersgd", "replicas", step)) for r in results]
        flat = [r.pop(("powersgd", "flat", step)) for r in results]
        assert all(torch.equal(m, mine[0]) for m in mine), step  # bitwise identical on every rank
        assert torch.allclose(mine[0], flat[0], rtol=1e-4, atol=1e-5), (step, (mine[0] - flat[0]).abs().max())
    for key in [k for k in results[0] if isinstance(k, tuple)]:
        if key[-1] == "digest":
            assert len({r[key] for r in results}) == 1, key  # bitwise identical on every rank
        else:  # equal to the reference, bitwise (and the top-k residuals too)
            assert all(r[key] for r in results), (key, [r[key] for r in results])
    errors = [r["mismatch"] for r in results]
    assert "block" in errors[0] and "block" in errors[2], errors  # local rank 0: its own header check
    assert all("failed on 1 other rank(s) of this replica" in errors[i] for i in (1, 3)), errors
    assert all(r["after"] for r in results)


# ---- whole runs: replicas as processes, one SIGKILLed ----

def _launch(tmp, *extra, replicas=3, ranks_per_replica=1, timeout=240):
    out = os.path.join(tmp, "summary.json")
    cmd = [sys.executable, "-m", "pyparallel.train", "--fault-tolerant", "--replicas", str(replicas),
           "--ranks-per-replica", str(ranks_per_replica), "--hidden", "32", "--threads", "1", "--no-progress",
           "--json", out, "--log-dir", os.path.join(tmp, "logs"), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out) as f:
        summary = json.load(f)
    params = {}  # by replica (local rank 0), and by "replica.local rank" for the others
    for i in range(replicas):
        for local in range(ranks_per_replica):
            path = os.path.join(summary["run_dir"], f"replica{i}" + (f".rank{local}" if local else "") + ".params.pt")
            if os.path.exists(path):
                params[i if local == 0 else f"{i}.{local}"] = torch.load(path)
    return summary, params, proc.stderr


def _full_batch_reference(steps, global_batch, hidden=32):
    """What data-parallel training computes, in one process: SGD on each whole global batch (the ranks'
    shares are equal, so the mean of their mean gradients is the batch's mean gradient)."""
    from pyparallel.train import load_digits_split, make_model, parser

    args = parser().parse_args(["--fault-tolerant"])
    x, y, _, _ = load_digits_split(args.seed)
    model = make_model(hidden, args.layers, args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    per_epoch = len(x) // global_batch
    for step in range(steps):
        epoch, s = divmod(step, per_epoch)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        idx = perm[s * global_batch:(s + 1) * global_batch]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


def test_survivors_finish_with_equal_parameters_when_a_replica_is_killed():
    # Replica 1 dies in step 5 and is not restarted: replicas 0 and 2 go on in a quorum of two, split each
    # global batch between them and end with bitwise-equal parameters.
    with tempfile.TemporaryDirectory() as tmp:
        s, params, log = _launch(tmp, "--epochs", "2", "--min-replicas", "2", "--max-restarts", "0",
                                 "--kill-at-step", "5", "--kill-replica", "1", "--transport", "ring", "--timeout", "10")
    assert "replica 1 (incarnation 0) killed by SIGKILL" in log
    assert sorted(params) == [0, 2]
    assert all(torch.equal(p, q) for p, q in zip(params[0], params[2]))
    assert s["parameters_equal"] and s["steps"] == 2 * (1437 // 96)
    assert s["participants_per_step"] == [3] * 5 + [2] * (s["steps"] - 5)
    assert s["longest_stall_s"] < 10 + 5


def test_killed_replica_restarts_rejoins_and_heals_with_its_hook_state():
    # Every step needs all three replicas (--min-replicas 3), so the survivors wait for the restarted replica
    # 1, which heals from a live peer: model, optimizer and the top-k hook's iteration (with warm-up
    # steps, a replica whose iteration lagged would send dense buckets while its peers send sparse ones,
    # and every step would fail on the header check). The shared-memory transport runs on each quorum's group.
    with tempfile.TemporaryDirectory() as tmp:
        s, params, log = _launch(tmp, "--epochs", "2", "--min-replicas", "3", "--max-restarts", "1",
                                 "--kill-at-step", "4", "--kill-replica", "1", "--hook", "topk", "--ratio", "0.1",
                                 "--warmup-steps", "2", "--transport", "shm", "--timeout", "60")
    assert "replica 1 restarted" in log
    assert sorted(params) == [0, 1, 2]
    assert all(torch.equal(p, q) for i in (1, 2) for p, q in zip(params[0], params[i]))
    assert s["heals"]["1"] >= 1 and s["rejoined_at_step"]["1"] == [4]
    assert s["participants_per_step"] == [3] * s["steps"]


def test_killed_replica_heals_with_powersgd_state_past_its_start():
    # PowerSGD compresses from step 2 on; replica 1 dies in step 4 and every step needs all three, so the
    # restarted replica must heal with the iteration (a replica that started over would send exact
    # buckets while its peers send P and Q: every step would fail), the generator and the Qs.
    with tempfile.TemporaryDirectory() as tmp:
        s, params, log = _launch(tmp, "--epochs", "2", "--min-replicas", "3", "--max-restarts", "1",
                                 "--kill-at-step", "4", "--kill-replica", "1", "--hook", "powersgd",
                                 "--powersgd-rank", "1", "--powersgd-start-iter", "2", "--transport", "ring",
                                 "--timeout", "60")
    assert "replica 1 restarted" in log
    assert sorted(params) == [0, 1, 2]
    assert all(torch.equal(p, q) for i in (1, 2) for p, q in zip(params[0], params[i]))
    assert s["heals"]["1"] >= 1 and s["rejoined_at_step"]["1"] == [4]
    assert s["participants_per_step"] == [3] * s["steps"]


def test_diloco_survivors_finish_with_equal_anchors_when_a_replica_is_killed():
    # DiLoCo, rounds of H = 4 inner steps (7 rounds in 2 epochs), int8 on the wire. Replica 1 dies in inner
    # step 10 (round 2); the survivors find out in round 2's synchronisation, discard the round and retry
    # it in a quorum of two: the round's pseudo-gradients averaged over 2. Their models, which are the
    # anchor after every synchronisation, end bitwise equal.
    with tempfile.TemporaryDirectory() as tmp:
        s, params, log = _launch(tmp, "--algo", "diloco", "--sync-every", "4", "--compression", "int8", "--epochs",
                                 "2", "--min-replicas", "2", "--max-restarts", "0", "--kill-at-step", "10",
                                 "--kill-replica", "1", "--transport", "ring", "--timeout", "10")
    assert "replica 1 (incarnation 0) killed by SIGKILL" in log
    assert sorted(params) == [0, 2]
    assert all(torch.equal(p, q) for p, q in zip(params[0], params[2]))
    assert s["parameters_equal"] and s["algo"] == "diloco" and s["steps"] == 2 * (1437 // 96) // 4
    assert s["participants_per_step"] == [3, 3] + [2] * (s["steps"] - 2)
    discarded = sorted((e["replica"], e["step"]) for e in s["steps_log"] if not e["committed"])
    assert discarded == [(0, 2), (2, 2)]
    assert s["longest_stall_s"] < 10 + 5


def test_diloco_replica_restarts_and_heals_with_the_outer_state():
    # Every round needs all three replicas; replica 1 dies in inner step 10 (round 2) and the survivors
    # wait for its restart, which heals from a live peer before round 2: model (= anchor), inner
    # optimizer, anchor, outer optimizer's Nesterov momentum, round; its top-k residual starts at zero. A
    # healed replica that missed any of these would step its anchor differently from its peers.
    with tempfile.TemporaryDirectory() as tmp:
        s, params, log = _launch(tmp, "--algo", "diloco", "--sync-every", "4", "--compression", "topk", "--ratio",
                                 "0.1", "--epochs", "2", "--min-replicas", "3", "--max-restarts", "1",
                                 "--kill-at-step", "10", "--kill-replica", "1", "--transport", "ring", "--timeout",
                                 "60")
    assert "replica 1 restarted" in log
    assert sorted(params) == [0, 1, 2]
    assert all(torch.equal(p, q) for i in (1, 2) for p, q in zip(params[0], params[i]))
    assert s["heals"]["1"] >= 1 and s["rejoined_at_step"]["1"] == [2]
    assert s["participants_per_step"] == [3] * s["steps"]


def test_replicas_of_two_ranks_survive_a_dead_replica_and_match_full_batch_training():
    # Two replicas of two ranks (shared memory inside a replica): local rank 1 of replica 1 dies in step 5,
    # the launcher kills its sibling, and is not allowed to restart them; replica 0's two ranks go on alone.
    # The data schedule does not depend on who is alive, and the exact hook sums every rank's share, so every
    # step is a step on the whole global batch: the result is full-batch SGD up to fp32 summation order.
    with tempfile.TemporaryDirectory() as tmp:
        s, params, log = _launch(tmp, "--epochs", "2", "--min-replicas", "1", "--max-restarts", "0", "--hook",
                                 "allreduce", "--kill-at-step", "5", "--kill-replica", "1", "--kill-local-rank", "1",
                                 "--timeout", "10", replicas=2, ranks_per_replica=2)
    assert "replica 1 (incarnation 0) killed by SIGKILL" in log
    assert sorted(params, key=str) == [0, "0.1"]
    assert all(torch.equal(p, q) for p, q in zip(params[0], params["0.1"]))
    steps = 2 * (1437 // 128)
    assert s["parameters_equal"] and s["steps"] == steps and s["ranks_per_replica"] == 2
    assert s["participants_per_step"] == [2] * 5 + [1] * (steps - 5)
    reference = _full_batch_reference(steps, 128)
    for p, q in zip(params[0], reference):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # measured: 3e-8 (fp32 order), weights ~0.2


def test_replica_of_two_ranks_restarts_as_a_unit_and_heals_with_the_topk_hook():
    # Local rank 0 of replica 1 (the one that hosts the replica's store and manager server) dies in step 4;
    # the launcher kills local rank 1 too and restarts both; every step needs both replicas, so replica 0
    # waits, and the restarted pair heals from replica 0 (local rank l from local rank l) with the top-k
    # hook's iteration past its warm-up. All four ranks end bitwise equal.
    with tempfile.TemporaryDirectory() as tmp:
        s, params, log = _launch(tmp, "--epochs", "2", "--min-replicas", "2", "--max-restarts", "1", "--hook", "topk",
                                 "--ratio", "0.1", "--warmup-steps", "2", "--kill-at-step", "4", "--kill-replica", "1",
                                 "--timeout", "30", replicas=2, ranks_per_replica=2)
    assert "replica 1 restarted" in log
    assert sorted(params, key=str) == [0, "0.1", 1, "1.1"]
    assert all(torch.equal(p, q) for key in ("0.1", 1, "1.1") for p, q in zip(params[0], params[key]))
    assert s["heals"]["1"] >= 1 and s["rejoined_at_step"]["1"] == [4]
    assert s["participants_per_step"] == [2] * s["steps"]
