"""A minimal data-parallel trainer with its own bucketing reducer.

Gradients are grouped into buckets (``ops.bucket_assignment``: reverse registration order, one dtype and
device per bucket, a small first bucket). A post-accumulate-grad hook on every parameter counts the
gradients a bucket still waits for; when a bucket is complete its gradients are flattened into the
bucket's buffer (one copy launch) and the communication hook starts on it, while backward goes on
computing the earlier layers' gradients. Buckets start strictly in index order, so every rank issues
the same sequence of collectives. At the end of backward (an autograd-engine callback) the trainer
waits for every bucket and copies the averaged gradients back into ``param.grad``.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.distributed as dist
from torch import nn

from . import hooks, ops
from .transport import check as check_transport
from .grad_bucket import Bucket

MB = 1024 * 1024


class _BucketPlan:
    __slots__ = ("index", "param_indices", "buffer")

    def __init__(self, index: int, param_indices: list[int], buffer: torch.Tensor):
        self.index, self.param_indices, self.buffer = index, param_indices, buffer


class DataParallel(nn.Module):
    """Wraps ``module`` so that ``loss.backward()`` leaves gradients averaged over the process group.

    Args:
        module: the model; rank 0's parameters and buffers are broadcast to every rank here.
        process_group: group to average over (default: the world).
        bucket_cap_mb: bucket size cap in MiB (the first bucket is ``first_bucket_mb``).
        comm_hook: ``hook(state, bucket) -> Future[Tensor]``, e.g. one of :mod:`pyparallel.hooks` or your
            own with the same signature (the one DDP's ``register_comm_hook`` takes). Default:
            :func:`hooks.allreduce_hook`.
        hook_state: the hook's state (default: a :class:`hooks.HookState` on ``process_group``).
        transport: which transport the hook's collectives use (``"auto"``, ``"ring"``, ``"shm"``,
            ``"hierarchical"``, ``"ipc"``; see :mod:`pyparallel.transport`); sets ``hook_state.transport``. Default:
            the state's own (``"auto"`` unless set there).
        find_unused_parameters: allow parameters that get no gradient in a backward (they count as zero);
            without it such a backward raises an error naming them.
        broadcast_buffers: broadcast rank 0's buffers (e.g. BatchNorm statistics) at every forward.

    Example:
        >>> model = pyparallel.DataParallel(net, comm_hook=hooks.int8_hook, hook_state=hooks.Int8State())
        >>> loss_fn(model(x), y).backward()   # gradients averaged over the ranks
        >>> with model.no_sync():             # accumulate locally, reduce on the next synced backward
        ...     loss_fn(model(x2), y2).backward()
    """

    def __init__(self, module: nn.Module, process_group: dist.ProcessGroup | None = None, bucket_cap_mb: float = 25,
                 comm_hook=None, hook_state=None, find_unused_parameters: bool = False,
                 broadcast_buffers: bool = True, first_bucket_mb: float = 1, transport: str | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("DataParallel: torch.distributed is not initialized (call dist.init_process_group first)")
        self.module = module
        self.process_group = process_group
        self.comm_hook = comm_hook if comm_hook is not None else hooks.allreduce_hook
        self.hook_state = hook_state if hook_state is not None else hooks.HookState(process_group)
        if transport is not None:
            self.hook_state.transport = check_transport(transport, "DataParallel")
        self.find_unused_parameters = find_unused_parameters
        self.broadcast_buffers = broadcast_buffers
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        if not self._params:
            raise ValueError("DataParallel: the module has no parameters that require gradients")
        self._broadcast(list(module.parameters()) + list(module.buffers()))
        groups = ops.bucket_assignment(self._params, (int(first_bucket_mb * MB), int(bucket_cap_mb * MB)))
        self._buckets = []
        self._bucket_of = {}
        for b, indices in enumerate(groups):
            first = self._params[indices[0]]
            numel = sum(self._params[i].numel() for i in indices)
            self._buckets.append(_BucketPlan(b, indices, torch.zeros(numel, dtype=first.dtype, device=first.device)))
            self._bucket_of.update((i, b) for i in indices)
        for i, p in enumerate(self._params):
            p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, i))
        self._sync = True
        self._armed = False
        self._lock = threading.Lock()  # autograd may run hooks of independent branches on several threads
        self.events: list[tuple[str, int]] = []  # this iteration: ("grad", param), ("launch", bucket), ("end", -1)

    # ---- public ----

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers:
            buffers = list(self.module.buffers())
            if buffers:
                self._broadcast(buffers)
        if torch.is_grad_enabled() and self._sync:
            self._arm()
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside keep gradients local (they accumulate in ``param.grad``); the next
        backward outside reduces the accumulated sum."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    @property
    def bucket_sizes(self) -> list[int]:
        """Elements per bucket, in launch order."""
        return [b.buffer.numel() for b in self._buckets]

    # ---- reducer ----

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        by_kind: dict = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for group in by_kind.values():
            flat = ops.bucket_flatten([t.detach() for t in group])
            dist.broadcast(flat, src=src, group=self.process_group)
            ops.bucket_unflatten(flat, [t.detach() for t in group])

    def _arm(self) -> None:
        self._pending = [len(b.param_indices) for b in self._buckets]
        self._ready = [False] * len(self._buckets)
        self._futures: list = [None] * len(self._buckets)
        self._seen = [False] * len(self._params)
        self._next = 0
        self._callback_queued = False
        self.events = []
        self._armed = True

    def _grad_ready(self, i: int, param: torch.Tensor) -> None:
        if not self._armed:
            return
        with self._lock:
            if self._seen[i]:
                raise RuntimeError(f"DataParallel: parameter {self._names[i]} received its gradient twice in one "
                                   "backward (reentrant checkpointing or a second backward through the same graph "
                                   "is not supported)")
            self._seen[i] = True
            self.events.append(("grad", i))
            if not self._callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._finish)
                self._callback_queued = True
            self._mark_ready(i)

    def _mark_ready(self, i: int) -> None:
        b = self._bucket_of[i]
        self._pending[b] -= 1
        if self._pending[b] == 0:
            self._ready[b] = True
            while self._next < len(self._buckets) and self._ready[self._next]:
                self._launch(self._buckets[self._next])
                self._next += 1

    def _launch(self, plan: _BucketPlan) -> None:
        params = [self._params[i] for i in plan.param_indices]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        ops.bucket_flatten(grads, plan.buffer)
        bucket = Bucket(plan.index, plan.buffer, params, is_last=plan.index == len(self._buckets) - 1)
        self.events.append(("launch", plan.index))
        self._futures[plan.index] = self.comm_hook(self.hook_state, bucket)

    def _finish(self) -> None:
        """End of backward: launch what is left, wait for every bucket, write the averaged gradients."""
        try:
            with self._lock:
                self.events.append(("end", -1))
                unused = [i for i, seen in enumerate(self._seen) if not seen]
                if unused and not self.find_unused_parameters:
                    names = ", ".join(self._names[i] for i in unused[:8]) + (" ..." if len(unused) > 8 else "")
                    raise RuntimeError(
                        f"DataParallel: {len(unused)} parameter(s) received no gradient in this backward: {names}. "
                        "Pass find_unused_parameters=True if some parameters legitimately take no part in the loss.")
                for i in unused:  # zero contributions, so every rank still launches every bucket in order
                    self._seen[i] = True
                    self._mark_ready(i)
            for plan, fut in zip(self._buckets, self._futures):
                result = fut.wait()
                if result is not plan.buffer:
                    plan.buffer.copy_(result)
                params = [self._params[i] for i in plan.param_indices]
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                ops.bucket_unflatten(plan.buffer, [p.grad for p in params])
        finally:
            self._armed = False
