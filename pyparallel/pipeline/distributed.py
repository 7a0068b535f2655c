"""One pipeline stage per rank, optionally replicated over a data-parallel grid."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..consistency import broadcast_from_first_rank, check_same, first_difference, gather, tensor_specs
from .grad_sync import CommHook, GradSync
from .grid import ProcessGrid
from .handshake import StepHandshake
from .microbatch import check_n_microbatches
from .partition import name_in_model, shared_across_stages, split_stages
from .runtime import run_stage
from .schedule import check_schedule, stage_actions


class DistributedPipeline:
    """Trains a layer-split model with one stage per rank, GPipe or 1F1B, micro-batched.

    Every rank builds the same model and keeps only its own stage; the replicas of a stage start from the
    parameters and buffers of its first replica (broadcast at construction). Every rank calls
    ``step(inputs, targets)``; the first stage reads ``inputs``, the last ``targets``, the others may
    pass None. Activations travel forward and gradients backward point-to-point (Gloo on CPU, NCCL on
    GPU). With ``world = n_stages * d`` ranks, ``d`` pipelines run side by side (:class:`ProcessGrid`
    documents the layout) and each stage's gradients are averaged over its data group by ``comm_hook``
    after backward. Gradients equal the unsplit model's on the concatenation of the replicas' batches (up to
    the order of floating-point sums), also when the replicas' batches differ in size, with a hook that
    averages (the default); the loss returned is that of this pipeline's batch.

    A bad step (inputs or targets of the wrong type or size, a stage that rejects its input's shape, a
    loss function that fails) raises :class:`PipelineError` on every rank before any activation moves;
    see Note [Step handshake] in handshake.py. Errors that depend on the batch's values (an index out of
    range, a BatchNorm in training given a micro-batch of one sample) raise on their rank during the step;
    its peers raise at the process group's timeout, naming the transfer they waited for.

    What equals the unsplit model and what does not: layers that use the whole batch see micro-batches
    (BatchNorm in training normalises each micro-batch by its own statistics and updates its running
    statistics once per micro-batch, as in GPipe); random layers (dropout) draw from each rank's own
    generator, micro-batch by micro-batch, so their masks differ from the unsplit model's (seed replicas
    differently for independent masks: their parameters are broadcast anyway). Stages pass one
    floating-point tensor each (a tuple, a dict or integer ids between stages are refused; the first
    stage may take integer ids) and cannot share parameters (tied weights are refused). ``step`` trains;
    there is no pipelined inference.

    Args:
        layers: an ``nn.Sequential`` or a list of modules, the whole model.
        loss_fn: ``loss_fn(output, target)`` returning the mean loss over a micro-batch (the default
            reduction of torch's losses); micro-batch ``i`` of ``n_i`` of the ``N`` samples is weighted
            ``n_i / N``, so uneven micro-batches give the whole batch's mean loss.
        balance: layers per stage; by default the stages get about equal parameter counts.
        n_stages: number of stages when ``balance`` is None; default: all ranks in one pipeline.
        n_microbatches: micro-batches per step; need not divide the batch (every micro-batch needs >= 1
            sample, else PipelineError).
        schedule: ``"1f1b"`` (activation memory of at most ``p - s`` micro-batches on stage ``s``) or
            ``"gpipe"`` (all ``m``); the same bubble ``(p - 1) / (m + p - 1)``.
        device: this rank's device; default ``cuda:<current device>`` with NCCL, else CPU.
        comm_hook: DDP-style ``hook(state, bucket) -> Future[Tensor]`` for the data groups; default
            pyparallel's exact ``hooks.allreduce_hook`` (average; the default of every trainer,
            :mod:`pyparallel.reducer`). Unused without replicas.
        hook_state: the hook's state; default a ``hooks.HookState`` on the data group without
            ``comm_hook``; with one of pyparallel's hooks, a new state of the class it takes (e.g.
            ``hooks.Int8State``) on the data group; with another hook, the data group itself (the state
            torch's own hooks take).
        grid: a :class:`ProcessGrid` made beforehand (e.g. to build ``hook_state`` on its data group);
            by default one is created (collective).

    Example:
        >>> pipe = DistributedPipeline(model, nn.functional.cross_entropy, balance=[3, 3],
        ...                            n_microbatches=8, schedule="1f1b")
        >>> opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
        >>> loss = pipe.step(x if pipe.grid.is_first else None, y if pipe.grid.is_last else None)
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(self, layers: nn.Sequential | Sequence[nn.Module],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], balance: Sequence[int] | None = None,
                 n_stages: int | None = None, n_microbatches: int = 1, schedule: str = "1f1b",
                 device: str | torch.device | None = None, comm_hook: CommHook | None = None,
                 hook_state: Any = None, grid: ProcessGrid | None = None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group first")
        # Every check that needs no communication comes first; then the ranks compare their partitions (a
        # rank that splits differently would run a layer twice or skip one), so a bad or inconsistent
        # configuration raises on every rank before any group is created.
        try:
            self.n_microbatches = check_n_microbatches(n_microbatches)
            self.schedule = check_schedule(schedule)
            if n_stages is None and balance is not None:
                n_stages = len(balance)
            if n_stages is None:
                n_stages = grid.n_stages if grid is not None else dist.get_world_size()
            stages = split_stages(layers, balance, n_stages)
            # Each rank keeps its own stage, so a tied weight (an embedding reused by the output layer) would
            # become one independent copy per stage, each trained on part of its gradient: refuse it.
            shared = shared_across_stages(stages)
            if shared is not None:
                raise ValueError(f"{shared} (tied weights): a pipeline stage cannot share parameters with another "
                                 "stage; put the layers that share it in one stage, or untie them")
            if grid is not None and grid.n_stages != n_stages:
                raise ValueError(f"grid has {grid.n_stages} stages but the model is split into {n_stages}")
            config = (f"balance {[len(s) for s in stages]}, n_microbatches {self.n_microbatches}, "
                      f"schedule {self.schedule!r}")
        except (TypeError, ValueError) as exc:
            config = exc
        check_same(config, None, "DistributedPipeline: every rank must split the model the same way")
        self.grid = grid if grid is not None else ProcessGrid(n_stages)
        self._actions = stage_actions(schedule, n_stages, self.grid.stage, self.n_microbatches)
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        self.device = torch.device(device)
        self.module = stages[self.grid.stage].to(self.device)
        if self.grid.data_size > 1:
            self._start_replicas_equal(sum(len(s) for s in stages[:self.grid.stage]))
        self.loss_fn = loss_fn
        self._prefetch_receives = dist.get_backend() != "nccl"  # Note [When to post receives], p2p.py
        self._handshake = StepHandshake(self.module, self.grid, self.device, self.n_microbatches, loss_fn)
        self._grad_sync = (GradSync(self.module.parameters(), self.grid.data_group, comm_hook, hook_state)
                           if self.grid.data_group is not None else None)

    def _start_replicas_equal(self, offset: int) -> None:
        """Gives every replica of a stage the parameters and buffers of the stage's first replica.

        The gradient average keeps replicas equal only if they start equal; replicas built with different
        seeds (a per-rank seed for data or dropout) trained apart forever, silently, and replicas of different
        shapes would make the all-reduce abort or mix bytes. As DataParallel does: first every rank compares
        the shapes of every stage's replicas (one all-gather over the world, so that a mismatch in one data
        group raises on every rank, not only in that group), then each data group broadcasts from its first rank.
        """
        grid = self.grid
        specs = {kind: tensor_specs((name_in_model(name, offset), t) for name, t in named)
                 for kind, named in [("parameter", self.module.named_parameters()),
                                     ("buffer", self.module.named_buffers())]}
        everyone = gather(specs)
        for stage in range(grid.n_stages):
            first = everyone[grid.rank_of(stage, 0)]
            for replica in range(1, grid.data_size):
                theirs = everyone[grid.rank_of(stage, replica)]
                for kind in first:
                    diff = first_difference(kind, first[kind], theirs[kind], replica)
                    if diff is not None:
                        raise ValueError(f"DistributedPipeline: the replicas of stage {stage} (global ranks "
                                         f"{grid.rank_of(stage, 0)} and {grid.rank_of(stage, replica)}, ranks 0 and "
                                         f"{replica} of its data group) must hold the same layers, but {diff}")
        broadcast_from_first_rank(list(self.module.parameters()) + list(self.module.buffers()), grid.data_group)

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's stage's parameters (give them to the optimizer)."""
        return self.module.parameters()

    def step(self, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """Forward and backward of one batch through the pipeline; gradients accumulate into ``.grad``.

        Args:
            inputs: the batch (dim 0), read on the first stage.
            targets: the batch's targets, read on the last stage.

        Returns:
            On the last stage the batch's mean loss (detached); None elsewhere.
        """
        plan = self._handshake.run(inputs, targets)
        loss = run_stage(self.module, self._actions, plan, self.grid, self.device, self.loss_fn,
                         self._prefetch_receives)
        if self._grad_sync is not None:
            self._grad_sync.reduce()
        return loss
