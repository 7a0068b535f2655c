"""Stable keys for parameters, and one canonical order of the gradients in a bucket.

Note [Hook state keyed by parameter]
torch's DDP puts a parameter's gradient into a different bucket, at a different offset, in every new DDP
object (the first iteration follows registration order, then the buckets are rebuilt in the order the
gradients became ready). Hook state kept per bucket index (an error-feedback residual) is therefore lost
or applied to the wrong parameters after a checkpoint is loaded into a new DDP object, and even a
stateless hook computes different bits, because the ring's chunks, the int8 blocks and top-k's tie rule
all depend on where each gradient sits in the buffer. So the hooks:

* key per-parameter state by the parameter's name in the model given to ``HookState.register_model``
  (``pyparallel.DataParallel`` registers its module itself); without a registered model, parameters are
  numbered ``param0, param1, ...`` in the order the hook first sees them, which is the same for every new
  DDP object of the same model (its first iteration's buckets are deterministic), but only within the
  same kind of wrapper: register the model when checkpoints must outlive a change of wrapper;
* reduce each bucket in a canonical order: its gradients sorted by position, where a registered model's
  parameters are positioned in reverse registration order (the order of our DataParallel's buckets and,
  for most models, of DDP's rebuilt ones, which then need no copy) and unregistered ones by first sight.
  A bucket in another order is copied into the canonical order before the collective and back after
  (two copies of the bucket). Hence a resumed run continues bitwise when the model fits one bucket; with
  several buckets the split of parameters into buckets may itself differ, and only the per-parameter
  state is carried exactly.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import ops


class ParameterKeys:
    """Maps parameters (by identity) to (position, name).

    Args:
        model: the model whose ``named_parameters()`` give the names; None numbers parameters as they come.
    """

    __slots__ = ("_by_id", "_numels", "_next", "registered")

    def __init__(self, model: nn.Module | None = None):
        self._by_id: dict[int, tuple[weakref.ref, int, str]] = {}
        self._numels: dict[str, int] = {}
        self._next = 0
        self.registered = model is not None
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"register_model: expected an nn.Module, got {type(model).__name__}")
            named = list(model.named_parameters())
            for i, (name, p) in enumerate(named):
                self._by_id[id(p)] = (weakref.ref(p), len(named) - 1 - i, name)
                self._numels[name] = p.numel()

    def key(self, p: torch.Tensor) -> tuple[int, str]:
        entry = self._by_id.get(id(p))
        if entry is not None and entry[0]() is p:
            return entry[1], entry[2]
        if self.registered:
            raise ValueError(f"a bucket holds a parameter of shape {list(p.shape)} and dtype {p.dtype} that is not "
                             "in the model given to register_model")
        position, self._next = self._next, self._next + 1
        name = f"param{position}"
        self._by_id[id(p)] = (weakref.ref(p), position, name)
        self._numels[name] = p.numel()
        return position, name

    def numel(self, name: str) -> int | None:
        """Elements of the registered parameter ``name`` (None when it is unknown)."""
        return self._numels.get(name)


class Layout:
    """A bucket's gradients in canonical order: ``names[i]`` has ``numels[i]`` elements at ``offsets[i]`` of
    the bucket's buffer. ``identity``: the buffer already is in canonical order."""

    __slots__ = ("names", "numels", "offsets", "identity", "_refs")

    def __init__(self, params: list[torch.Tensor], keys: ParameterKeys):
        offsets, offset = [], 0
        for p in params:
            offsets.append(offset)
            offset += p.numel()
        keyed = [(keys.key(p), i) for i, p in enumerate(params)]
        order = [i for _, i in sorted(keyed)]
        self.names = tuple(keyed[i][0][1] for i in order)
        self.numels = tuple(params[i].numel() for i in order)
        self.offsets = tuple(offsets[i] for i in order)
        self.identity = order == list(range(len(params)))
        self._refs = tuple(weakref.ref(p) for p in params)

    def matches(self, params: list[torch.Tensor]) -> bool:
        return len(params) == len(self._refs) and all(r() is p for r, p in zip(self._refs, params))

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's slice of ``buffer``, in canonical order."""
        return [buffer[o:o + n] for o, n in zip(self.offsets, self.numels)]

    def split(self, canonical: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each parameter's slice of a tensor in canonical order (such as a flat residual)."""
        return torch.split(canonical, self.numels)

    def gather(self, buffer: torch.Tensor) -> torch.Tensor:
        """``buffer`` in canonical order: the buffer itself, or a permuted copy."""
        return buffer if self.identity else ops.bucket_flatten(self.views(buffer), torch.empty_like(buffer))

    def scatter(self, canonical: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """Writes ``canonical`` (in canonical order, any float dtype) into ``buffer`` in the bucket's order."""
        if canonical is buffer:
            return buffer
        if self.identity:
            return buffer.copy_(canonical)
        ops.bucket_unflatten(canonical.to(buffer.dtype), self.views(buffer))
        return buffer


def check_dense(bucket) -> None:
    """Raises if ``bucket`` holds a sparse gradient: DDP gives such a parameter (nn.Embedding(sparse=True))
    a bucket of its own whose buffer is the sparse gradient, which no hook of ours can reduce."""
    if bucket.buffer().layout != torch.strided:
        raise ValueError(f"bucket {bucket.index()} holds a sparse gradient ({bucket.buffer().layout}, e.g. from "
                         "nn.Embedding(sparse=True)); pyparallel's hooks reduce dense gradients only: build the "
                         "module with sparse=False, or leave this model on DDP's built-in reduction (no comm hook)")


def layout_of(bucket, keys: ParameterKeys, cache: dict) -> Layout:
    """The bucket's :class:`Layout`, cached by the identity of its parameters (DDP rebuilds buckets once)."""
    check_dense(bucket)
    params = bucket.parameters()
    ident = tuple(id(p) for p in params)
    layout = cache.get(ident)
    if layout is None or not layout.matches(params):
        if sum(p.numel() for p in params) != bucket.buffer().numel():
            raise ValueError(f"bucket {bucket.index()}: its parameters have {sum(p.numel() for p in params)} elements "
                             f"but its buffer has {bucket.buffer().numel()}")
        layout = cache[ident] = Layout(params, keys)
    return layout
