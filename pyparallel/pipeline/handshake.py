"""The per-step handshake that turns a bad step into the same clear error on every rank, never a hang.

Note [Step handshake]
Before any activation moves, the stages of one pipeline agree that the step can run:
1. Forward, stage to stage, a header ``[key, batch size]``. Stage 0 derives the key from the shapes and
   dtypes of its input micro-batches. A key every stage has seen before (each keeps the same bounded
   cache, filled in the same order) means the activation shapes are known. A new key is followed by an
   object message with the shapes: each stage dry-runs its layers on zeros of the shapes it receives
   (in the mode the step runs in, without autograd, its buffers and random generators restored after, so
   no state changes) to learn the shapes it will send. The first error found
   travels on instead of the shapes, and the key becomes INVALID_KEY.
2. The last stage checks the targets and the loss function on them; then a verdict travels back, stage to
   stage: 0, or 1 followed by the error text.
3. With data replicas, each data group sums the verdict flag and the batch size, so a step rejected by one
   pipeline stops every pipeline (the gradient all-reduce would otherwise wait forever), and the last stage
   weighs its samples by the batch size over all replicas (the replicas' batches may differ in size).
Then every rank either raises the same PipelineError or knows the exact shape of every buffer it will
receive. The steady state costs one 16-byte message forward and one 8-byte message back per stage
boundary per step, plus a two-element all-reduce with replicas. Errors that depend on the values in the
batch (an index out of range) cannot be seen by the dry run: they raise on their rank during the step and
its peers fail at the process group's timeout, naming the transfer they waited for (p2p.naming_the_transfer).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from . import p2p
from .grid import ProcessGrid
from .microbatch import split_microbatches

INVALID_KEY = -1
CACHE_SIZE = 64  # shape signatures remembered; a new one costs a dry run of every stage


class PipelineError(ValueError):
    """A step rejected before it started; raised on every rank of the grid with the same reason."""


class Spec(NamedTuple):
    """Shape and dtype of one micro-batch's tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(tensor: torch.Tensor) -> Spec:
        return Spec(tuple(tensor.shape), tensor.dtype)

    def zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=device)

    def __str__(self) -> str:
        return f"shape {list(self.shape)} and dtype {self.dtype}"


@dataclass
class StepPlan:
    """What one stage needs to run a validated step."""

    in_specs: list[Spec]  # tensors entering this stage, per micro-batch
    out_specs: list[Spec]  # tensors leaving it
    input_chunks: list[torch.Tensor] | None = None  # first stage
    target_chunks: list[torch.Tensor] | None = None  # last stage
    weights: list[float] | None = None  # last stage: n_i / N, the weight of micro-batch i's mean loss
    grad_weights: list[float] | None = None  # last stage: n_i * d / (N summed over the d replicas); see _agree


class StepHandshake:
    """Runs Note [Step handshake] for one stage.

    Args:
        module: this stage's layers, on ``device``.
        grid: the process grid (this rank's stage, neighbours and data group).
        device: device of the stage and of the handshake's messages.
        n_microbatches: micro-batches per step.
        loss_fn: ``loss_fn(output, target)``, used on the last stage.
    """

    def __init__(self, module: nn.Module, grid: ProcessGrid, device: torch.device, n_microbatches: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.module, self.grid, self.device = module, grid, device
        self.n_microbatches, self.loss_fn = n_microbatches, loss_fn
        self.name = f"stage {grid.stage} (rank {dist.get_rank()})"
        self._specs: OrderedDict[int, tuple[list[Spec], list[Spec]]] = OrderedDict()
        self._losses_checked: OrderedDict[tuple[Spec, Spec], None] = OrderedDict()

    def run(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> StepPlan:
        """Validates a step on every stage; returns this stage's plan or raises PipelineError everywhere."""
        grid, plan = self.grid, StepPlan([], [])
        error = None if torch.is_grad_enabled() else f"{self.name}: step() needs autograd but runs under no_grad"
        if grid.is_first:
            key, batch, error = self._read_inputs(inputs, plan, error)
        else:
            key, batch = p2p.recv_ints(2, grid.prev_rank, self.device)
            if key in self._specs:
                plan.in_specs = self._specs[key][0]
            else:
                received = p2p.recv_object(grid.prev_rank, self.device)
                error, plan.in_specs = (received, []) if isinstance(received, str) else (error, received)
        if error is None:
            if key in self._specs:
                plan.out_specs = self._specs[key][1]
            else:
                plan.out_specs, error = self._dry_run(plan.in_specs)
        if not grid.is_last:
            sent_key = key if error is None else INVALID_KEY
            p2p.send_ints([sent_key, batch], grid.next_rank, self.device)
            if sent_key not in self._specs:
                p2p.send_object(error if error is not None else plan.out_specs, grid.next_rank, self.device)
        if grid.is_last and error is None:
            error = self._read_targets(targets, batch, plan)
        verdict, all_replicas_batch = self._agree(error, batch)
        if verdict is not None:
            raise PipelineError(verdict)
        if grid.is_last:
            # The data group averages gradients over its d replicas; weighting each micro-batch's mean loss by
            # n_i * d / (N of all replicas) instead of n_i / N makes that average the gradient of the
            # concatenated batches even when replicas have batches of different sizes (the same weights,
            # bitwise, when they are equal or without replicas).
            plan.grad_weights = [c.shape[0] * grid.data_size / all_replicas_batch for c in plan.target_chunks]
        if key not in self._specs:
            _remember(self._specs, key, (plan.in_specs, plan.out_specs))
        return plan

    def _read_inputs(self, inputs, plan: StepPlan, error: str | None) -> tuple[int, int, str | None]:
        try:
            chunks = split_microbatches(inputs, self.n_microbatches, "inputs")
        except (TypeError, ValueError) as exc:
            return INVALID_KEY, 0, error or f"{self.name}: {exc}"
        plan.input_chunks = [c.to(self.device) for c in chunks]
        plan.in_specs = [Spec.of(c) for c in plan.input_chunks]
        return _key_of(plan.in_specs), inputs.shape[0], error

    def _dry_run(self, in_specs: list[Spec]) -> tuple[list[Spec], str | None]:
        """This stage's output specs for ``in_specs``, or the reason it cannot take them."""
        outputs: dict[Spec, Spec] = {}
        source = "an input micro-batch" if self.grid.is_first else f"an activation from stage {self.grid.stage - 1}"
        for spec in dict.fromkeys(in_specs):  # distinct specs (at most two sizes), in order
            try:
                with torch.no_grad(), _state_restored(self.module, self.device):
                    out = self.module(spec.zeros(self.device))
            except Exception as exc:  # any failure of user code becomes a PipelineError on every rank
                return [], f"{self.name} failed on {source} of {spec}: {type(exc).__name__}: {exc}"
            wanted = "tensor" if self.grid.is_last else "floating-point tensor (it is sent on, with gradients back)"
            if not isinstance(out, torch.Tensor) or not (self.grid.is_last or out.is_floating_point()):
                got = f"{out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
                return [], f"{self.name} must return a {wanted}, got a {got}"
            outputs[spec] = Spec.of(out)
        return [outputs[spec] for spec in in_specs], None

    def _read_targets(self, targets, batch: int, plan: StepPlan) -> str | None:
        try:
            chunks = split_microbatches(targets, self.n_microbatches, "targets")
        except (TypeError, ValueError) as exc:
            return f"{self.name}: {exc}"
        if targets.shape[0] != batch:
            return f"{self.name}: targets have batch size {targets.shape[0]} but the inputs on stage 0 have {batch}"
        plan.target_chunks = [c.to(self.device) for c in chunks]
        plan.weights = [c.shape[0] / batch for c in chunks]
        for out_spec, target in zip(plan.out_specs, plan.target_chunks):
            pair = (out_spec, Spec.of(target))
            if pair in self._losses_checked:
                continue
            try:
                with torch.no_grad():
                    loss = self.loss_fn(out_spec.zeros(self.device), target)
            except Exception as exc:  # as in _dry_run
                return (f"{self.name}: loss_fn failed on an output of {out_spec} and targets of {pair[1]}: "
                        f"{type(exc).__name__}: {exc}")
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                return (f"{self.name}: loss_fn must return a one-element tensor (a micro-batch's mean loss), "
                        f"got {loss!r}")
            _remember(self._losses_checked, pair, None)
        return None

    def _agree(self, error: str | None, batch: int) -> tuple[str | None, int]:
        """Steps 2 and 3 of Note [Step handshake]: the verdict every rank acts on, and the batch size summed
        over the data group (``batch`` without replicas)."""
        grid = self.grid
        verdict = error
        if not grid.is_last:
            (failed,) = p2p.recv_ints(1, grid.next_rank, self.device)
            verdict = p2p.recv_object(grid.next_rank, self.device) if failed else None
        if not grid.is_first:
            p2p.send_ints([verdict is not None], grid.prev_rank, self.device)
            if verdict is not None:
                p2p.send_object(verdict, grid.prev_rank, self.device)
        if grid.data_group is not None:
            summed = torch.tensor([verdict is not None, batch], dtype=torch.int64, device=self.device)
            with p2p.naming_the_transfer(f"{self.name}: the step handshake's all-reduce over the stage's data group"):
                dist.all_reduce(summed, group=grid.data_group)
            n_failed, batch = summed.tolist()
            if n_failed and verdict is None:
                verdict = (f"{self.name}: another data-parallel replica rejected this step (its ranks raise "
                           "the reason); every rank of the grid stops")
        return verdict, batch


def _key_of(specs: list[Spec]) -> int:
    """A 63-bit digest of the input specs, the same in every process (unlike hash())."""
    text = repr([(s.shape, str(s.dtype)) for s in specs]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _remember(cache: OrderedDict, key, value) -> None:
    """Insert, evicting the oldest entry: the same sequence of inserts gives the same cache on every stage."""
    cache[key] = value
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


@contextlib.contextmanager
def _state_restored(module: nn.Module, device: torch.device):
    """Runs a dry run in the module's own mode and then puts back its buffers and the random generators.

    Not eval mode: a layer that rejects a shape only in training (BatchNorm given one sample per channel)
    passed an eval-mode dry run and then raised on its rank alone, mid-step, its peers waiting for the
    group's timeout; and a layer whose output shape depends on the mode broke the buffers fixed here.
    Training mode updates batch-norm statistics (buffers, copied back) and draws dropout masks (the
    generators are forked), so the step that follows runs as if there had been no dry run.
    """
    saved = [(b, b.clone()) for b in module.buffers()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for b, value in saved:
            b.copy_(value)
