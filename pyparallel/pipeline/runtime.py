"""Executes one stage's schedule for one step, exchanging activations and gradients with its neighbours.

Receives are posted ahead of time where the backend allows it (Note [When to post receives], p2p.py) and
sends complete in the background while the stage computes. A stage's input for micro-batch i is the
received buffer, made part of the graph by :class:`_StageInput`, whose backward catches the gradient to
send upstream.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .grid import ProcessGrid
from .handshake import PipelineError, Spec, StepPlan
from .p2p import Receive, StageTransfers
from .schedule import Action


def run_stage(module: nn.Module, actions: list[Action], plan: StepPlan, grid: ProcessGrid, device: torch.device,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prefetch: bool) -> torch.Tensor | None:
    """Runs ``actions`` (forwards and backwards of micro-batches) on this stage.

    Args:
        module: this stage's layers.
        actions: this stage's schedule (schedule.stage_actions).
        plan: the validated shapes, inputs (first stage), targets and loss weights (last stage).
        grid: this rank's place in the pipeline.
        device: the stage's device.
        loss_fn: ``loss_fn(output, target)``, the mean loss of a micro-batch (last stage only).
        prefetch: post receives one action early (Note [When to post receives]); only where the backend
            runs point-to-point operations independently of each other (Gloo, not NCCL).

    Returns:
        On the last stage the batch's loss, ``sum_i n_i / N * loss_i`` (detached); otherwise None.
        Parameter gradients are accumulated into ``.grad`` as by ``loss.backward()`` on that loss, scaled
        by ``plan.grad_weights`` where data replicas' batches differ in size (Note [Step handshake]).
    """
    transfers = StageTransfers([_receive_of(action, plan, grid) for action in actions], device, prefetch)
    anchor = torch.empty(0, device=device, requires_grad=True)  # makes _StageInput's output require grad
    stage_inputs: dict[int, _Received] = {}  # forward done, backward not yet: where the input's gradient lands
    pending: dict[int, torch.Tensor] = {}  # forward done, backward not yet: output (or weighted loss on the last stage)
    total_loss = None
    for k, (forward, i) in enumerate(actions):
        received = transfers.receive(k)
        if forward:
            if grid.is_first:
                x = plan.input_chunks[i]
            else:
                stage_inputs[i] = _Received(received)
                x = _StageInput.apply(anchor, stage_inputs[i])
            y = module(x)
            _check_output(y, plan.out_specs[i], grid.stage, i)
            if grid.is_last:
                loss = loss_fn(y, plan.target_chunks[i])
                reported = loss.detach() * plan.weights[i]
                total_loss = reported if total_loss is None else total_loss + reported
                pending[i] = loss * plan.grad_weights[i]
            else:
                pending[i] = y
                transfers.send(y.detach(), grid.next_rank)
        else:
            out = pending.pop(i)
            if out.requires_grad:  # False on a frozen first stage: nothing to differentiate, nothing to send
                torch.autograd.backward(out, grad_tensors=received)
            if not grid.is_first:  # no gradient: the stage's output does not depend on its input
                grad = stage_inputs.pop(i).grad
                transfers.send(grad if grad is not None else plan.in_specs[i].zeros(device), grid.prev_rank)
    transfers.finish()
    return total_loss


class _Received:
    """A received activation on its way into the stage, and then the gradient that backward computed for it."""

    __slots__ = ("buffer", "grad")

    def __init__(self, buffer: torch.Tensor):
        self.buffer, self.grad = buffer, None


class _StageInput(torch.autograd.Function):
    """Returns the received buffer as a tensor of the graph; backward stores the buffer's gradient.

    Why not make the buffer a leaf that requires grad and read its ``.grad``: autograd refuses in-place
    operations on such a leaf, and a stage may start with one (``nn.ReLU(inplace=True)`` right after the cut,
    which the unsplit model runs without complaint). The dry run runs without autograd and cannot see it, so
    one rank raised mid-step while its peers waited for the group's timeout. The buffer is not an input of
    this Function, so its output is no view of a leaf but an ordinary intermediate tensor: an in-place
    operation rebases its history and the gradient that reaches this backward is still the input's.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, received: _Received) -> torch.Tensor:
        ctx.received = received
        buffer, received.buffer = received.buffer, None  # the graph keeps the buffer only as long as it needs it
        return buffer

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.received.grad = grad
        return None, None


def _receive_of(action: Action, plan: StepPlan, grid: ProcessGrid) -> Receive | None:
    """A forward receives its input from the previous stage, a backward its output's gradient from the next."""
    forward, i = action
    if forward and not grid.is_first:
        return Receive(*plan.in_specs[i], grid.prev_rank, f"stage {grid.stage} (rank {dist.get_rank()}): receiving "
                       f"micro-batch {i}'s activation from stage {grid.stage - 1} (rank {grid.prev_rank})")
    if not forward and not grid.is_last:
        return Receive(*plan.out_specs[i], grid.next_rank, f"stage {grid.stage} (rank {dist.get_rank()}): receiving "
                       f"micro-batch {i}'s gradient from stage {grid.stage + 1} (rank {grid.next_rank})")
    return None


def _check_output(y: torch.Tensor, expected: Spec, stage: int, microbatch: int) -> None:
    """The dry run fixed every buffer's shape; a stage whose output shape depends on data values breaks that."""
    if not isinstance(y, torch.Tensor) or Spec.of(y) != expected:
        got = Spec.of(y) if isinstance(y, torch.Tensor) else type(y).__name__
        raise PipelineError(f"stage {stage} returned {got} for micro-batch {microbatch}, but its dry run on zeros "
                            f"returned {expected}: a stage's output shape must depend only on its input's shape")
