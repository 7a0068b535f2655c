"""Measuring activation memory: the bytes autograd keeps alive for backward, and their peak.

Works on any device (on CPU there is no allocator statistic to read), for any schedule, ours or not.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SavedActivationMeter:
    """Counts the storage bytes of tensors saved for backward while they are alive; tracks the peak.

    Inside the ``with`` block every tensor autograd saves goes through a ``saved_tensors_hooks`` pack
    hook. Each distinct storage counts once, in full (a saved view keeps its whole storage alive), from the
    first time it is saved until autograd drops the last reference to it (after backward, or when the graph
    is freed). Storages of the excluded tensors (the parameters: weights saved by matmul are not
    activations) are not counted.

    Args:
        exclude: tensors whose storages are not activations, typically ``model.parameters()``.

    Example:
        >>> with SavedActivationMeter(model.parameters()) as meter:
        ...     model(x).sum().backward()
        >>> meter.peak_bytes
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._refs: dict[int, int] = {}  # storage pointer -> saved tensors alive that use it
        self._sizes: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedActivationMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._excluded or storage.nbytes() == 0:
            return tensor
        if ptr not in self._refs:
            self._refs[ptr], self._sizes[ptr] = 0, storage.nbytes()
            self.current_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._refs[ptr] += 1
        return _Saved(self, ptr, tensor)

    @staticmethod
    def _unpack(packed) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, ptr: int) -> None:
        self._refs[ptr] -= 1
        if not self._refs[ptr]:
            del self._refs[ptr]
            self.current_bytes -= self._sizes.pop(ptr)


class _Saved:
    """A saved tensor that reports to its meter when autograd lets go of it."""

    __slots__ = ("meter", "ptr", "tensor")

    def __init__(self, meter: SavedActivationMeter, ptr: int, tensor: torch.Tensor):
        self.meter, self.ptr, self.tensor = meter, ptr, tensor

    def __del__(self):
        self.meter._release(self.ptr)
