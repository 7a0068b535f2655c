"""A minimal data-parallel trainer on pyparallel's reducer.

Gradients are grouped into buckets by :class:`pyparallel.reducer.Reducer` (reverse registration order,
one dtype and device per bucket, a small first bucket). A post-accumulate-grad hook on every parameter
tells the reducer when a gradient is final; when a bucket is complete its gradients are flattened into
the bucket's buffer (one copy launch) and the communication hook starts on it, while backward goes on
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

from . import hooks, ops, reducer
from .consistency import broadcast_from_first_rank, check_same_tensors, tensor_specs


class DataParallel(nn.Module):
    """Wraps ``module`` so that ``loss.backward()`` leaves gradients averaged over the process group.

    Args:
        module: the model; rank 0's parameters and buffers are broadcast to every rank here, after a
            check that every rank's have the same names, shapes and dtypes (ValueError on every rank).
        process_group: group to average over (default: the world).
        bucket_cap_mb: bucket size cap in MiB (the first bucket is ``first_bucket_mb``); defaults in
            :mod:`pyparallel.reducer`.
        comm_hook: ``hook(state, bucket) -> Future[Tensor]``, e.g. one of :mod:`pyparallel.hooks` or your
            own with the same signature (the one DDP's ``register_comm_hook`` takes). Default:
            :data:`pyparallel.reducer.DEFAULT_HOOK` (pyparallel's exact :func:`hooks.allreduce_hook`).
        hook_state: the hook's state (default: a new state of the class the hook takes,
            :func:`pyparallel.reducer.state_for`, else a :class:`hooks.HookState`, on ``process_group``); a
            :class:`hooks.HookState` without a registered model gets ``module`` registered.
        transport: which transport the hook's collectives use (``"auto"``, ``"ring"``, ``"shm"``,
            ``"hierarchical"``, ``"ipc"``; see :mod:`pyparallel.transport`); sets ``hook_state.transport``. Default:
            the state's own (``"auto"`` unless set there).
        find_unused_parameters: allow parameters that get no gradient in a backward (they count as zero);
            without it such a backward raises an error naming them, once the step's buckets have been
            reduced (with zeros for them), so that its collectives still pair with the other ranks'.
        broadcast_buffers: broadcast rank 0's buffers (e.g. BatchNorm statistics) at every forward.

    One backward per forward is averaged. A second backward through the same forward's graph
    (``retain_graph=True``), or one through ``module`` called directly after an averaged backward, raises
    instead of leaving its gradients local to one rank: sum the losses into one backward, run a forward
    for each, or wrap it in :meth:`no_sync` to keep it local on purpose.

    Example:
        >>> model = pyparallel.DataParallel(net, comm_hook=hooks.int8_hook, hook_state=hooks.Int8State())
        >>> loss_fn(model(x), y).backward()   # gradients averaged over the ranks
        >>> with model.no_sync():             # accumulate locally, reduce on the next synced backward
        ...     loss_fn(model(x2), y2).backward()
    """

    def __init__(self, module: nn.Module, process_group: dist.ProcessGroup | None = None,
                 bucket_cap_mb: float = reducer.BUCKET_CAP_MB, comm_hook=None, hook_state=None,
                 find_unused_parameters: bool = False, broadcast_buffers: bool = True,
                 first_bucket_mb: float = reducer.FIRST_BUCKET_MB, transport: str | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("DataParallel: torch.distributed is not initialized (call dist.init_process_group first)")
        self.module = module
        self.process_group = process_group
        self.find_unused_parameters = find_unused_parameters
        self.broadcast_buffers = broadcast_buffers
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        if not named:
            raise ValueError("DataParallel: the module has no parameters that require gradients")
        # Before the first broadcast, which would abort or mix bytes if the ranks' models differ.
        check_same_tensors({"parameter": tensor_specs(module.named_parameters()),
                            "buffer": tensor_specs(module.named_buffers())}, process_group, "DataParallel")
        self._broadcast(list(module.parameters()) + list(module.buffers()))
        self._reducer = reducer.Reducer([p for _, p in named], process_group, comm_hook, hook_state,
                                        bucket_cap_mb, first_bucket_mb, transport, "DataParallel", self._names)
        self._register_model(self._reducer.hook_state)
        for i, p in enumerate(self._reducer.params):
            p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, i))
        self._sync = True
        self._armed = False
        self._reduced = False  # the last forward's backward was averaged; no forward since
        self._lock = threading.Lock()  # autograd may run hooks of independent branches on several threads
        self.events: list[tuple[str, int]] = []  # this iteration: ("grad", param), ("launch", bucket), ("end", -1)

    @property
    def comm_hook(self):
        return self._reducer.comm_hook

    @comm_hook.setter
    def comm_hook(self, hook) -> None:
        self._reducer.comm_hook = hook

    @property
    def hook_state(self):
        return self._reducer.hook_state

    @hook_state.setter
    def hook_state(self, state) -> None:
        self._register_model(state)
        self._reducer.hook_state = state

    def _register_model(self, state) -> None:
        # Per-parameter hook state keyed by name (Note [Hook state keyed by parameter], param_keys.py).
        if isinstance(state, hooks.HookState) and not state.model_registered:
            state.register_model(self.module)

    # ---- public ----

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers:
            buffers = list(self.module.buffers())
            if buffers:
                self._broadcast(buffers)
        if torch.is_grad_enabled():
            self._reduced = False
            if self._sync:
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
        return self._reducer.bucket_sizes

    # ---- reduction during backward ----

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        broadcast_from_first_rank(tensors, self.process_group)

    def _arm(self) -> None:
        self._reducer.start()
        self._seen = [False] * len(self._names)
        self._callback_queued = False
        self.events = []
        self._armed = True

    def _grad_ready(self, i: int, param: torch.Tensor) -> None:
        if not self._armed:
            if self._reduced and self._sync:
                # Left alone, this gradient would stay local to this rank, on top of the averaged ones, and
                # the ranks' models would drift apart without a word (torch's DDP does that).
                raise RuntimeError(
                    f"DataParallel: parameter {self._names[i]} received a gradient after this forward's gradients "
                    "were already averaged (a second backward through the same graph, e.g. with retain_graph=True, "
                    "or a backward through the wrapped module called directly); it would stay local to this rank "
                    "and the ranks' gradients would diverge. Sum the losses into one backward, run a forward "
                    "through DataParallel for each backward, or wrap this backward in no_sync() to keep it local.")
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
        self.events.extend(("launch", b) for b in self._reducer.grad_ready(i))

    def _finish(self) -> None:
        """End of backward: launch what is left, wait for every bucket, write the averaged gradients."""
        error = None
        try:
            with self._lock:
                self._reduced = True
                self.events.append(("end", -1))
                unused = [i for i, seen in enumerate(self._seen) if not seen]
                if unused and not self.find_unused_parameters:
                    names = ", ".join(self._names[i] for i in unused[:8]) + (" ..." if len(unused) > 8 else "")
                    error = RuntimeError(
                        f"DataParallel: {len(unused)} parameter(s) received no gradient in this backward: {names}. "
                        "Pass find_unused_parameters=True if some parameters legitimately take no part in the loss.")
                # Zero contributions, so every rank still launches every bucket in order, also when it raises
                # below: the ranks whose parameters were all used (they do not raise) have launched theirs,
                # and this rank's next step would otherwise be paired with their current one.
                for i in unused:
                    self._seen[i] = True
                    self._mark_ready(i)
            self._reducer.finish()
        finally:
            self._armed = False
        if error is not None:
            raise error
