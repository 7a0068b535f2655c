"""Front door of the collectives: :func:`all_reduce` with optional compression, sync or async.

The bytes move in C++ (``csrc/comm``) over the process group's own point-to-point send/recv. Each process
group gets one worker thread that runs its collectives in submission order: every rank issues the same
sequence of collectives, so this order matches across ranks, and the caller's thread stays free (the
GIL is released inside the ops). On CUDA the worker runs on its own stream, ordered after the caller's
stream by an event, and the returned future carries CUDA events, so waiting on it orders the waiter's
stream after the collective.
"""

from __future__ import annotations

import atexit
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import transport as _transport
from .ops import DEFAULT_BLOCK_SIZE

_ops = torch.ops.pyparallel

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes pyparallel's collectives reduce (fp16/bf16 accumulated in fp32)."""


@dataclass(frozen=True)
class Int8:
    """Blockwise int8 compression in the ring (Note [Int8 ring], csrc/comm/allreduce.cpp).

    Partial sums are re-quantized at every hop, so each chunk is quantized n times (n = world size).
    Error bound, per element and rigorous: with S the sum over ranks of each rank's absmax within the
    element's quantization block, ``|result - exact_sum| <= ((1 + 1/254)**n - 1) * S`` (divided by n for
    ``op="avg"``), plus fp32 rounding. About 1/4 of fp32's bytes on the wire.
    """

    block_size: int = DEFAULT_BLOCK_SIZE


@dataclass
class Topk:
    """Exact top-k sparsification with a sparse all-gather (csrc/comm/sparse.cpp).

    Give ``ratio`` (fraction of elements each rank sends) or ``k``. With ``residual`` (a tensor like the
    input, kept by the caller between steps) the error feedback keeps what was not sent:
    ``residual_new + sent == residual_old + tensor`` exactly. Each rank sends k values and k int32
    indices to each of the n - 1 others (fp32 CPU tensors: straight to each peer, while the selection
    is still reading the tensor, plus an 8-byte status per peer).
    """

    ratio: float | None = 0.01
    k: int | None = None
    residual: torch.Tensor | None = None

    def k_for(self, numel: int) -> int:
        if self.k is not None:
            return self.k
        if self.ratio is None or not 0 < self.ratio <= 1:
            raise ValueError(f"Topk: ratio must be in (0, 1], got {self.ratio}")
        return min(numel, max(1, round(numel * self.ratio))) if numel else 0


Compression = None | str | Int8 | Topk


def _average(op) -> bool:
    """Whether ``op`` ("sum" / "avg", or torch's ``dist.ReduceOp.SUM`` / ``AVG``, as torch users write it)
    averages."""
    if isinstance(op, type(dist.ReduceOp.SUM)):  # RedOpType (compares equal to plain ints: not those)
        op = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "avg"}.get(op, op)
    if op not in ("sum", "avg"):
        raise ValueError(f"all_reduce: op must be 'sum' or 'avg' (or dist.ReduceOp.SUM / AVG), got {op!r}")
    return op == "avg"


def _check_tensor(tensor) -> None:
    """Here, on the caller's thread: what the ops cannot take at all fails with the reason, not inside an op."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"all_reduce: sparse tensors are not supported (got {tensor.layout}); reduce "
                         "tensor.to_dense(), or use torch.distributed.all_reduce")


def _not_a_member(group) -> bool:
    """True for what ``dist.new_group`` returns on a rank it does not include (as torch's own check)."""
    return group is not None and not isinstance(group, dist.ProcessGroup) and group == dist.GroupMember.NON_GROUP_MEMBER


def _group(group) -> dist.ProcessGroup:
    if not dist.is_initialized():
        raise RuntimeError("all_reduce: torch.distributed is not initialized (call dist.init_process_group first)")
    group = group if group is not None else dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER or group is None:
        raise ValueError("all_reduce: this rank is not a member of the given process group")
    _track(group)
    return group


# Note [Group lifetimes]
# What we hold for a group (its worker thread, shared-memory mapping, inter-host groups, the C++ collective
# numbers) belongs to the group object, which we reference weakly: once torch and the caller drop the group
# (dist.destroy_process_group), it is all freed. torch reuses names ("0" again after destroy_process_group
# and a new init_process_group), so a new group under an old name first frees its predecessor's state and
# never sees it. The C++ side ties its per-group state to the c10d object the same way
# (Transport::incarnation).
_tracked: dict[str, weakref.ref] = {}
_tracked_lock = threading.RLock()  # the weakref callback may run inside _track, when a collection frees a group


def _track(group: dist.ProcessGroup) -> None:
    name = group.group_name
    with _tracked_lock:
        ref = _tracked.get(name)
        if ref is not None and ref() is group:
            return
        _tracked[name] = weakref.ref(group, lambda r, name=name: _group_gone(name, r))
    if ref is not None:
        _release_name(name)


def _group_gone(name: str, ref: weakref.ref) -> None:
    with _tracked_lock:
        if _tracked.get(name) is not ref:
            return  # a newer group owns the name (its _track freed this one's state)
        del _tracked[name]
    _release_name(name)


def _release_name(name: str) -> None:
    with _workers_lock:
        w = _workers.pop(name, None)
    if w is not None:
        w.shutdown()
    _transport.release_name(name)


def _kind(compression: Compression):
    """(code of the compression for the C++ ops, its parameter object)."""
    if compression is None:
        return 0, None
    if compression == "int8":
        compression = Int8()
    if isinstance(compression, Int8):
        return 1, compression
    if isinstance(compression, Topk):
        residual = compression.residual
        if residual is not None and not isinstance(residual, torch.Tensor):
            raise TypeError(f"Topk: residual must be a tensor or None, got {type(residual).__name__}")
        if residual is not None and residual.requires_grad:  # as torch's in-place ops refuse
            raise ValueError("Topk: the residual requires grad, and the error feedback updates it in place, which "
                             "autograd forbids; pass a tensor that does not require grad (e.g. residual.detach())")
        return 2, compression
    raise ValueError(f"all_reduce: compression must be None, 'int8', Int8(...) or Topk(...), got {compression!r}")


def collective(tensor: torch.Tensor, group: dist.ProcessGroup, average: bool, compression: Compression,
               transport: str = "auto") -> int:
    """Runs one collective on the calling thread; returns the bytes this rank sent across hosts (0 when
    it all went through shared memory)."""
    composed = getattr(group, "pyparallel_all_reduce", None)
    if composed is not None:  # a group made of groups (pyparallel.fault_tolerance.ReplicaGroup) reduces itself
        return composed(tensor, average, compression, transport)
    code, params = _kind(compression)
    path = _transport.choose(tensor, group, transport)
    if path == "ring":
        if not tensor.is_cuda and group.size() > 1:
            _transport.resources(group).ensure_twin()
        name = _transport.ring_group_name(tensor, group)
        if code == 0:
            sent = _ops.ring_all_reduce_(tensor, name, average)
        elif code == 1:
            sent = _ops.ring_all_reduce_int8_(tensor, name, average, params.block_size)
        else:
            sent = _ops.topk_all_reduce_(tensor, name, params.k_for(tensor.numel()), params.residual, average)
        return sent if name == group.group_name else 0  # over CUDA IPC nothing left the node
    res = _transport.resources(group)
    if path in ("shm", "ipc"):  # one host: exact, whatever the compression (it applies across hosts only)
        if code == 2 and params.residual is not None:
            _apply_residual(tensor, params.residual)
        if path == "ipc":
            return _ops.ipc_all_reduce_(tensor, res.cuda_ipc(tensor.device)[0], average)
        return _ops.shm_all_reduce_(tensor, res.shared_memory(), average)
    param = params.block_size if code == 1 else params.k_for(tensor.numel()) if code == 2 else 0
    residual = params.residual if code == 2 else None
    return _ops.hierarchical_all_reduce_(tensor, res.shared_memory(), res.inter_host_group(), group.size(), average,
                                         code, param, residual, res.piece_bytes)


def _apply_residual(tensor: torch.Tensor, residual: torch.Tensor) -> None:
    """An exact reduction sends everything: the error-feedback residual goes in and is emptied."""
    if residual.shape != tensor.shape or residual.dtype != tensor.dtype:
        raise ValueError(f"Topk: residual must be like the tensor ({tuple(tensor.shape)}, {tensor.dtype}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}")
    tensor.add_(residual)
    residual.zero_()


def release(group: dist.ProcessGroup | None = None) -> None:
    """Frees what pyparallel holds for ``group``: its worker thread, shared-memory mapping, inter-host
    groups and failure state. Call it before ``dist.destroy_process_group(group)`` when the process goes
    on (at exit everything is freed anyway)."""
    name = (group or dist.group.WORLD).group_name
    with _tracked_lock:
        _tracked.pop(name, None)
    _release_name(name)


class _GroupWorker:
    """One thread per process group: collectives run in submission order, off the caller's thread.

    A synchronous CPU collective with nothing queued runs on the caller's thread instead (two thread
    switches fewer); ``_mutex`` keeps it ordered with the queued ones."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pyparallel-{name}")
        self._thread_id = None          # the pool's one thread, once it has run a job
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._mutex = threading.Lock()  # held while a collective runs
        self._queued = 0                # submitted and not finished
        self._queued_lock = threading.Lock()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def on_worker_thread(self) -> bool:
        """True inside a collective's job or a future callback it triggers (they run on this thread)."""
        return self._thread_id == threading.get_ident()

    def run_inline(self, run) -> bool:
        """Runs ``run()`` now if no collective is queued; False (nothing run) otherwise. Never on the
        worker thread itself: a job there holds the mutex."""
        if self.on_worker_thread():
            return False
        with self._mutex:
            with self._queued_lock:
                if self._queued:
                    return False
            run()
            return True

    def submit(self, tensor: torch.Tensor, run) -> torch.futures.Future:
        """Schedules run() (which reduces ``tensor`` in place); the future's value is ``tensor``."""
        if tensor.is_cuda:
            fut = torch.futures.Future(devices=[tensor.device])
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(tensor.device))
            stream = self._stream(tensor.device)
        else:
            fut = torch.futures.Future()

        def job():
            self._thread_id = threading.get_ident()
            try:
                with self._mutex:
                    if tensor.is_cuda:
                        with torch.cuda.device(tensor.device), torch.cuda.stream(stream):
                            stream.wait_event(ready)
                            run()
                            tensor.record_stream(stream)
                            fut.set_result(tensor)  # records events on `stream` for the waiters
                    else:
                        run()
                        fut.set_result(tensor)
            except BaseException as exc:  # delivered to whoever waits on the future
                fut.set_exception(exc)
            finally:
                with self._queued_lock:
                    self._queued -= 1

        with self._queued_lock:
            self._queued += 1
        self._pool.submit(job)
        return fut

    def shutdown(self):
        # On the worker thread itself (the group's last reference died in a job), joining would wait for
        # this very thread: let it end once the job returns.
        self._pool.shutdown(wait=not self.on_worker_thread())


_workers: dict[str, _GroupWorker] = {}
_workers_lock = threading.Lock()


def worker(group_name: str) -> _GroupWorker:
    with _workers_lock:
        if group_name not in _workers:
            _workers[group_name] = _GroupWorker(group_name)
        return _workers[group_name]


@atexit.register
def _shutdown_workers():
    with _workers_lock:
        for w in _workers.values():
            w.shutdown()
        _workers.clear()


def all_reduce(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    op: str = "sum",
    compression: Compression = None,
    async_op: bool = False,
    transport: str = "auto",
) -> torch.futures.Future | None:
    """All-reduce ``tensor`` in place with pyparallel's collectives.

    Args:
        tensor: float32, float16 or bfloat16; CPU tensors need a Gloo group, CUDA tensors an NCCL group
            (or, with the "ipc" transport, any group whose ranks share one node: its store is all it uses).
            Any shape and numel (0 included). fp16/bf16 are accumulated in fp32, but partial sums travel
            in the tensor's dtype on the ring (tensors over 64 KiB, 3 or more ranks) and between hosts (each
            host's sum): fp16 partial sums above 65504 become inf, also with ``op="avg"`` where the average
            itself would fit (four ranks at 60000). Shared memory and small tensors sum in fp32 and divide
            once. Divide before reducing (as :func:`pyparallel.hooks.fp16_hook` does) or use bf16 there.
        group: process group (default: the world).
        op: ``"sum"`` or ``"avg"``.
        compression: None (exact), ``"int8"`` / :class:`Int8` (error bound in its docstring) or
            :class:`Topk` (sparse all-gather with optional error feedback). Applied to the bytes that
            cross hosts only: inside a host the reduction is exact (with ``Topk``, the residual is
            added and emptied).
        async_op: return a ``torch.futures.Future`` (value: ``tensor``) instead of waiting.
        transport: ``"auto"`` (by host layout and device, see :mod:`pyparallel.transport`), ``"ring"``,
            ``"shm"`` (every rank on one host), ``"hierarchical"`` or ``"ipc"`` (CUDA tensors, every rank
            on one node: CUDA IPC, Note [CUDA IPC all-reduce]; not yet run on a GPU).

    Every rank's header (collective, numel, dtype, options) is checked against every other's first, by
    the transport itself; a mismatch raises the same error on every rank instead of hanging.

    Returns:
        None, or a future when ``async_op``. Results are bitwise identical on every rank. On a rank that
        is not a member of ``group`` it does what ``torch.distributed.all_reduce`` does: warns, leaves
        ``tensor`` alone and returns None, also with ``async_op``.

    Example:
        >>> t = torch.randn(1 << 20)
        >>> pyparallel.all_reduce(t, op="avg", compression="int8")
        >>> fut = pyparallel.all_reduce(t, async_op=True); ...; fut.wait()
    """
    _check_tensor(tensor)
    if _not_a_member(group):
        _average(op)  # bad arguments still raise, as in torch
        warnings.warn(f"Running all_reduce on global rank {dist.get_rank()} which does not belong to the given "
                      "group.", stacklevel=2)
        return None
    if not async_op and not tensor.is_cuda:
        average, g = _average(op), _group(group)
        if worker(g.group_name).run_inline(lambda: collective(tensor, g, average, compression, transport)):
            return None
    fut = submit(tensor, group, op, compression, transport)
    if async_op:
        return fut
    fut.wait()
    return None


def shm_empty(*size, dtype: torch.dtype = torch.float32, group: dist.ProcessGroup | None = None,
              keep_free: int = 0) -> torch.Tensor:
    """An uninitialised CPU tensor in shared memory that the other ranks of this host read in place.

    ``all_reduce`` on such tensors (transport "shm" or "auto", every rank of the group on one host) skips
    the staging through the segment's slots: each rank reduces its region straight from the others'
    tensors and copies the other regions from their owners, one barrier per round instead of the staged
    path's two, and two more (Note [Registered buffers], csrc/comm/shm.h), when every rank passes the
    tensor from the same place of the same ``shm_empty`` buffer (a view at the same offset on every rank
    works too). Otherwise the result is the same, by the staged path. Results are bitwise identical to the
    staged path's.

    Collective, as torch's symmetric memory: every rank of ``group`` calls it with the same size and dtype,
    in the same order; a rank that does not makes the others raise within the group's timeout. The memory
    is reserved up front (a full /dev/shm raises here) and freed when the tensor and its views are gone;
    nothing stays in /dev/shm once every rank has mapped it. With ``keep_free``, every rank raises instead
    unless that many bytes of /dev/shm stay free besides the buffer (its L parts): an optional user
    (DataParallel's buckets) need not take the room other processes count on.

    Example:
        >>> grads = pyparallel.shm_empty(1 << 20)   # every rank
        >>> grads.copy_(g); pyparallel.all_reduce(grads, op="avg")
    """
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    # torch.empty's checks and errors (a negative size, a bad dtype), on every rank before the handshake:
    # the byte count below would otherwise turn -1 into a whole page of elements.
    like = torch.empty(size, dtype=dtype, device="meta")
    shape = like.shape
    if _not_a_member(group):
        raise ValueError(f"shm_empty: rank {dist.get_rank()} is not a member of the given group")
    g = _group(group)
    if g.size() == 1:
        return torch.empty(shape, dtype=dtype)
    res = _transport.resources(g)
    if len(res.layout.hosts) != 1:
        raise ValueError(f"shm_empty: the ranks of group '{g.group_name}' are on {len(res.layout.hosts)} hosts "
                         f"(ranks by host: {res.layout.hosts}); shared-memory buffers need every rank on one host")
    nbytes = like.numel() * like.element_size()
    part = res.shared_buffer(nbytes, keep_free)
    return part[:nbytes].view(dtype).view(shape)


def resolve_transport(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, transport: str = "auto") -> str:
    """The transport that ``all_reduce(tensor, group, transport=transport)`` uses: "ring", "shm",
    "hierarchical" or "ipc" (the same answer on every rank). For CUDA tensors this may set up CUDA IPC
    (a handshake through the group's store that every rank must make), as the first collective would."""
    return _transport.choose(tensor, _group(group), transport)


def submit(tensor, group=None, op="sum", compression: Compression = None, transport: str = "auto",
           on_bytes=None, on_start=None) -> torch.futures.Future:
    """all_reduce(..., async_op=True) with two optional callbacks, both run on the group's worker thread:
    ``on_start()`` just before the collective starts moving bytes, ``on_bytes(n)`` once it is done with
    the bytes this rank sent across hosts (the hooks count their traffic with it)."""
    _check_tensor(tensor)
    average = _average(op)
    g = _group(group)
    _transport.check(transport, "all_reduce")  # here, not only on the worker: the caller sees the error

    def run():
        if on_start is not None:
            on_start()
        sent = collective(tensor, g, average, compression, transport)
        if on_bytes is not None:
            on_bytes(sent)

    w = worker(g.group_name)
    if w.on_worker_thread():
        # Called from a callback of one of this group's futures: queueing behind the job that runs the
        # callback would wait forever, so run now. Every rank's callbacks run in the same order, so the
        # collectives still line up across ranks.
        fut = torch.futures.Future(devices=[tensor.device]) if tensor.is_cuda else torch.futures.Future()
        try:
            run()
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(tensor)
        return fut
    return w.submit(tensor, run)
