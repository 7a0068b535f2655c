"""Averaging one stage's gradients over its data group: a thin use of :class:`pyparallel.reducer.Reducer`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..reducer import CommHook, Reducer, state_for

__all__ = ["CommHook", "GradSync"]


class GradSync:
    """Reduces the gradients of ``params`` over ``process_group`` with ``hook``, bucket by bucket.

    The reducer's buckets and defaults (:mod:`pyparallel.reducer`: per dtype and device, last parameters
    first, 1 MiB first bucket then 25 MiB); every bucket's hook is launched before any is waited for, so
    the buckets' communication overlaps. The hook's result is copied back into the gradients.

    Args:
        params: the stage's parameters (those without ``requires_grad`` are skipped).
        process_group: the data group.
        hook: ``hook(state, bucket) -> Future[Tensor]`` returning the reduced (averaged) 1-D buffer, as
            for ``DistributedDataParallel.register_comm_hook``. Default: the reducer's default,
            pyparallel's exact :func:`pyparallel.hooks.allreduce_hook` (it was torch's ``allreduce_hook``
            before the reducer was shared).
        state: the hook's state. Default: with no ``hook``, a :class:`pyparallel.hooks.HookState` on
            ``process_group``; with one of pyparallel's hooks, a new state of the class its ``state``
            argument is annotated with (``hooks.Int8State`` for ``hooks.int8_hook``) on ``process_group``;
            with another hook, ``process_group`` itself (the state torch's own hooks, such as
            ``default_hooks.allreduce_hook``, take).

    Example:
        >>> sync = GradSync(stage.parameters(), grid.data_group)
        >>> loss.backward(); sync.reduce()
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], process_group: dist.ProcessGroup,
                 hook: CommHook | None = None, state: Any = None):
        if hook is not None and state is None:
            # pyparallel's hooks need their HookState subclass; torch's hooks take the group itself
            state = state_for(hook, process_group) or process_group
        self._reducer = Reducer(params, process_group, hook, state, name="GradSync")

    def reduce(self) -> None:
        """Replaces every gradient by the hook's reduction over the data group (missing gradients count as 0)."""
        self._reducer.reduce()

