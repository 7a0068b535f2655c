"""Layer-split model parallelism in one process: each stage on its own device, micro-batches streamed.

Note [Streams of the single-process pipeline]
Every stage owns a CUDA stream, so stages overlap even when they share a device. Micro-batch ``i`` of
stage ``j`` is issued at clock ``i + j`` (the GPipe wavefront); since CUDA launches are asynchronous, the
host issues a whole clock's work before any of it finishes and the stages run concurrently.
Ordering is by events, never by synchronising a whole stream: the task (i, j) records an event on stage
j's stream and task (i, j + 1) makes its own stream wait for exactly that event (``wait_stream`` would
also wait for micro-batch i + 1, which may already be queued on stage j, and serialise the pipeline).
A tensor made on one stream and read on another is ``record_stream``-ed to the reader, so the caching
allocator does not hand its memory out again before the reader is done. Backward needs nothing of ours:
autograd runs each backward op on the stream of its forward op, makes a consumer wait for the producer of
each gradient and record_streams gradients that cross streams (torch/csrc/autograd/input_buffer.cpp;
pytorch#151079).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .microbatch import check_n_microbatches, split_microbatches
from .partition import shared_across_stages, split_stages


class Pipeline(nn.Module):
    """One process, ``len(devices)`` stages: stage ``j`` of the model lives on ``devices[j]``.

    ``forward`` splits the batch into micro-batches, streams them through the stages and concatenates the
    outputs on the last device; call ``backward`` on a loss of the output as with the unsplit model. The
    result and the gradients equal the unsplit model's (up to the order of floating-point sums), except
    where a layer depends on the whole batch or on random numbers: BatchNorm in training normalises each
    micro-batch by its own statistics (and updates its running statistics once per micro-batch), and
    dropout draws its masks in another order than the unsplit model. Each stage returns one tensor.

    Args:
        layers: an ``nn.Sequential`` or a list of modules (moved to their stage's device).
        devices: one device per stage, e.g. ``["cuda:0", "cuda:1"]``; devices may repeat (then the
            stages still overlap on their own streams) and may be ``"cpu"`` (run in order).
        balance: layers per stage; by default the stages get about equal parameter counts.
        n_microbatches: micro-batches per batch (uneven splits allowed, each needs >= 1 sample).

    Example:
        >>> pipe = Pipeline(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), ["cuda:0", "cuda:1"],
        ...                 balance=[2, 1], n_microbatches=4)
        >>> loss = nn.functional.cross_entropy(pipe(x.to("cuda:0")), y.to("cuda:1"))
        >>> loss.backward()
    """

    def __init__(self, layers: nn.Sequential | Sequence[nn.Module], devices: Sequence[str | torch.device],
                 balance: Sequence[int] | None = None, n_microbatches: int = 1):
        super().__init__()
        if not devices:
            raise ValueError("devices must name at least one device (one per stage)")
        self.devices = [torch.device(d) for d in devices]
        self.n_microbatches = check_n_microbatches(n_microbatches)
        stages = split_stages(layers, balance, n_stages=len(self.devices))
        shared = shared_across_stages(stages, self.devices)
        if shared is not None:  # else the first stage would find that weight on the second stage's device
            raise ValueError(f"Pipeline: {shared} (tied weights) on another device; put the layers that share "
                             "it in one stage or on one device, or untie them")
        self.stages = nn.ModuleList(stage.to(device) for stage, device in zip(stages, self.devices))
        self._streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for device in self.devices]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Runs the batch through all stages; returns the output on the last stage's device."""
        chunks = split_microbatches(batch, self.n_microbatches)  # first: it names a batch that is no tensor
        ready_event = _record_current(batch.device)
        tasks = [(chunk, ready_event) for chunk in chunks]
        n_stages, m = len(self.stages), len(tasks)
        for clock in range(m + n_stages - 1):
            for stage in range(max(0, clock - m + 1), min(n_stages, clock + 1)):
                micro = clock - stage
                tasks[micro] = self._run(stage, *tasks[micro])
        return torch.cat([_hand_to_current_stream(out, event) for out, event in tasks])

    def _run(self, stage: int, x: torch.Tensor, ready: torch.cuda.Event | None):
        device, stream = self.devices[stage], self._streams[stage]
        with torch.cuda.stream(stream):  # a no-op for None (CPU stages)
            y = self.stages[stage](_move(x, ready, device, stream))
            if not isinstance(y, torch.Tensor):  # it would fail in the next stage's move or the final cat, unclearly
                raise TypeError(f"Pipeline: stage {stage} returned a {type(y).__name__}; a stage must return one "
                                "tensor (it is moved to the next stage's device and concatenated over micro-batches)")
            return y, stream.record_event() if stream is not None else None


def _record_current(device: torch.device) -> torch.cuda.Event | None:
    """An event after the work queued so far on ``device``'s current stream (None on CPU)."""
    return torch.cuda.current_stream(device).record_event() if device.type == "cuda" else None


def _move(x: torch.Tensor, ready: torch.cuda.Event | None, device: torch.device,
          stream: torch.cuda.Stream | None) -> torch.Tensor:
    """``x`` on ``device``, usable by work on ``stream`` (the consumer's stream; None for a CPU consumer).

    ``ready`` marks the end of the work that produced ``x`` on a CUDA stream (None for CPU tensors).
    """
    if stream is None:  # CPU consumer: a blocking copy, after the producer's kernels have finished
        if ready is not None:
            ready.synchronize()
        return x.to(device)
    if ready is not None:
        stream.wait_event(ready)
    moved = x.to(device, non_blocking=True)  # the copy runs on `stream`, ordered after `ready`
    if x.is_cuda:
        x.record_stream(stream)  # x's memory belongs to its producer's stream; `stream` reads it
    return moved


def _hand_to_current_stream(out: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
    """Makes the caller's current stream wait for ``out`` (produced on a stage stream)."""
    if ready is not None:
        current = torch.cuda.current_stream(out.device)
        current.wait_event(ready)
        out.record_stream(current)
    return out
