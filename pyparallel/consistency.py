"""Checks that every rank of a group holds the same configuration, before communication relies on it.

A collective over tensors whose sizes differ between ranks does not fail cleanly (a Gloo broadcast of
different sizes aborts the process or mixes bytes silently), and ranks that split a pipeline differently
compute a wrong loss without any error. So the trainers compare what they are about to rely on first,
with one small object all-gather at construction (as torch DDP's ``_verify_param_shape_across_processes``
does), and raise the same error, naming the first difference, on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

TensorSpec = tuple[str, tuple[int, ...], str]  # (name, shape, dtype)


def gather(value: Any, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's ``value`` (picklable), by group rank; collective over ``group``."""
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def check_same(value: Any, group: dist.ProcessGroup | None, what: str) -> None:
    """Raises ValueError on every rank unless every rank of ``group`` passed an equal ``value``.

    ``value`` may be an exception a rank met while preparing its own value: then every rank raises, the
    others naming that rank. ``what`` names the configuration in the message ("DistributedPipeline: the
    pipeline configuration").
    """
    values = gather(value, group)
    if isinstance(value, BaseException):
        raise value
    for r, v in enumerate(values):
        if isinstance(v, BaseException):
            raise ValueError(f"{what}: rank {r} rejected it: {type(v).__name__}: {v}")
    for r, v in enumerate(values[1:], start=1):
        if v != values[0]:
            raise ValueError(f"{what}: ranks disagree: rank 0 has {values[0]}, rank {r} has {v}")


def tensor_specs(named: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in named]


def _describe(spec: TensorSpec) -> str:
    return f"{spec[0]} of shape {list(spec[1])} and dtype {spec[2]}"


def first_difference(kind: str, mine: list[TensorSpec], theirs: list[TensorSpec], r: int) -> str | None:
    """How rank ``r``'s tensor list differs from rank 0's, or None when they are equal."""
    if mine == theirs:
        return None
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a == b:
            continue
        if a[0] == b[0]:
            return (f"{kind} {a[0]} has shape {list(a[1])} and dtype {a[2]} on rank 0 but shape {list(b[1])} and "
                    f"dtype {b[2]} on rank {r}")
        return f"{kind} {i} is {_describe(a)} on rank 0 but {_describe(b)} on rank {r}"
    longer, who = (mine, 0) if len(mine) > len(theirs) else (theirs, r)
    return (f"rank 0 has {len(mine)} {kind}s, rank {r} has {len(theirs)}; the first one only rank {who} has is "
            f"{_describe(longer[min(len(mine), len(theirs))])}")


def check_same_tensors(groups: dict[str, list[TensorSpec]], group: dist.ProcessGroup | None, who: str) -> None:
    """Raises ValueError on every rank, naming the first mismatch, unless every rank has the same tensors
    (names, shapes, dtypes) in each of ``groups`` (e.g. ``{"parameter": [...], "buffer": [...]}``)."""
    everyone = gather(groups, group)
    for r, theirs in enumerate(everyone[1:], start=1):
        for kind, specs in everyone[0].items():
            diff = first_difference(kind, specs, theirs[kind], r)
            if diff is not None:
                raise ValueError(f"{who}: every rank must hold the same model, but {diff}")


def broadcast_from_first_rank(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Overwrites ``tensors`` with the group's rank 0's, one flat broadcast per (dtype, device) (after the
    checks above, so that every rank's tensors line up)."""
    from . import ops  # the compiled extension: not needed by the checks above

    src = dist.get_global_rank(group, 0) if group is not None else 0
    by_kind: dict = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t.detach())
    for kind in by_kind.values():
        flat = ops.bucket_flatten(kind)
        dist.broadcast(flat, src=src, group=group)
        ops.bucket_unflatten(flat, kind)
