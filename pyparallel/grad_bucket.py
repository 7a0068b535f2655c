"""A bucket of gradients with the interface of ``torch.distributed.GradBucket``.

``dist.GradBucket`` has no Python constructor, so our own trainers (``pyparallel.DataParallel`` and the
pipeline's data groups) hand hooks this class instead. It offers the same methods, so one hook runs
unchanged under torch's DistributedDataParallel and under ours.
"""

from __future__ import annotations

import torch


class Bucket:
    """Flat gradient buffer of one bucket plus the parameters it belongs to.

    Args:
        index: bucket index, stable across iterations (pyparallel's hooks key their state by parameter
            instead, Note [Hook state keyed by parameter]).
        buffer: the flat 1-D gradient buffer of the bucket.
        parameters: the parameters whose gradients fill ``buffer`` end to end, in buffer order.
        is_last: whether this is the last bucket to be reduced in the iteration.
    """

    __slots__ = ("_index", "_buffer", "_parameters", "_is_last")

    def __init__(self, index: int, buffer: torch.Tensor, parameters: list[torch.Tensor], is_last: bool):
        numel = sum(p.numel() for p in parameters)
        if buffer.dim() != 1 or buffer.numel() != numel:
            raise ValueError(f"Bucket {index}: buffer must be 1-D with {numel} elements, got shape {tuple(buffer.shape)}")
        self._index = index
        self._buffer = buffer
        self._parameters = list(parameters)
        self._is_last = is_last

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def set_buffer(self, buffer: torch.Tensor) -> None:
        if buffer.shape != self._buffer.shape:
            raise ValueError(f"Bucket {self._index}: set_buffer got shape {tuple(buffer.shape)}, "
                             f"expected {tuple(self._buffer.shape)}")
        self._buffer = buffer

    def gradients(self) -> list[torch.Tensor]:
        """Views of the buffer shaped like each parameter."""
        out, offset = [], 0
        for p in self._parameters:
            out.append(self._buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out

    def parameters(self) -> list[torch.Tensor]:
        return list(self._parameters)

    def is_last(self) -> bool:
        return self._is_last

    def __repr__(self) -> str:
        return (f"Bucket(index={self._index}, numel={self._buffer.numel()}, dtype={self._buffer.dtype}, "
                f"params={len(self._parameters)}, is_last={self._is_last})")
