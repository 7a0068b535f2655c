"""Transports: shared memory on one host, hierarchical across (emulated) hosts, the policy that picks them,
and the transport seam's guarantees (no collective on the caller's group, header always checked).

Hosts are emulated per rank with PYPARALLEL_HOST on a fresh group (the layout is read once per group), and
small shared-memory slots (PYPARALLEL_SHM_SLOT_BYTES) stream the larger tensors through many rounds.
Results are compared bitwise with pyparallel.reference, and across ranks by digest.
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

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 2, 3, 5, 16, 17, 1000, 4099, 65_537, 300_001]
SMALL_SLOT = 4096  # bytes: 300_001 fp32 elements take ~150 rounds through a 32 KiB segment
SMALL_PIECE = 40_000  # bytes: the hierarchical all-reduce pipelines 300_001 fp32 elements in 31 pieces


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _all_inputs(seed, shape, dtype, world):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * (r + 1)).to(dtype) for r in range(world)]


def _hosts(n: int, nhosts: int) -> list[list[int]]:
    return [[r for r in range(n) if r * nhosts // n == h] for h in range(nhosts)]


class _Group:
    """A new group over every rank, with this rank on emulated host rank * nhosts // n."""

    def __init__(self, nhosts: int, slot: int | None = SMALL_SLOT, piece: int | None = SMALL_PIECE):
        self.n, self.rank = dist.get_world_size(), dist.get_rank()
        self.hosts = _hosts(self.n, nhosts)
        self._env = {"PYPARALLEL_HOST": f"host{self.rank * nhosts // self.n}"}
        if slot is not None:
            self._env["PYPARALLEL_SHM_SLOT_BYTES"] = str(slot)
        if piece is not None:
            self._env["PYPARALLEL_HIER_PIECE_BYTES"] = str(piece)

    def __enter__(self) -> dist.ProcessGroup:
        os.environ.update(self._env)
        self.group = dist.new_group(list(range(self.n)))
        return self.group

    def __exit__(self, *exc):
        for key in self._env:
            os.environ.pop(key, None)
        pyparallel.release(self.group)
        dist.destroy_process_group(self.group)


# ---- worker-side cases ----

def _exact_cases(seed, nhosts):
    """shm (one host) or hierarchical (several): every size, dtype and reduction, bitwise vs reference."""
    n, rank = dist.get_world_size(), dist.get_rank()
    digests = []
    with _Group(nhosts) as g:
        hosts = _hosts(n, nhosts)
        want = "ring" if n == 1 else "shm" if nhosts == 1 else "hierarchical"
        auto = "ring" if n == nhosts else want  # one rank per host: nothing to share
        assert pyparallel.resolve_transport(torch.ones(1), g) == auto
        transport = "hierarchical" if want == "hierarchical" else "auto"
        for dtype in DTYPES:
            for numel in SIZES:
                for average in (False, True):
                    xs = _all_inputs(seed + numel, (numel,), dtype, n)
                    t = xs[rank].clone()
                    pyparallel.all_reduce(t, group=g, op="avg" if average else "sum", transport=transport)
                    if want == "hierarchical":
                        expect = _hier_ref(xs, hosts, average)
                    else:
                        expect = ref.shm_all_reduce(xs, average)
                    assert torch.equal(t, expect), (dtype, numel, average)
                    digests.append(_digest(t))
        # n-D and non-contiguous, and an async future
        xs = _all_inputs(seed, (40, 31), torch.float32, n)
        t = xs[rank].clone().t()
        pyparallel.all_reduce(t, group=g, transport=transport)
        flat = [x.t().contiguous() for x in xs]
        expect = _hier_ref(flat, hosts) if want == "hierarchical" else ref.shm_all_reduce(flat)
        assert torch.equal(t, expect)
        t = xs[rank].clone()
        fut = pyparallel.all_reduce(t, group=g, op="avg", async_op=True, transport=transport)
        assert fut.wait() is t
        expect = _hier_ref(xs, hosts, True) if want == "hierarchical" else ref.shm_all_reduce(xs, True)
        assert torch.equal(t, expect)
        digests.append(_digest(t))
    return digests


def _compressed_cases(seed, nhosts):
    """Compression applies across hosts only: exact on one host, the named ring across hosts."""
    n, rank = dist.get_world_size(), dist.get_rank()
    digests = []
    with _Group(nhosts) as g:
        hosts = _hosts(n, nhosts)
        for numel in (0, 1, 1000, 65_537, 300_001):
            xs = _all_inputs(seed + numel, (numel,), torch.float32, n)
            # int8
            t = xs[rank].clone()
            pyparallel.all_reduce(t, group=g, op="avg", compression="int8")
            if nhosts == 1:
                expect = ref.shm_all_reduce(xs, True)
            else:
                expect = _hier_ref(xs, hosts, True, compression="int8")
            assert torch.equal(t, expect), ("int8", numel)
            digests.append(_digest(t))
            # top-k with error feedback, three steps: the residual carries over
            k = max(1, numel // 50) if numel else 0
            residuals = [torch.zeros(numel) for _ in range(n)]
            mine = torch.zeros(numel)
            for step in range(3):
                ys = _all_inputs(seed + numel + step, (numel,), torch.float32, n)
                t = ys[rank].clone()
                pyparallel.all_reduce(t, group=g, op="avg", compression=pyparallel.Topk(k=k, residual=mine))
                if nhosts == 1:
                    expect = ref.shm_all_reduce([y + r for y, r in zip(ys, residuals)], True)
                    for r in residuals:
                        r.zero_()
                else:
                    expect = _hier_ref(ys, hosts, True, compression="topk", k=k, residuals=residuals)
                assert torch.equal(t, expect), ("topk", numel, step)
                assert torch.equal(mine, residuals[rank]), ("residual", numel, step)
                digests.append(_digest(t))
    return digests


def _hier_ref(*args, **kwargs):
    return ref.hierarchical_all_reduce(*args, piece_bytes=SMALL_PIECE, **kwargs)


def _mismatch(nhosts, kind):
    """Rank 0 differs (kind "numel", "dtype", "piece"), or host 0 differs from the others while the ranks of
    every host agree among themselves ("host_avg", "host_numel", "host_k": only the inter-host steps can
    tell, and each of them sees one region; avg against sum was a silent wrong result, a numel or k that
    gave some regions equal sizes left part of a host in the collective)."""
    rank = dist.get_rank()
    host0 = rank * nhosts // dist.get_world_size() == 0
    piece = SMALL_PIECE + (rank == 0) * 4 if kind == "piece" else SMALL_PIECE
    op, compression = "avg" if kind == "host_avg" and host0 else "sum", None
    with _Group(nhosts, piece=piece) as g:
        if kind == "dtype":
            t = torch.ones(100, dtype=torch.float16 if rank == 0 else torch.float32)
        elif kind == "host_numel":  # regions [0, 64) match across hosts, [64, 100) and [64, 116) do not
            t = torch.ones(100 if host0 else 116)
        elif kind == "host_k":  # k 10 or 11 of 100: 7 or 8 in the first region, 4 in the second
            t, compression = torch.ones(100), pyparallel.Topk(k=10 if host0 else 11)
        else:
            t = torch.ones(100 + (rank == 0 and kind == "numel"))
        try:
            pyparallel.all_reduce(t, group=g, op=op, compression=compression)
            msg = None
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
        if kind != "piece":  # the group is still usable after a mismatch (pieces stay mismatched)
            ok = torch.ones(10)
            pyparallel.all_reduce(ok, group=g)
            assert bool((ok == dist.get_world_size()).all())
    return msg


def _late_rank_in_shared_memory():
    """Rank 0 reaches a shared-memory all-reduce after the others gave up on it (the group's timeout): it must
    raise too, not pass the barrier that their arrivals already satisfy and return a result of a collective
    they abandoned (it did: Note [Published failures], csrc/comm/shm.cpp)."""
    import datetime

    rank = dist.get_rank()
    g = dist.new_group(list(range(dist.get_world_size())), timeout=datetime.timedelta(seconds=2))
    try:
        pyparallel.all_reduce(torch.ones(10), group=g)  # sets up the segment
        t = torch.full((10,), float(rank + 1))
        if rank == 0:
            time.sleep(3.5)
        try:
            pyparallel.all_reduce(t, group=g)
            msg = None
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
        untouched = bool((t == rank + 1).all())
    finally:
        pyparallel.release(g)
        dist.destroy_process_group(g)
    return msg, untouched


def _another_transport_on_rank_0(set_up_first: bool):
    """Rank 0 asks for the ring, the others for shared memory, on a group with a 2 s timeout; returns the
    first line of the error (None if none). On the group's first collective (not set_up_first) each waits
    in the transport's set-up for ranks that never come, and must say so (it said only "Wait timeout").
    Once both transports are set up, rank 0's header check times out in Gloo, and must say that it was the
    header check and what usually causes it (it gave Gloo's message alone)."""
    import datetime

    rank = dist.get_rank()
    g = dist.new_group(list(range(dist.get_world_size())), timeout=datetime.timedelta(seconds=2))
    try:
        for transport in ("ring", "shm") if set_up_first else ():
            pyparallel.all_reduce(torch.ones(10), group=g, transport=transport)
        pyparallel.all_reduce(torch.ones(10), group=g, transport="ring" if rank == 0 else "shm")
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        pyparallel.release(g)
        dist.destroy_process_group(g)


def _die_on_another_host():
    """Rank 1 (host 0) is SIGKILLed during hierarchical all-reduces of 2 hosts x 2 ranks. Rank 3's inter-host
    step loses it and rank 3 leaves the collective; rank 2, on host 1 with it, must learn that from the
    segment (Note [Published failures]) instead of pairing its shared-memory barriers with rank 3's next
    collective (it raised "ranks disagree on the numel", a collective it never called)."""
    import datetime

    from dist_harness import kill_rank_one_during_all_reduces

    rank, n = dist.get_rank(), dist.get_world_size()
    os.environ["PYPARALLEL_HOST"] = f"host{rank * 2 // n}"
    try:
        g = dist.new_group(list(range(n)), timeout=datetime.timedelta(seconds=10))
        pyparallel.all_reduce(torch.ones(4), group=g)  # the layout is read here, with the variable set
    finally:
        os.environ.pop("PYPARALLEL_HOST")
    return kill_rank_one_during_all_reduces(g, torch.randn(4 << 20), "hierarchical")


def _die_in_shared_memory():
    """Rank 1 is SIGKILLed during large shared-memory all-reduces; the others must raise, naming it."""
    from dist_harness import kill_rank_one_during_all_reduces

    g = dist.new_group(list(range(dist.get_world_size())))
    return kill_rank_one_during_all_reduces(g, torch.randn(16 << 20), "shm")


def _ddp_find_unused_with_our_hook(transport):
    """torch DDP's own collectives (find_unused_parameters) run on the group while our hook's collective runs
    on our worker thread: nothing may cross (it did while the header check was an all-gather on the group)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from pyparallel import hooks

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.Linear(256, 8))
    model = DDP(net, find_unused_parameters=True, bucket_cap_mb=0.05)
    state = hooks.Int8State(transport=transport)
    model.register_comm_hook(state, hooks.int8_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(12):
        x = torch.randn(32, 64, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _digest(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def _async_then_torch_all_reduce(transport):
    n = dist.get_world_size()
    for i in range(30):
        a = torch.full((50_000,), float(dist.get_rank() + i))
        b = torch.full((1000,), 1.0)
        fut = pyparallel.all_reduce(a, async_op=True, transport=transport)
        dist.all_reduce(b)
        fut.wait()
        assert bool((b == n).all()), i
        assert bool((a == sum(r + i for r in range(n))).all()), i


def _hooks_pick_the_transport(nhosts):
    """A default hook state ("auto") on one host reduces exactly through shared memory (nothing on the
    wire); across hosts, compressed between hosts. Through torch DDP and our DataParallel."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from pyparallel import hooks

    n, rank = dist.get_world_size(), dist.get_rank()
    out = []
    with _Group(nhosts, slot=None) as g:
        for wrapper in ("ddp", "ours"):
            torch.manual_seed(0)
            net = torch.nn.Linear(300, 100)
            state = hooks.Int8State(g)
            if wrapper == "ddp":
                model = DDP(net, process_group=g)
                model.register_comm_hook(state, hooks.int8_hook)
            else:
                model = pyparallel.DataParallel(net, process_group=g, comm_hook=hooks.int8_hook, hook_state=state)
            xs = [torch.randn(8, 300, generator=torch.Generator().manual_seed(r)) for r in range(n)]
            model(xs[rank]).square().sum().backward()
            grads = []
            for r in range(n):  # every rank's local gradient, replayed here
                net_r = torch.nn.Linear(300, 100)
                net_r.load_state_dict(net.state_dict())
                net_r(xs[r]).square().sum().backward()
                grads.append(torch.cat([net_r.weight.grad.reshape(-1), net_r.bias.grad.reshape(-1)]))
            mine = torch.cat([net.weight.grad.reshape(-1), net.bias.grad.reshape(-1)])
            if nhosts == 1:
                exact = ref.shm_all_reduce(grads, True)
                assert torch.allclose(mine, exact, rtol=1e-5, atol=1e-6), wrapper  # layout order may differ
                assert state.bytes_sent == 0, state.bytes_sent
            else:
                assert state.bytes_sent > 0
                exact = sum(grads) / n
                bound = (1 + 1 / 254) ** n - 1
                assert float((mine - exact).abs().max()) <= bound * float(sum(x.abs().max() for x in grads)) + 1e-6
            out.append(_digest(mine))
    return out


def _held_by_this_process():
    """(our threads, open file descriptors, our shared-memory mappings) of this process."""
    threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("pyparallel-"))
    with open("/proc/self/maps") as f:
        maps = sorted({line.split(None, 5)[-1].strip() for line in f if "/pyparallel-" in line})
    return threads, len(os.listdir("/proc/self/fd")), maps


def _destroy_frees_everything(nhosts):
    """A group used through every path (ring, auto = shm or hierarchical, async) and then destroyed, with
    no pyparallel.release: its worker thread, mapping and inter-host groups are gone, and repeating it does
    not grow the open file descriptors."""
    import gc

    n, rank = dist.get_world_size(), dist.get_rank()
    os.environ["PYPARALLEL_HOST"] = f"host{rank * nhosts // n}"
    threads0, _, maps0 = _held_by_this_process()  # other groups' (the world's, from earlier cases)
    fds = []
    try:
        for _ in range(3):
            g = dist.new_group(list(range(n)))
            t = torch.ones(100_000)
            pyparallel.all_reduce(t, group=g)
            pyparallel.all_reduce(t, group=g, compression="int8", async_op=True).wait()
            pyparallel.all_reduce(t, group=g, transport="ring")
            assert float(t[0]) == n ** 3
            threads, _, maps = _held_by_this_process()
            assert threads != threads0 and maps != maps0, (threads, maps)  # else the check below is vacuous
            dist.destroy_process_group(g)
            del g
            gc.collect()
            threads, nfd, maps = _held_by_this_process()
            assert threads == threads0 and maps == maps0, (threads, maps)
            fds.append(nfd)
    finally:
        os.environ.pop("PYPARALLEL_HOST")
    return fds


# ---- tests ----

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shm_bitwise_vs_reference(dist_pool, world_size):
    digests = dist_pool(world_size).run(_exact_cases, random.randrange(2**30), 1, timeout=300)
    assert all(d == digests[0] for d in digests), "ranks disagree"


@pytest.mark.parametrize("world_size,nhosts", [(4, 2), (2, 2)])
def test_hierarchical_bitwise_vs_reference(dist_pool, world_size, nhosts):
    digests = dist_pool(world_size).run(_exact_cases, random.randrange(2**30), nhosts, timeout=300)
    assert all(d == digests[0] for d in digests), "ranks disagree"


@pytest.mark.parametrize("world_size,nhosts", [(3, 1), (4, 2)])
def test_compression_only_across_hosts(dist_pool, world_size, nhosts):
    digests = dist_pool(world_size).run(_compressed_cases, random.randrange(2**30), nhosts, timeout=300)
    assert all(d == digests[0] for d in digests), "ranks disagree"


@pytest.mark.parametrize("nhosts,kind", [(1, "numel"), (1, "dtype"), (2, "numel"), (2, "piece"), (2, "host_avg"),
                                         (2, "host_numel"), (2, "host_k")])
def test_mismatch_raises_on_every_rank(dist_pool, nhosts, kind):
    messages = dist_pool(4).run(_mismatch, nhosts, kind, timeout=60)
    for msg in messages:
        assert msg is not None and "ranks disagree" in msg, msg
    if nhosts == 1:
        assert len(set(messages)) == 1, messages


def test_sigkill_in_shared_memory_raises_and_leaves_nothing():
    from dist_harness import assert_rank_one_killed_is_named

    before = {f for f in os.listdir("/dev/shm") if f.startswith("pyparallel-")}
    assert_rank_one_killed_is_named(_die_in_shared_memory, timeout=90)
    after = {f for f in os.listdir("/dev/shm") if f.startswith("pyparallel-")}
    assert after <= before, f"left in /dev/shm: {after - before}"


def test_late_rank_in_shared_memory_raises_instead_of_using_abandoned_data(dist_pool):
    (late, untouched), *others = dist_pool(3).run(_late_rank_in_shared_memory, timeout=60)
    for msg, _ in others:
        assert msg is not None and "timed out" in msg, msg
    assert late is not None and "gave up" in late and "timed out" in late, late
    assert untouched


def test_transport_mismatch_at_set_up_names_the_ranks_and_the_cause(dist_pool):
    ring, *shm = dist_pool(3).run(_another_transport_on_rank_0, False, timeout=60)
    assert ring is not None and "ranks [0, 1, 2]" in ring and "same transport" in ring, ring
    for msg in shm:
        assert msg is not None and "rank(s) [0]" in msg and "shared-memory segment" in msg, msg


def test_transport_mismatch_after_set_up_says_it_was_the_header_check(dist_pool):
    ring, *shm = dist_pool(3).run(_another_transport_on_rank_0, True, timeout=60)
    assert ring is not None and "header check" in ring and "same transport" in ring, ring
    for msg in shm:
        assert msg is not None and "timed out" in msg, msg


def test_sigkill_on_another_host_raises_everywhere_without_crossing_collectives():
    from dist_harness import WorkerPool

    pool = WorkerPool(4, pg_timeout_s=10)
    try:
        outcomes = pool.outcomes(_die_on_another_host, timeout=120)
    finally:
        pool.kill()
    assert outcomes[1][0] == "died"
    for rank in (0, 2, 3):
        status, value = outcomes[rank]
        assert status == "ok", value
        first, later = value
        assert first is not None and first[0] < 10 + 5, (rank, first)
        assert "disagree" not in first[1], (rank, first)
        assert later is not None and later[0] < 1 and "disagree" not in later[1], (rank, later)


@pytest.mark.parametrize("transport", ["ring", "auto"])
def test_ddp_find_unused_parameters_with_our_hook(dist_pool, transport):
    digests = dist_pool(2).run(_ddp_find_unused_with_our_hook, transport, timeout=120)
    assert digests[0] == digests[1]


@pytest.mark.parametrize("transport", ["ring", "auto"])
def test_async_all_reduce_then_torch_all_reduce(dist_pool, transport):
    dist_pool(2).run(_async_then_torch_all_reduce, transport, timeout=120)


@pytest.mark.parametrize("world_size,nhosts", [(2, 1), (4, 2)])
def test_hooks_pick_the_transport(dist_pool, world_size, nhosts):
    out = dist_pool(world_size).run(_hooks_pick_the_transport, nhosts, timeout=120)
    assert all(o == out[0] for o in out)


@pytest.mark.parametrize("world_size,nhosts", [(2, 1), (4, 2)])
def test_destroy_process_group_frees_threads_mappings_and_fds(dist_pool, world_size, nhosts):
    for fds in dist_pool(world_size).run(_destroy_frees_everything, nhosts, timeout=120):
        assert fds[2] == fds[1], f"open file descriptors grow with each destroyed group: {fds}"


def test_bad_transport_names_the_problem():
    with pytest.raises(ValueError, match="transport"):
        pyparallel.hooks.HookState(transport="tcp")
