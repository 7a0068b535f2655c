"""Splitting a batch into micro-batches along dim 0.

Uneven splits are allowed: ``N`` samples in ``m`` micro-batches give ``N % m`` micro-batches of
``ceil(N / m)`` samples followed by micro-batches of ``floor(N / m)`` (``torch.tensor_split``). The
pipelines weight micro-batch ``i``'s mean loss by ``n_i / N`` so that losses and gradients are those of
the whole batch either way.
"""

from __future__ import annotations

import torch


def split_microbatches(batch: torch.Tensor, n_microbatches: int, what: str = "inputs") -> list[torch.Tensor]:
    """Views of ``batch`` split along dim 0 into ``n_microbatches`` non-empty micro-batches.

    Args:
        batch: tensor whose dim 0 is the batch.
        n_microbatches: number of micro-batches.
        what: name of the batch in error messages.

    Returns:
        The micro-batches, in order (sizes differ by at most one).

    Example:
        >>> [c.shape[0] for c in split_microbatches(torch.zeros(10, 3), 4)]
        [3, 3, 2, 2]
    """
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{what} must be a tensor whose dim 0 is the batch, got {type(batch).__name__}")
    if batch.dim() == 0:
        raise ValueError(f"{what} must have a batch dimension (dim 0), got a 0-d tensor")
    if batch.shape[0] < n_microbatches:
        raise ValueError(f"{what} has batch size {batch.shape[0]}, fewer than n_microbatches={n_microbatches}: "
                         "every micro-batch needs at least one sample")
    return list(batch.tensor_split(n_microbatches))


def check_n_microbatches(n_microbatches: int) -> int:
    if not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"n_microbatches must be a positive int, got {n_microbatches!r}")
    return n_microbatches
