"""The world's ranks laid out as a (pipeline stage, data replica) grid.

Layout: ``rank = stage * data_size + replica``. The ``data_size`` consecutive ranks of a stage hold copies
of that stage and form its data group, which averages the stage's gradients; the ranks ``replica``,
``replica + data_size``, ... form one pipeline. Eight ranks, four stages, two replicas::

    stage 0: ranks 0 1    <- data group of stage 0
    stage 1: ranks 2 3
    stage 2: ranks 4 5
    stage 3: ranks 6 7
                   ^ pipeline of replica 1: 1 -> 3 -> 5 -> 7

Stage-major order keeps each data group on consecutive ranks, which launchers place on one node: the
gradient all-reduce, the heavy traffic, stays on the fast links, and only the pipeline's point-to-point
activations (one per micro-batch) cross nodes. This is the order Megatron-LM uses (pipeline outermost).
"""

from __future__ import annotations

import torch.distributed as dist


class ProcessGrid:
    """This rank's place in the (stage, replica) grid, and its stage's data group.

    Creating a grid is collective: every rank of the default group must create it, with the same
    ``n_stages``, because it creates the data groups.

    Args:
        n_stages: number of pipeline stages; must divide the world size.

    Example:
        >>> grid = ProcessGrid(2)   # on 4 ranks: 2 stages x 2 replicas
        >>> grid.stage, grid.replica, grid.data_group
    """

    def __init__(self, n_stages: int):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group first")
        world, rank = dist.get_world_size(), dist.get_rank()
        if not isinstance(n_stages, int) or n_stages < 1:
            raise ValueError(f"n_stages must be a positive int, got {n_stages!r}")
        if n_stages > world:
            raise ValueError(f"the pipeline has {n_stages} stages but the world has only {world} ranks "
                             "(one stage per rank)")
        if world % n_stages:
            raise ValueError(f"the world size {world} is not a multiple of the {n_stages} pipeline stages "
                             "(ranks form a stages x replicas grid)")
        self.n_stages = n_stages
        self.data_size = world // n_stages
        self.stage, self.replica = divmod(rank, self.data_size)
        self.data_group = None
        if self.data_size > 1:
            for stage in range(n_stages):  # new_group is collective over the world: every rank makes every group
                group = dist.new_group([self.rank_of(stage, r) for r in range(self.data_size)])
                if stage == self.stage:
                    self.data_group = group

    def rank_of(self, stage: int, replica: int) -> int:
        """Global rank holding ``stage`` of pipeline ``replica``."""
        return stage * self.data_size + replica

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1

    @property
    def prev_rank(self) -> int | None:
        """Rank of the previous stage of this pipeline (None on the first stage)."""
        return None if self.is_first else self.rank_of(self.stage - 1, self.replica)

    @property
    def next_rank(self) -> int | None:
        """Rank of the next stage of this pipeline (None on the last stage)."""
        return None if self.is_last else self.rank_of(self.stage + 1, self.replica)

    def __repr__(self) -> str:
        return (f"ProcessGrid(n_stages={self.n_stages}, data_size={self.data_size}, stage={self.stage}, "
                f"replica={self.replica})")
