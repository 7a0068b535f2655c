"""CUDA IPC all-reduce (Note [CUDA IPC all-reduce], csrc/comm/ipc.h) and the CUDA paths of the policy.

Ranks are spawned processes in one Gloo group (tests/dist_harness.py) whose CUDA tensors share the
device(s) of this machine: rank r uses cuda:(r mod device count), so on a one-GPU machine every rank
shares cuda:0 (how the IPC transport is tested on one device) and on a machine with several GPUs they are
spread over peer-accessible GPUs. The Gloo group only carries the handshake (its store) and torch DDP's
own broadcasts; the all-reduces go through CUDA IPC. Results are compared bitwise with
pyparallel.reference.shm_all_reduce (fp32 sum in rank order, divided once, rounded once) and across
ranks by digest. Small staging buffers (PYPARALLEL_IPC_BUFFER_BYTES) stream larger tensors through many
chunks. Every test that needs a GPU skips without one; the CPU-side checks of the policy run anywhere.
"""

import ctypes
import datetime
import hashlib
import os
import random
import time

import pytest
import torch
import torch.distributed as dist

import pyparallel
from pyparallel import reference as ref

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
pytestmark = pytest.mark.cuda  # `pytest -m cuda` (make gpu-check) selects this whole file

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL_BUFFER = 64 << 10  # bytes per staging set: one-shot up to 64 KiB, 300_001 fp32 elements in ~10 chunks
SIZES = [0, 1, 2, 3, 5, 16, 17, 1000, 4099, 16_384, 16_385, 65_537, 300_001]
LARGE_SIZES = [65_536, 65_537, 3_000_001]  # with the default 8 MiB buffer: one-shot edge, two chunks


def _digest(t: torch.Tensor) -> str:
    # The bytes without numpy (.numpy() needs it, and the GPU check's bare machine may not have it).
    b = t.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    return hashlib.sha256(ctypes.string_at(b.data_ptr(), b.numel()) if b.numel() else b"").hexdigest()


def _all_inputs(seed, shape, dtype, world):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * (r + 1)).to(dtype) for r in range(world)]


def _device() -> torch.device:
    d = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    torch.cuda.set_device(d)
    return d


class _IpcGroup:
    """A new group over every rank, with CUDA IPC enabled for "auto" and the given staging buffer."""

    def __init__(self, buffer_bytes: int | None = SMALL_BUFFER, enable: bool = True, timeout_s: float | None = None):
        self._env = {"PYPARALLEL_CUDA_IPC": "1" if enable else "0"}
        if buffer_bytes is not None:
            self._env["PYPARALLEL_IPC_BUFFER_BYTES"] = str(buffer_bytes)
        self._timeout = timeout_s

    def __enter__(self) -> dist.ProcessGroup:
        os.environ.update(self._env)
        kwargs = {} if self._timeout is None else {"timeout": datetime.timedelta(seconds=self._timeout)}
        self.group = dist.new_group(list(range(dist.get_world_size())), **kwargs)
        return self.group

    def __exit__(self, *exc):
        for key in self._env:
            os.environ.pop(key, None)
        pyparallel.release(self.group)
        dist.destroy_process_group(self.group)


# ---- worker-side cases ----

def _exact_cases(seed, buffer_bytes, sizes):
    """Every size, dtype and reduction, bitwise vs the reference, through "ipc" and "auto"."""
    n, rank = dist.get_world_size(), dist.get_rank()
    dev = _device()
    digests = []
    with _IpcGroup(buffer_bytes) as g:
        assert pyparallel.resolve_transport(torch.ones(1, device=dev), g) == "ipc"
        assert pyparallel.resolve_transport(torch.ones(1, device=dev), g, "ipc") == "ipc"
        for dtype in DTYPES:
            for numel in sizes:
                for average in (False, True):
                    xs = _all_inputs(seed + numel, (numel,), dtype, n)
                    t = xs[rank].to(dev)
                    pyparallel.all_reduce(t, group=g, op="avg" if average else "sum",
                                          transport="ipc" if average else "auto")
                    expect = ref.shm_all_reduce(xs, average)
                    assert torch.equal(t.cpu(), expect), (dtype, numel, average)
                    digests.append(_digest(t))
        # n-D and non-contiguous; a slice that starts 1 element in (misaligned for 16-byte accesses)
        xs = _all_inputs(seed, (40, 31), torch.float32, n)
        t = xs[rank].to(dev).t()
        pyparallel.all_reduce(t, group=g, transport="ipc")
        assert torch.equal(t.cpu(), ref.shm_all_reduce([x.t().contiguous() for x in xs]))
        xs = _all_inputs(seed + 1, (5001,), torch.bfloat16, n)
        base = torch.cat([torch.zeros(1, dtype=torch.bfloat16), xs[rank]]).to(dev)
        view = base[1:]
        pyparallel.all_reduce(view, group=g, op="avg", transport="ipc")
        assert torch.equal(view.cpu(), ref.shm_all_reduce(xs, True))
        assert base[0].item() == 0
        # async: the future's value is the tensor, and waiting orders the current stream after it
        xs = _all_inputs(seed + 2, (70_001,), torch.float16, n)
        t = xs[rank].to(dev)
        fut = pyparallel.all_reduce(t, group=g, op="avg", async_op=True, transport="ipc")
        assert fut.wait() is t
        assert torch.equal(t.cpu(), ref.shm_all_reduce(xs, True))
        digests.append(_digest(t))
    return digests


def _ring_over_ipc(seed, buffer_bytes):
    """transport="ring" with CUDA tensors on a Gloo group: the dense ring, the int8 ring and top-k run over
    the CUDA IPC transport's exchanges (Note [CUDA IPC transport]). Bitwise equal to the references computed
    on the same device (so that PyTorch's own CUDA arithmetic, which the rings use between hops, is the
    same on both sides), and the same bits on every rank."""
    n, rank = dist.get_world_size(), dist.get_rank()
    dev = _device()
    digests = []
    with _IpcGroup(buffer_bytes, enable=False) as g:
        assert pyparallel.resolve_transport(torch.ones(1, device=dev), g, "ring") == "ring"
        for dtype in DTYPES:
            for numel in (0, 1, 17, 1000, 65_537, 300_001):
                for average in (False, True):
                    op = "avg" if average else "sum"
                    xs = [x.to(dev) for x in _all_inputs(seed + numel, (numel,), dtype, n)]
                    t = xs[rank].clone()
                    pyparallel.all_reduce(t, group=g, op=op, transport="ring")
                    assert torch.equal(t, ref.ring_all_reduce(xs, average)), ("dense", dtype, numel, average)
                    digests.append(_digest(t))
                    t = xs[rank].clone()
                    pyparallel.all_reduce(t, group=g, op=op, transport="ring", compression="int8")
                    assert torch.equal(t, ref.ring_all_reduce_int8(xs, average)), ("int8", dtype, numel, average)
                    digests.append(_digest(t))
        for numel in (1000, 65_537):  # top-k with error feedback, three steps: the residual carries over
            k = numel // 50
            residuals = [torch.zeros(numel, device=dev) for _ in range(n)]
            mine = torch.zeros(numel, device=dev)
            for step in range(3):
                xs = [x.to(dev) for x in _all_inputs(seed + numel + step, (numel,), torch.float32, n)]
                t = xs[rank].clone()
                pyparallel.all_reduce(t, group=g, op="avg", transport="ring",
                                      compression=pyparallel.Topk(k=k, residual=mine))
                assert torch.equal(t, ref.topk_all_reduce(xs, k, residuals, True)), ("topk", numel, step)
                assert torch.equal(mine, residuals[rank]), ("residual", numel, step)
                digests.append(_digest(t))
    return digests


def _mismatch(kind):
    """Ranks that disagree raise the same error on every rank, and the group stays usable."""
    n, rank = dist.get_world_size(), dist.get_rank()
    dev = _device()
    with _IpcGroup() as g:
        if kind == "numel":
            t = torch.ones(100 + rank, device=dev)
        elif kind == "paths":  # one-shot on rank 0, two-shot elsewhere: both stop after the first barrier
            t = torch.ones(10 if rank == 0 else 300_000, device=dev)
        else:
            t = torch.ones(100, device=dev, dtype=torch.float32 if rank == 0 else torch.bfloat16)
        msg = None
        try:
            pyparallel.all_reduce(t, group=g, transport="ipc")
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
        ok = torch.ones(10, device=dev)
        pyparallel.all_reduce(ok, group=g, transport="ipc")
        assert bool((ok == n).all())
    return msg


def _compression_is_exact_on_one_node(seed):
    """Compression applies across hosts only: on one node the IPC reduction is exact; Topk's residual goes
    in and is emptied, as with shared memory."""
    n, rank = dist.get_world_size(), dist.get_rank()
    dev = _device()
    with _IpcGroup() as g:
        xs = _all_inputs(seed, (30_001,), torch.float32, n)
        t = xs[rank].to(dev)
        pyparallel.all_reduce(t, group=g, op="avg", compression="int8")
        assert torch.equal(t.cpu(), ref.shm_all_reduce(xs, True))
        residuals = _all_inputs(seed + 1, (30_001,), torch.float32, n)
        mine = residuals[rank].to(dev)
        t = xs[rank].to(dev)
        pyparallel.all_reduce(t, group=g, op="avg", compression=pyparallel.Topk(ratio=0.01, residual=mine))
        assert torch.equal(t.cpu(), ref.shm_all_reduce([x + r for x, r in zip(xs, residuals)], True))
        assert not bool(mine.any())
        return _digest(t)


def _gate_off_uses_the_ring():
    """Without PYPARALLEL_CUDA_IPC=1 on every rank, "auto" does not pick CUDA IPC (it has not run on a GPU
    before this test); the explicit "ipc" still works."""
    dev = _device()
    with _IpcGroup(enable=dist.get_rank() != 0) as g:  # rank 0 does not enable it: nobody may use it
        assert pyparallel.resolve_transport(torch.ones(1, device=dev), g) == "ring"
        t = torch.ones(1000, device=dev)
        pyparallel.all_reduce(t, group=g, transport="ipc")
        assert bool((t == dist.get_world_size()).all())
        return pyparallel.resolve_transport(torch.ones(1), g)


def _ddp_hooks(seed):
    """torch DDP on CUDA modules (Gloo for DDP's own broadcasts) and pyparallel.DataParallel, with our hooks
    on the IPC transport: the averaged gradients match one process on the full batch, and every rank ends
    with the same bits."""
    from torch import nn
    from pyparallel import hooks

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = _device()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(120, 64, generator=g), torch.randint(0, 10, (120,), generator=g)

    def model():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(dev)

    def grads(m, xb, yb):
        m.zero_grad()
        nn.functional.cross_entropy(m(xb.to(dev)), yb.to(dev)).backward()
        return [p.grad.clone() for p in m.parameters()]

    expect = grads(model(), x, y)
    shard = lambda t: t.chunk(world)[rank]  # noqa: E731
    local_max = max(gr.abs().max().item() for r in range(world)
                    for gr in grads(model(), x.chunk(world)[r], y.chunk(world)[r]))
    int8_bound = (1 + 1 / 254) ** world - 1  # pyparallel.Int8's bound, relative to the largest local gradient
    cases = {
        "allreduce": (hooks.allreduce_hook, lambda: hooks.HookState(transport="ipc"), 1e-5),
        "fp16": (hooks.fp16_hook, lambda: hooks.HookState(transport="ipc"), 2 * world * 2.0**-11),
        "bf16": (hooks.bf16_hook, lambda: hooks.HookState(transport="ipc"), 2 * world * 2.0**-8),
        "int8 (exact on one node)": (hooks.int8_hook, lambda: hooks.Int8State(transport="ipc"), 1e-5),
        # the rings over the CUDA IPC transport (a Gloo group has no NCCL): compressed as asked
        "allreduce, ring": (hooks.allreduce_hook, lambda: hooks.HookState(transport="ring"), 1e-5),
        "int8, ring": (hooks.int8_hook, lambda: hooks.Int8State(transport="ring"), int8_bound * (1 + 1e-5)),
    }
    digests = []
    for wrapper in ("torch", "ours"):
        for name, (hook, make_state, rel) in cases.items():
            m = model()
            if wrapper == "torch":
                wrapped = nn.parallel.DistributedDataParallel(m, device_ids=[dev.index], bucket_cap_mb=0.05)
                wrapped.register_comm_hook(make_state(), hook)
            else:
                wrapped = pyparallel.DataParallel(m, bucket_cap_mb=0.05, first_bucket_mb=0.01, comm_hook=hook,
                                                  hook_state=make_state())
            nn.functional.cross_entropy(wrapped(shard(x).to(dev)), shard(y).to(dev)).backward()
            for p, e in zip(m.parameters(), expect):
                err = (p.grad - e).abs().max().item()
                assert err <= rel * local_max + 1e-6, (wrapper, name, err, local_max)
            digests.append(_digest(torch.cat([p.grad.reshape(-1) for p in m.parameters()])))
    return digests


def _die_in_ipc():
    """Rank 1 is SIGKILLed during large IPC all-reduces; the others must raise, naming it, within the
    group's timeout, and later calls must raise at once. (The group is never destroyed: the pool is
    killed after this case.)"""
    from dist_harness import kill_rank_one_during_all_reduces

    os.environ["PYPARALLEL_IPC_BUFFER_BYTES"] = str(8 << 20)
    g = dist.new_group(list(range(dist.get_world_size())), timeout=datetime.timedelta(seconds=10))
    return kill_rank_one_during_all_reduces(g, torch.randn(16 << 20, device=_device()), "ipc")


def _late_rank_times_out(timeout_s):
    """Rank 1 skips one collective: rank 0 raises "timed out" after the group's timeout and is failed for
    good; rank 1's next collective gives up at once on rank 0 (it marked itself failed in rank 1's signals)
    instead of waiting out its own timeout or passing on stale flags."""
    rank = dist.get_rank()
    dev = _device()
    with _IpcGroup(timeout_s=timeout_s) as g:
        t = torch.ones(1000, device=dev)
        pyparallel.all_reduce(t, group=g, transport="ipc")
        out = {}
        if rank == 0:
            t0 = time.monotonic()
            try:
                pyparallel.all_reduce(torch.ones(10, device=dev), group=g, transport="ipc")
            except RuntimeError as e:
                out["first"] = (time.monotonic() - t0, str(e).splitlines()[0])
        dist.barrier()  # Gloo, on the world group: rank 1 goes on once rank 0 has failed
        t0 = time.monotonic()
        try:
            pyparallel.all_reduce(torch.ones(300_000, device=dev), group=g, transport="ipc")
            out["next"] = (time.monotonic() - t0, "no error")
        except RuntimeError as e:
            out["next"] = (time.monotonic() - t0, str(e).splitlines()[0])
    return out


def _nccl_world_size_one():
    """NCCL refuses two ranks on one GPU; at world size 1 every path returns the tensor unchanged."""
    dev = _device()
    g = dist.new_group([0], backend="nccl")
    try:
        for dtype in DTYPES:
            x = torch.randn(10_001, device=dev).to(dtype)
            for op in ("sum", "avg"):
                for compression in (None, "int8"):
                    t = x.clone()
                    pyparallel.all_reduce(t, group=g, op=op, compression=compression)
                    assert torch.equal(t, x), (dtype, op, compression)
            t = x.clone()
            assert pyparallel.all_reduce(t, group=g, async_op=True).wait() is t
            torch.cuda.synchronize()
            assert torch.equal(t, x)
        assert pyparallel.resolve_transport(x, g) == "ring"
        for name in ("ring_all_reduce_", "ring_all_reduce_int8_"):
            t = x.float().clone()
            getattr(torch.ops.pyparallel, name)(t, g.group_name, True)
            assert torch.equal(t, x.float())
    finally:
        pyparallel.release(g)
        dist.destroy_process_group(g)
    return True


def _cpu_tensor_with_ipc():
    with _IpcGroup() as g:
        try:
            pyparallel.all_reduce(torch.ones(3), group=g, transport="ipc")
        except ValueError as e:
            return str(e)
    return None


def _setup_fails_the_same_everywhere():
    """Without a GPU every rank fails to set CUDA IPC up; the handshake still completes, and every rank gets
    the same reason (so "auto" would fall back to the ring everywhere, and "ipc" raise everywhere)."""
    with _IpcGroup() as g:
        res = pyparallel.transport.resources(g)
        comm, why = res.cuda_ipc(torch.device("cuda", 0))
        assert comm is None
        assert res.cuda_ipc(torch.device("cuda", 0)) == (None, why)  # decided once
        return why


# ---- tests ----

def test_ipc_needs_cuda_tensors(dist_pool):
    for msg in dist_pool(2).run(_cpu_tensor_with_ipc, timeout=60):
        assert msg is not None and "transport='ipc' needs CUDA tensors" in msg, msg


def test_grid_fits_every_rank_sharing_a_gpu_at_once():
    # Under MPS the kernels of ranks sharing a GPU run side by side and each block spins until its peers'
    # blocks of the same index arrive: all of them must fit on the SMs at once (one block per SM), or the
    # ranks wait for each other until the timeout. The grid used to be the smallest asked for (64 by
    # default): 2 x 64 blocks on a 114-SM H100 PCIe, 3 x 64 on a 132-SM H100 SXM did not fit.
    from pyparallel.transport import ipc_grid

    def answers(buses, sms, blocks=64):
        return [["ok", f"{'ab' * 32}:{bus}", "1", str(8 << 20), str(min(blocks, sms)), str(sms)] for bus in buses]

    assert ipc_grid(answers(["0000:01:00.0", "0000:01:00.0"], 132)) == 64
    assert ipc_grid(answers(["0000:01:00.0", "0000:01:00.0"], 114)) == 57
    assert ipc_grid(answers(["0000:01:00.0"] * 3, 132)) == 44
    assert ipc_grid(answers(["0000:01:00.0"] * 8, 132)) == 16
    assert ipc_grid(answers([f"0000:0{i}:00.0" for i in range(4)], 132)) == 64  # one rank per GPU
    mixed = answers(["0000:01:00.0", "0000:02:00.0", "0000:02:00.0", "0000:02:00.0"], 132, blocks=40)
    assert ipc_grid(mixed) == 40  # 3 ranks on the second GPU: 44 fit, the smallest asked for is 40
    assert ipc_grid(answers(["0000:01:00.0"] * 8, 4)) == 1


@pytest.mark.skipif(CUDA, reason="a GPU sets CUDA IPC up (the other tests)")
def test_ipc_setup_fails_the_same_everywhere_without_a_gpu(dist_pool):
    reasons = dist_pool(3).run(_setup_fails_the_same_everywhere, timeout=60)
    assert len(set(reasons)) == 1 and reasons[0].startswith("rank 0 could not set up its CUDA IPC buffer"), reasons


def test_ipc_ops_registered_in_cuda_builds():
    from test_build import _expect_cuda

    if not _expect_cuda():
        pytest.skip("CPU-only build")
    for op in ("ipc_create", "ipc_open", "ipc_detach"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyparallel::{op}", "CompositeImplicitAutograd"), op
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyparallel::ipc_all_reduce_", "CUDA")


@needs_cuda
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ipc_bitwise_vs_reference(dist_pool, world_size):
    digests = dist_pool(world_size).run(_exact_cases, random.randrange(2**30), SMALL_BUFFER, SIZES, timeout=300)
    assert all(d == digests[0] for d in digests)


@needs_cuda
@pytest.mark.parametrize("world_size", [2, 3])
def test_ipc_large_tensors_default_buffer(dist_pool, world_size):
    digests = dist_pool(world_size).run(_exact_cases, random.randrange(2**30), None, LARGE_SIZES, timeout=300)
    assert all(d == digests[0] for d in digests)


@needs_cuda
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rings_over_the_ipc_transport(dist_pool, world_size):
    digests = dist_pool(world_size).run(_ring_over_ipc, random.randrange(2**30), SMALL_BUFFER, timeout=300)
    assert all(d == digests[0] for d in digests)


@needs_cuda
@pytest.mark.parametrize("kind", ["numel", "paths", "dtype"])
def test_ipc_mismatch_raises_on_every_rank(dist_pool, kind):
    messages = dist_pool(3).run(_mismatch, kind, timeout=120)
    assert all(m is not None and "ranks disagree" in m for m in messages), messages
    assert len(set(messages)) == 1, messages


@needs_cuda
def test_ipc_compression_is_exact_on_one_node(dist_pool):
    digests = dist_pool(2).run(_compression_is_exact_on_one_node, random.randrange(2**30), timeout=120)
    assert digests[0] == digests[1]


@needs_cuda
def test_auto_needs_every_rank_to_enable_ipc(dist_pool):
    assert dist_pool(2).run(_gate_off_uses_the_ring, timeout=120) == ["shm", "shm"]


@needs_cuda
@pytest.mark.parametrize("world_size", [2, 3])
def test_hooks_through_ddp_on_ipc(dist_pool, world_size):
    digests = dist_pool(world_size).run(_ddp_hooks, random.randrange(2**30), timeout=300)
    assert all(d == digests[0] for d in digests)


@needs_cuda
def test_sigkill_during_ipc_raises_naming_the_rank():
    from dist_harness import assert_rank_one_killed_is_named

    # Either our liveness check saw it first, or (CUDA's rule for IPC memory of a dead exporter) a write
    # into its mapping faulted; both messages name the dead rank.
    assert_rank_one_killed_is_named(_die_in_ipc, timeout=120)


@needs_cuda
def test_late_rank_times_out_and_poisons(dist_pool):
    out = dist_pool(2).run(_late_rank_times_out, 3.0, timeout=120)
    elapsed, msg = out[0]["first"]
    assert "timed out" in msg and "rank 1" in msg, msg
    assert 2.5 < elapsed < 3.0 + 12, elapsed
    for rank in (0, 1):
        elapsed, msg = out[rank]["next"]
        assert msg != "no error" and elapsed < 2.5, (rank, elapsed, msg)
    assert "earlier" in out[0]["next"][1], out[0]
    assert "failed in an earlier collective" in out[1]["next"][1], out[1]


@needs_cuda
def test_nccl_path_at_world_size_one(dist_pool):
    assert dist_pool(1).run(_nccl_world_size_one, timeout=120) == [True]
