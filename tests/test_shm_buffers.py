"""Registered shared-memory buffers (pyparallel.shm_empty, Note [Registered buffers] in csrc/comm/shm.h).

Every all-reduce of a tensor from shm_empty must give the same bits as the staged path (the reference),
on every rank, whichever path it takes; the path taken is read from the communicator's counters, so a
registered tensor silently going through the slots fails here. Small slots (PYPARALLEL_SHM_SLOT_BYTES)
make the larger tensors take many rounds.
"""

import gc
import os
import random

import pytest
import torch
import torch.distributed as dist

import pyparallel
from pyparallel import reference as ref
from pyparallel import transport

from test_transport import DTYPES, SIZES, _all_inputs, _digest, _Group, _held_by_this_process

PATHS = ("small", "staged", "registered", "mixed")
ONE_SHOT_ELEMS = 4096 // 4  # fp32 elements that fit the one-round path with 4 KiB slots


def _paths(g) -> dict[str, int]:
    comm = transport.resources(g).shm_comm
    return dict(zip(PATHS, torch.ops.pyparallel.shm_paths(comm)))


def _took(g, before: dict[str, int], path: str) -> bool:
    after = _paths(g)
    return after[path] == before[path] + 1 and sum(after.values()) == sum(before.values()) + 1


def _registered_cases(seed):
    """Every dtype, size (0, 1, odd, past the one-round path, many rounds) and reduction on shm_empty
    tensors, bitwise equal to the staged reference; the registered path taken above one round."""
    n, rank = dist.get_world_size(), dist.get_rank()
    digests = []
    with _Group(1) as g:
        pyparallel.all_reduce(torch.ones(1), group=g)  # attach the communicator
        for dtype in DTYPES:
            for numel in SIZES:
                for average in (False, True):
                    xs = _all_inputs(seed + numel, (numel,), dtype, n)
                    t = pyparallel.shm_empty(numel, dtype=dtype, group=g)
                    assert t.shape == (numel,) and t.dtype == dtype
                    t.copy_(xs[rank])
                    before = _paths(g) if n > 1 else None
                    pyparallel.all_reduce(t, group=g, op="avg" if average else "sum")
                    assert torch.equal(t, ref.shm_all_reduce(xs, average)), (dtype, numel, average)
                    if n > 1:
                        big = numel * t.element_size() > 4096
                        assert _took(g, before, "registered" if big else "small"), (numel, _paths(g))
                    digests.append(_digest(t))
        # n-D, the same buffer reused, a view at the same offset on every rank, and an async future
        buf = pyparallel.shm_empty(40, 31, group=g)
        assert buf.shape == (40, 31)
        for step in range(3):
            xs = _all_inputs(seed + step, (40, 31), torch.float32, n)
            buf.copy_(xs[rank])
            pyparallel.all_reduce(buf, group=g)
            assert torch.equal(buf, ref.shm_all_reduce([x.view(-1) for x in xs]).view(40, 31))
        view = buf.view(-1)[17:17 + 1100]
        xs = _all_inputs(seed, (1100,), torch.float32, n)
        view.copy_(xs[rank])
        fut = pyparallel.all_reduce(view, group=g, op="avg", async_op=True)
        assert fut.wait() is view
        assert torch.equal(view, ref.shm_all_reduce(xs, True))
        digests.append(_digest(view))
        if n > 1:
            assert _paths(g)["registered"] >= 4 + 2 * 3 * 3  # 3 sizes of 3 dtypes x 2 reductions, and these
    return digests


def _mixed_cases(seed):
    """Tensors not at the same place on every rank (a plain tensor on one rank, views at different
    offsets, a non-contiguous view): the mixed path, same bits as the reference."""
    n, rank = dist.get_world_size(), dist.get_rank()
    digests = []
    with _Group(1) as g:
        pyparallel.all_reduce(torch.ones(1), group=g)
        buf = pyparallel.shm_empty(20_000, group=g)
        for case in ("plain on rank 0", "plain on rank 1", "other offset on rank 0", "transposed"):
            for numel in (ONE_SHOT_ELEMS + 1, 4099, 12_345):
                xs = _all_inputs(seed + numel, (numel,), torch.float32, n)
                if case == f"plain on rank {rank}":
                    t = xs[rank].clone()
                elif case == "transposed":
                    t = buf[: numel - numel % 7].view(-1, 7).t()  # not contiguous: all-reduced through a copy
                    xs = [x[: numel - numel % 7].view(-1, 7).t() for x in xs]
                    t.copy_(xs[rank])
                else:
                    t = buf[16 if case == f"other offset on rank {rank}" else 0:][:numel]
                    t.copy_(xs[rank])
                before = _paths(g)
                pyparallel.all_reduce(t, group=g)
                expect = ref.shm_all_reduce([x.contiguous().view(-1) for x in xs]).view(xs[0].shape)
                assert torch.equal(t, expect), (case, numel)
                path = "mixed" if case != "transposed" else "staged" if t.numel() > ONE_SHOT_ELEMS else "small"
                assert _took(g, before, path), (case, numel, _paths(g))
                digests.append(_digest(t))
        # registered, then plain, then registered again: each call decides anew
        for plain in (False, True, False):
            xs = _all_inputs(seed, (5000,), torch.bfloat16, n)
            t = xs[rank].clone() if plain else pyparallel.shm_empty(5000, dtype=torch.bfloat16, group=g)
            t.copy_(xs[rank])
            before = _paths(g)
            pyparallel.all_reduce(t, group=g, op="avg")
            assert torch.equal(t, ref.shm_all_reduce(xs, True))
            assert _took(g, before, "staged" if plain else "registered")
    return digests


def _size_mismatch(seed):
    """Rank 1 asks for another size: every rank raises, naming the problem, within the timeout. The group
    goes on: later buffers are still recognised as the same buffer on every rank (registered path), and
    different buffers as different ones, although rank 1 mapped one buffer fewer than the others."""
    n, rank = dist.get_world_size(), dist.get_rank()
    message = None
    with _Group(1) as g:
        pyparallel.all_reduce(torch.ones(1), group=g)
        try:
            pyparallel.shm_empty(1000 if rank != 1 else 5000, group=g)
        except RuntimeError as e:
            message = str(e)
        a, b = pyparallel.shm_empty(5000, group=g), pyparallel.shm_empty(5000, group=g)
        for case in ("b on rank 1", "a everywhere"):
            xs = _all_inputs(seed, (5000,), torch.float32, n)
            t = b if case == "b on rank 1" and rank == 1 else a
            t.copy_(xs[rank])
            before = _paths(g)
            pyparallel.all_reduce(t, group=g)
            assert torch.equal(t, ref.shm_all_reduce(xs)), case
            assert _took(g, before, "registered" if case == "a everywhere" else "mixed"), (case, _paths(g))
    return message


def _lifetime():
    """A buffer's mapping lives exactly as long as its tensor (and views): it outlives the group, and is
    gone once the last view is."""
    n = dist.get_world_size()
    _, _, maps0 = _held_by_this_process()
    g = dist.new_group(list(range(n)))
    t = pyparallel.shm_empty(100_000, group=g)
    t.fill_(1.0)
    pyparallel.all_reduce(t, group=g)
    view = t[10:20]
    del t
    gc.collect()
    dist.destroy_process_group(g)
    del g
    gc.collect()
    _, _, maps = _held_by_this_process()
    assert len(maps) == len(maps0) + 1, (maps0, maps)  # the buffer (the group's segment is gone)
    assert float(view.sum()) == 10.0 * n
    del view
    gc.collect()
    _, _, maps = _held_by_this_process()
    assert maps == maps0, (maps0, maps)


def _refusals():
    """Across hosts, on a non-member, and with one rank: what shm_empty does instead."""
    n, rank = dist.get_world_size(), dist.get_rank()
    out = []
    with _Group(2) as g:
        try:
            pyparallel.shm_empty(10, group=g)
        except ValueError as e:
            out.append(str(e))
    sub = dist.new_group([0])
    if rank == 0:
        t = pyparallel.shm_empty(3, 2, dtype=torch.float16, group=sub)
        assert t.shape == (3, 2) and t.dtype == torch.float16
    else:
        try:
            pyparallel.shm_empty(3, group=sub)
        except ValueError as e:
            out.append(str(e))
    dist.destroy_process_group(sub)
    with _Group(1) as g:  # a negative size, as torch.empty: raised, not a tensor of the wrong shape
        for size in ((-1,), (3, -4)):
            try:
                t = pyparallel.shm_empty(*size, group=g)
            except RuntimeError as e:
                out.append(str(e))
            else:
                out.append(f"shm_empty{size} returned shape {tuple(t.shape)}")
    return out


def _data_parallel_buckets(seed):
    """DataParallel on one host allocates its buckets with shm_empty: every bucket above one round takes
    the registered path, and the averaged gradients are bitwise those of the staged path."""
    n, rank = dist.get_world_size(), dist.get_rank()
    with _Group(1, slot=None) as g:
        torch.manual_seed(seed)
        def make():
            return torch.nn.Sequential(torch.nn.Linear(150, 150), torch.nn.ReLU(), torch.nn.Linear(150, 150),
                                       torch.nn.ReLU(), torch.nn.Linear(150, 150), torch.nn.Linear(150, 3))
        model = make()
        dp = pyparallel.DataParallel(model, process_group=g, bucket_cap_mb=0.1, first_bucket_mb=0.01)
        x = torch.randn(5, 150, generator=torch.Generator().manual_seed(seed + rank))
        before = _paths(g)
        dp(x).sum().backward()
        after = _paths(g)
        sizes = dp._reducer.bucket_sizes
        big = sum(size * 4 > 64 << 10 for size in sizes)  # above the default one-round size
        assert big >= 2 and after["registered"] - before["registered"] == big, (sizes, before, after)
        assert after["staged"] == before["staged"] and after["mixed"] == before["mixed"]
        # the same local gradients, averaged through the staged path, give the same bits
        model2 = make()
        model2.load_state_dict(model.state_dict())
        model2(x).sum().backward()
        for p, p2 in zip(model.parameters(), model2.parameters()):
            pyparallel.all_reduce(p2.grad, group=g, op="avg")
            assert torch.equal(p.grad, p2.grad)
        return [_digest(p.grad) for p in model.parameters()]


def _no_room():
    """A buffer larger than /dev/shm raises on every rank at once (reserved up front: no SIGBUS later);
    DataParallel then keeps its buckets in private memory, warns, and reduces them through the slots."""
    import warnings

    n = dist.get_world_size()
    out = []
    with _Group(1, slot=None) as g:
        fs = os.statvfs("/dev/shm")
        try:
            pyparallel.shm_empty(fs.f_blocks * fs.f_frsize // 4, group=g)  # n parts: more than the whole of it
        except RuntimeError as e:
            out.append(str(e))
        real = pyparallel.comm.shm_empty

        def full(*args, **kwargs):
            real(fs.f_blocks * fs.f_frsize // 4, group=g)

        pyparallel.comm.shm_empty = full
        try:
            model = torch.nn.Linear(200, 100)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dp = pyparallel.DataParallel(model, process_group=g)
        finally:
            pyparallel.comm.shm_empty = real
        out.append([str(w.message) for w in caught])
        before = _paths(g)
        dp(torch.ones(3, 200)).sum().backward()
        assert _took(g, before, "staged"), _paths(g)
        assert torch.equal(model.bias.grad, torch.full((100,), 3.0)), model.bias.grad  # same input everywhere
        assert n > 1
    return out


def _creator_cannot_map():
    """The host's first rank creates and reserves a buffer but cannot map it (here: its address space is
    limited): every rank raises, and the reserved segment is not left behind in /dev/shm."""
    import resource

    rank = dist.get_rank()
    mine = f"pyparallel-{os.getpid()}-"  # the creator names its segments after its pid
    with _Group(1) as g:
        pyparallel.all_reduce(torch.ones(1), group=g)  # the group's own segment, before the limit
        limits = resource.getrlimit(resource.RLIMIT_AS)
        if rank == 0:
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + (32 << 20), limits[1]))
        try:
            pyparallel.shm_empty(64 << 20 >> 2, group=g)  # 64 MiB parts: reserved, then too large to map
        except RuntimeError as e:
            message = str(e)
        else:
            message = None
        finally:
            resource.setrlimit(resource.RLIMIT_AS, limits)
        left = [f for f in os.listdir("/dev/shm") if f.startswith(mine)]
    return message, left


def _shared_mappings() -> dict[str, str]:
    """This process's mappings of our segments: address range -> name."""
    with open("/proc/self/maps") as f:
        return {line.split()[0]: line.split(None, 5)[-1].strip() for line in f if "/pyparallel-" in line}


def _segment_reserved():
    """The group's own segment has every page allocated from the start (as shm_empty buffers): a sparse
    one gets its pages when a collective first touches them, which kills the rank with SIGBUS once
    /dev/shm has filled up in between (e.g. with gradient buckets from shm_empty)."""
    with _Group(1) as g:
        before = _shared_mappings()
        pyparallel.all_reduce(torch.ones(1), group=g)  # attaches; touches a few of the segment's pages
        new = [r for r in _shared_mappings() if r not in before]
        assert len(new) == 1, (before, _shared_mappings())
        st = os.stat(f"/proc/self/map_files/{new[0]}")  # the (unlinked) segment itself
        return st.st_size, st.st_blocks * 512


def _data_parallel_leaves_room():
    """DataParallel's buckets go to shared memory only if at least as much of /dev/shm stays free besides
    them (they are an optimisation; DataLoader workers and other groups' segments need the room): here
    /dev/shm seems to have 1.5 times what they take free, so every rank warns and keeps them private."""
    import types
    import warnings

    n = dist.get_world_size()
    with _Group(1, slot=None) as g:
        model = torch.nn.Linear(200, 100)  # one bucket of 20100 fp32 elements
        taken = n * 80448  # its L parts, rounded up to 64 bytes
        real = os.statvfs
        os.statvfs = lambda path: types.SimpleNamespace(f_bavail=taken * 3 // 2, f_frsize=1, f_blocks=taken * 2,
                                                        f_bsize=1)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dp = pyparallel.DataParallel(model, process_group=g)
        finally:
            os.statvfs = real
        before = _paths(g)
        dp(torch.ones(3, 200)).sum().backward()
        assert _took(g, before, "staged"), _paths(g)
        assert torch.equal(model.bias.grad, torch.full((100,), 3.0)), model.bias.grad
        return [str(w.message) for w in caught]


def _die_before_shm_empty():
    """Rank 1 dies before the handshake: the others raise within the group's timeout, naming rank 1 only
    as the rank that did not map the buffer."""
    import signal
    import time

    pyparallel.all_reduce(torch.ones(1))  # the world (the pool's 10 s timeout): its segment attached
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        pyparallel.shm_empty(1 << 20)
    except RuntimeError as e:
        return time.monotonic() - t0, str(e).splitlines()[0]
    return time.monotonic() - t0, None


def _die_in_registered_all_reduce():
    from dist_harness import kill_rank_one_during_all_reduces

    g = dist.new_group(list(range(dist.get_world_size())))
    t = pyparallel.shm_empty(2 << 20, group=g)  # 8 MiB per rank: fits a small /dev/shm (Docker: 64 MiB)
    t.normal_()
    return kill_rank_one_during_all_reduces(g, t, "shm")


# ---- tests ----

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_registered_bitwise_vs_reference(dist_pool, world_size):
    digests = dist_pool(world_size).run(_registered_cases, random.randrange(2**30), timeout=300)
    assert all(d == digests[0] for d in digests), "ranks disagree"


@pytest.mark.parametrize("world_size", [2, 3])
def test_data_parallel_buckets_are_reduced_in_place(dist_pool, world_size):
    digests = dist_pool(world_size).run(_data_parallel_buckets, random.randrange(2**30), timeout=120)
    assert all(d == digests[0] for d in digests), "ranks disagree"


@pytest.mark.parametrize("world_size", [2, 4])
def test_mixed_placements_take_the_staged_path_and_agree(dist_pool, world_size):
    digests = dist_pool(world_size).run(_mixed_cases, random.randrange(2**30), timeout=300)
    assert all(d == digests[0] for d in digests), "ranks disagree"


def test_size_mismatch_raises_on_every_rank(dist_pool):
    messages = dist_pool(3).run(_size_mismatch, random.randrange(2**30), timeout=60)
    for msg in messages:
        assert msg is not None and "same size" in msg, messages


def test_buffer_lives_as_long_as_its_tensor(dist_pool):
    dist_pool(2).run(_lifetime, timeout=60)


def test_refused_across_hosts_and_for_non_members(dist_pool):
    rank0, rank1 = dist_pool(2).run(_refusals, timeout=60)
    assert len(rank0) == 3 and "on 2 hosts" in rank0[0], rank0
    assert len(rank1) == 4 and "on 2 hosts" in rank1[0] and "not a member" in rank1[1], rank1
    for negative in rank0[1:] + rank1[2:]:
        assert "negative dimension" in negative, (rank0, rank1)


def test_no_room_in_dev_shm_raises_everywhere_and_data_parallel_falls_back(dist_pool):
    for direct, warned in dist_pool(2).run(_no_room, timeout=60):
        assert "cannot reserve" in direct and "/dev/shm" in direct, direct
        assert len(warned) == 1 and "private memory" in warned[0] and "cannot reserve" in warned[0], warned


def test_creator_that_cannot_map_leaves_nothing_in_dev_shm(dist_pool):
    (msg0, left0), (msg1, left1) = dist_pool(2).run(_creator_cannot_map, timeout=60)
    assert msg0 is not None and "cannot map buffer" in msg0, msg0
    assert msg1 is not None and "could not create the buffer" in msg1, msg1
    assert left0 == [] and left1 == [], (left0, left1)


def test_group_segment_is_reserved_up_front(dist_pool):
    for size, allocated in dist_pool(2).run(_segment_reserved, timeout=60):
        assert allocated >= size, f"segment of {size} bytes has only {allocated} allocated"


def test_data_parallel_leaves_dev_shm_room_for_others(dist_pool):
    for warned in dist_pool(2).run(_data_parallel_leaves_room, timeout=60):
        assert len(warned) == 1 and "private memory" in warned[0] and "free in /dev/shm" in warned[0], warned


def test_rank_dead_before_the_handshake_is_named():
    from dist_harness import WorkerPool

    before = {f for f in os.listdir("/dev/shm") if f.startswith("pyparallel-")}
    pool = WorkerPool(3, pg_timeout_s=10)
    try:
        outcomes = pool.outcomes(_die_before_shm_empty, timeout=60)
    finally:
        pool.kill()
    assert outcomes[1][0] == "died", outcomes
    for status, value in (outcomes[0], outcomes[2]):
        assert status == "ok" and value[1] is not None and value[0] < 20, outcomes
        assert "ranks [1] of this host did not map" in value[1], outcomes
    after = {f for f in os.listdir("/dev/shm") if f.startswith("pyparallel-")}
    assert after <= before, f"left in /dev/shm: {after - before}"


def test_sigkill_in_registered_all_reduce_raises_and_leaves_nothing():
    from dist_harness import assert_rank_one_killed_is_named

    before = {f for f in os.listdir("/dev/shm") if f.startswith("pyparallel-")}
    assert_rank_one_killed_is_named(_die_in_registered_all_reduce, timeout=90)
    after = {f for f in os.listdir("/dev/shm") if f.startswith("pyparallel-")}
    assert after <= before, f"left in /dev/shm: {after - before}"
