"""The one gradient reducer: buckets, a communication hook per bucket, and the copy back into ``.grad``.

Used by :class:`pyparallel.DataParallel` (which launches a bucket as soon as backward has produced all
its gradients) and by the pipeline's data groups (which reduce after backward). The defaults every
trainer starts from are defined here, once: bucket sizes, the int8 block size and the default hook.

A reducer holds, per bucket, the indices of its parameters (``ops.bucket_assignment``: one dtype and
device per bucket, parameters in reverse registration order, a small first bucket) and a persistent flat
buffer. Launching a bucket copies its gradients into the buffer (one launch), wraps it in a
:class:`pyparallel.grad_bucket.Bucket` and calls ``hook(state, bucket)``; waiting checks what the hook's
future returned and copies it back into the gradients. Buckets launch in index order on every rank, so
every rank issues the same sequence of collectives.
"""

from __future__ import annotations

import inspect
import typing
import warnings
from collections.abc import Iterable
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import comm, hooks, ops
from .grad_bucket import Bucket
from .transport import check as check_transport

MB = 1024 * 1024

FIRST_BUCKET_MB = ops.FIRST_BUCKET_BYTES / MB
"""Size of the first bucket of each (dtype, device), in MiB: small, so communication starts early in backward."""

BUCKET_CAP_MB = ops.BUCKET_CAP_BYTES / MB
"""Size cap of the other buckets, in MiB (DDP's default)."""

BLOCK_SIZE = ops.DEFAULT_BLOCK_SIZE
"""Elements per int8 quantization block (:class:`hooks.Int8State`, :class:`pyparallel.Int8`)."""

DEFAULT_HOOK = hooks.allreduce_hook
"""The hook a trainer uses when given none: pyparallel's exact all-reduce (average)."""

CommHook = Callable[[Any, Bucket], torch.futures.Future]


def state_for(hook: CommHook, process_group: dist.ProcessGroup | None) -> hooks.HookState | None:
    """A new state for ``hook`` on ``process_group`` when it is one of pyparallel's hooks (the HookState
    subclass its first argument is annotated with: ``hooks.Int8State`` for ``hooks.int8_hook``), else None.

    Without it a trainer given ``comm_hook=hooks.int8_hook`` and no state passed a plain HookState (or the
    bare group) and the hook failed after backward with an AttributeError (no ``block_size``)."""
    try:
        first = next(iter(inspect.signature(hook).parameters))
        wanted = typing.get_type_hints(hook).get(first)
    except (TypeError, ValueError, NameError, StopIteration):  # no signature, or annotations that do not resolve
        return None
    return wanted(process_group) if isinstance(wanted, type) and issubclass(wanted, hooks.HookState) else None


class Reducer:
    """Averages the gradients of ``params`` over ``process_group`` through ``comm_hook``, bucket by bucket.

    Args:
        params: the parameters to reduce (those without ``requires_grad`` are skipped); ``param_index``
            below counts in this list.
        process_group: the group to average over (default: the world).
        comm_hook: ``hook(state, bucket) -> Future[Tensor]`` returning the bucket's reduced 1-D buffer, as
            for ``DistributedDataParallel.register_comm_hook`` (:mod:`pyparallel.hooks` or your own).
            Default: :data:`DEFAULT_HOOK`.
        hook_state: the hook's state; default a new state of the class the hook takes (:func:`state_for`),
            else a :class:`hooks.HookState`, on ``process_group``.
        bucket_cap_mb, first_bucket_mb: bucket sizes in MiB (defaults :data:`BUCKET_CAP_MB`,
            :data:`FIRST_BUCKET_MB`).
        transport: if given, sets ``hook_state.transport`` (``"auto"``, ``"ring"``, ``"shm"``,
            ``"hierarchical"``).
        name: who is asking, for error messages (e.g. ``"DataParallel"``).
        param_names: the names of ``params`` (those that require gradients), for error messages.

    Two ways to drive it. After backward: :meth:`reduce` launches every bucket, then waits for each (the
    buckets' communication overlaps each other). During backward: :meth:`start`, then :meth:`grad_ready`
    as each gradient becomes final (a bucket launches when its last gradient arrives, in index order),
    then :meth:`finish`. A missing gradient (``grad is None``) counts as zeros.

    Example:
        >>> reducer = Reducer(model.parameters(), comm_hook=hooks.int8_hook, hook_state=hooks.Int8State())
        >>> loss.backward(); reducer.reduce()      # every .grad now holds the average over the ranks
    """

    def __init__(self, params: Iterable[torch.Tensor], process_group: dist.ProcessGroup | None = None,
                 comm_hook: CommHook | None = None, hook_state: Any = None, bucket_cap_mb: float = BUCKET_CAP_MB,
                 first_bucket_mb: float = FIRST_BUCKET_MB, transport: str | None = None, name: str = "Reducer",
                 param_names: list[str] | None = None):
        if not bucket_cap_mb > 0 or not first_bucket_mb > 0:
            raise ValueError(f"{name}: bucket sizes must be positive, got bucket_cap_mb={bucket_cap_mb}, "
                             f"first_bucket_mb={first_bucket_mb}")
        params = list(params)
        self.name = name
        self._names = [n for n, p in zip(param_names, params) if p.requires_grad] if param_names is not None else None
        self.params = [p for p in params if p.requires_grad]
        self.process_group = process_group
        self.comm_hook = comm_hook if comm_hook is not None else DEFAULT_HOOK
        if hook_state is None:
            hook_state = state_for(self.comm_hook, process_group) or hooks.HookState(process_group)
        self.hook_state = hook_state
        if transport is not None:
            self.hook_state.transport = check_transport(transport, name)
        self.buckets = ops.bucket_assignment(self.params, (int(first_bucket_mb * MB), int(bucket_cap_mb * MB)))
        self.bucket_of = [0] * len(self.params)
        self._shared = self._reduced_through_shared_memory()
        self._buffers = self._new_buffers()
        for b, members in enumerate(self.buckets):
            for i in members:
                self.bucket_of[i] = b
        self.start()

    def _reduced_through_shared_memory(self) -> bool:
        """Whether the hook's all-reduces go through the shared-memory transport (every rank on one host),
        where buffers from :func:`pyparallel.shm_empty` are reduced in place, without staging."""
        transport = getattr(self.hook_state, "transport", None)
        group = getattr(self.hook_state, "process_group", self.process_group)
        if transport not in ("auto", "shm") or not any(p.device.type == "cpu" for p in self.params):
            return False
        return comm.resolve_transport(torch.empty(1), group, transport) == "shm"

    def _new_buffers(self) -> list[torch.Tensor]:
        """The buckets' flat buffers. When the shm transport reduces them (:meth:`_reduced_through_shared_memory`),
        those it can reduce in place (CPU, a dtype of ``comm.DTYPES``) are views of one ``shm_empty`` buffer,
        at the same offsets on every rank (Note [Registered buffers], csrc/comm/shm.h): every rank builds the
        same buckets, and one collective allocation makes it all or nothing. Only if at least as much of
        /dev/shm stays free besides it: the buckets are an optimisation, and must not take the room that
        other processes (DataLoader workers, other groups' segments) count on. Otherwise, or if /dev/shm
        cannot hold them, every rank warns and keeps every bucket in private memory."""
        firsts = [self.params[members[0]] for members in self.buckets]
        numels = [sum(self.params[i].numel() for i in members) for members in self.buckets]
        shared = [self._shared and p.device.type == "cpu" and p.dtype in comm.DTYPES for p in firsts]
        offsets, nbytes = [], 0
        for p, numel, s in zip(firsts, numels, shared):
            offsets.append(nbytes)
            nbytes += -(-numel * p.element_size() // 64) * 64 if s else 0  # buckets start on cache lines
        if nbytes:
            group = getattr(self.hook_state, "process_group", self.process_group)
            parts = dist.get_world_size(group)  # the shm transport: every rank on this host
            try:
                block = comm.shm_empty(nbytes, dtype=torch.uint8, group=group, keep_free=nbytes * parts)
            except RuntimeError as exc:
                warnings.warn(f"{self.name}: gradient buckets stay in private memory ({exc}); the shared-memory "
                              "all-reduce stages them through its segment instead", stacklevel=3)
            else:
                block.zero_()
                return [block[o:o + n * p.element_size()].view(p.dtype) if s else p.new_zeros(n)
                        for p, n, s, o in zip(firsts, numels, shared, offsets)]
        return [p.new_zeros(n) for p, n in zip(firsts, numels)]

    @property
    def bucket_sizes(self) -> list[int]:
        """Elements per bucket, in launch order."""
        return [b.numel() for b in self._buffers]

    # ---- per bucket ----

    def launch(self, b: int) -> None:
        """Copies bucket ``b``'s gradients into its buffer and starts the hook on it."""
        params = [self.params[i] for i in self.buckets[b]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for i, g in zip(self.buckets[b], grads):
            if g.layout != torch.strided:
                who = f"parameter {self._names[i]}" if self._names else f"parameter {i} (shape {list(g.shape)})"
                raise ValueError(f"{self.name}: {who} has a sparse gradient ({g.layout}, e.g. from "
                                 "nn.Embedding(sparse=True)); pyparallel reduces dense gradients only: build the "
                                 "module with sparse=False")
        ops.bucket_flatten(grads, self._buffers[b])
        bucket = Bucket(b, self._buffers[b], params, is_last=b == len(self.buckets) - 1)
        self._futures[b] = self.comm_hook(self.hook_state, bucket)

    def wait(self, b: int) -> None:
        """Waits for bucket ``b``'s hook and writes its result into the gradients (created if missing)."""
        future, self._futures[b] = self._futures[b], None
        if future is None:
            raise RuntimeError(f"Reducer: bucket {b} was not launched")
        buffer = self._buffers[b]
        reduced = future.wait()
        if not isinstance(reduced, torch.Tensor) or reduced.shape != buffer.shape:
            got = tuple(reduced.shape) if isinstance(reduced, torch.Tensor) else type(reduced).__name__
            raise TypeError(f"comm hook must return a Future of the bucket's reduced 1-D tensor of shape "
                            f"{tuple(buffer.shape)}, got {got} for bucket {b}")
        params = [self.params[i] for i in self.buckets[b]]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ops.bucket_unflatten(reduced if reduced.dtype == buffer.dtype else reduced.to(buffer.dtype),
                             [p.grad for p in params])

    # ---- whole iterations ----

    def reduce(self) -> None:
        """Reduces every gradient now: launches every bucket, then waits for each."""
        self.start()
        for b in range(len(self.buckets)):
            self.launch(b)
        self._next = len(self.buckets)
        self.finish()

    def start(self) -> None:
        """Begins an iteration driven by :meth:`grad_ready`."""
        self._pending = [len(members) for members in self.buckets]
        self._futures: list = [None] * len(self.buckets)
        self._next = 0

    def grad_ready(self, param_index: int) -> list[int]:
        """Marks ``params[param_index]``'s gradient final; launches the buckets that are now complete and
        next in index order. Returns their indices."""
        self._pending[self.bucket_of[param_index]] -= 1
        launched = []
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self.launch(self._next)
            launched.append(self._next)
            self._next += 1
        return launched

    def finish(self) -> None:
        """Waits for every bucket (all must have been launched) and writes the results into the gradients."""
        if self._next != len(self.buckets):
            raise RuntimeError(f"Reducer: finish() with bucket {self._next} of {len(self.buckets)} not launched "
                               f"({self._pending[self._next]} gradient(s) missing)")
        for b in range(len(self.buckets)):
            self.wait(b)
