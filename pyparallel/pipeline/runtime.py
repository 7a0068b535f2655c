"""Executes one stage's schedule for one step, exchanging activations and gradients with its neighbours.

Before each action, the sends produced by the previous action are posted in one batch with the
receives this action needs (see p2p.post for why one batch), and only the receives are waited for; the
sends complete in the background while this stage computes. A stage's input for micro-batch i is a leaf
tensor that requires grad, so backward leaves the gradient to send upstream in its ``.grad``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import p2p
from .grid import ProcessGrid
from .handshake import PipelineError, Spec, StepPlan
from .schedule import Action


def run_stage(module: nn.Module, actions: list[Action], plan: StepPlan, grid: ProcessGrid, device: torch.device,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """Runs ``actions`` (forwards and backwards of micro-batches) on this stage.

    Args:
        module: this stage's layers.
        actions: this stage's schedule (schedule.stage_actions).
        plan: the validated shapes, inputs (first stage), targets and loss weights (last stage).
        grid: this rank's place in the pipeline.
        device: the stage's device.
        loss_fn: ``loss_fn(output, target)``, the mean loss of a micro-batch (last stage only).

    Returns:
        On the last stage the batch's loss, ``sum_i n_i / N * loss_i`` (detached); otherwise None.
        Parameter gradients are accumulated into ``.grad`` as by ``loss.backward()`` on that loss.
    """
    stage_inputs: dict[int, torch.Tensor] = {}
    pending: dict[int, torch.Tensor] = {}  # forward done, backward not yet: output (or weighted loss on the last stage)
    to_send: list = []
    in_flight: list[p2p.InFlight] = []
    total_loss = None
    for forward, i in actions:
        received = None
        if forward and not grid.is_first:
            received = plan.in_specs[i].empty(device)
            recvs = [p2p.recv_op(received, grid.prev_rank)]
        elif not forward and not grid.is_last:
            received = plan.out_specs[i].empty(device)
            recvs = [p2p.recv_op(received, grid.next_rank)]
        else:
            recvs = []
        in_flight = p2p.still_running(in_flight) + p2p.post(to_send, recvs)
        to_send = []
        if forward:
            x = plan.input_chunks[i] if grid.is_first else received.requires_grad_()
            if not grid.is_first:
                stage_inputs[i] = x
            y = module(x)
            _check_output(y, plan.out_specs[i], grid.stage, i)
            if grid.is_last:
                loss = loss_fn(y, plan.target_chunks[i]) * plan.weights[i]
                total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
                pending[i] = loss
            else:
                pending[i] = y
                to_send.append(p2p.send_op(y.detach(), grid.next_rank))
        else:
            torch.autograd.backward(pending.pop(i), grad_tensors=received)
            if not grid.is_first:
                x = stage_inputs.pop(i)
                to_send.append(p2p.send_op(x.grad if x.grad is not None else torch.zeros_like(x), grid.prev_rank))
    p2p.wait_all(in_flight + p2p.post(to_send, []))
    return total_loss


def _check_output(y: torch.Tensor, expected: Spec, stage: int, microbatch: int) -> None:
    """The dry run fixed every buffer's shape; a stage whose output shape depends on data values breaks that."""
    if not isinstance(y, torch.Tensor) or Spec.of(y) != expected:
        got = Spec.of(y) if isinstance(y, torch.Tensor) else type(y).__name__
        raise PipelineError(f"stage {stage} returned {got} for micro-batch {microbatch}, but its dry run on zeros "
                            f"returned {expected}: a stage's output shape must depend only on its input's shape")
