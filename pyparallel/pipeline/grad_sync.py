"""Averaging one stage's gradients over its data group through a DDP-style communication hook."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from .. import ops
from ..grad_bucket import Bucket

CommHook = Callable[[Any, Bucket], torch.futures.Future]


class GradSync:
    """Reduces the gradients of ``params`` over ``process_group`` with ``hook``, bucket by bucket.

    The gradients are copied into flat buckets (DDP's assignment: per dtype and device, last parameters
    first, 1 MiB first bucket then 25 MiB), each wrapped in a :class:`pyparallel.grad_bucket.Bucket` and
    handed to ``hook(state, bucket)``; every bucket's hook is launched before any is waited for, so the
    buckets' communication overlaps. The hook's result is copied back into the gradients.

    Args:
        params: the stage's parameters (those without ``requires_grad`` are skipped).
        process_group: the data group.
        hook: ``hook(state, bucket) -> Future[Tensor]`` returning the reduced (averaged) 1-D buffer, as
            for ``DistributedDataParallel.register_comm_hook``. Default: torch's ``allreduce_hook``,
            which divides by the group size and all-reduces.
        state: the hook's state; default ``process_group`` (what ``allreduce_hook`` expects).

    Example:
        >>> sync = GradSync(stage.parameters(), grid.data_group)
        >>> loss.backward(); sync.reduce()
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], process_group: dist.ProcessGroup,
                 hook: CommHook | None = None, state: Any = None):
        self._params = [p for p in params if p.requires_grad]
        self._buckets = ops.bucket_assignment(self._params)
        self._hook = hook if hook is not None else allreduce_hook
        self._state = process_group if state is None else state

    def reduce(self) -> None:
        """Replaces every gradient by the hook's reduction over the data group (missing gradients count as 0)."""
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        launched = []
        for index, members in enumerate(self._buckets):
            params = [self._params[i] for i in members]
            bucket = Bucket(index, ops.bucket_flatten([p.grad for p in params]), params,
                            is_last=index == len(self._buckets) - 1)
            launched.append((bucket, self._hook(self._state, bucket)))
        for bucket, future in launched:
            reduced = future.wait()
            if not isinstance(reduced, torch.Tensor) or reduced.shape != bucket.buffer().shape:
                got = tuple(reduced.shape) if isinstance(reduced, torch.Tensor) else type(reduced).__name__
                raise TypeError(f"comm hook must return a Future of the bucket's reduced 1-D tensor of shape "
                                f"{tuple(bucket.buffer().shape)}, got {got} for bucket {bucket.index()}")
            ops.bucket_unflatten(reduced.to(bucket.buffer().dtype), [p.grad for p in bucket.parameters()])
