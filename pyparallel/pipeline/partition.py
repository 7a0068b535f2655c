"""Splitting a stack of layers into contiguous pipeline stages."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def _as_layers(layers: nn.Sequential | Sequence[nn.Module]) -> list[nn.Module]:
    items = list(layers)
    for i, layer in enumerate(items):
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer {i} is a {type(layer).__name__}, expected an nn.Module "
                            "(pass an nn.Sequential or a list of modules)")
    if not items:
        raise ValueError("cannot split an empty model into pipeline stages")
    return items


def balance_by_cost(costs: Sequence[int], n_stages: int) -> list[int]:
    """Contiguous partition of ``costs`` into ``n_stages`` non-empty runs minimising the largest run's sum.

    A binary search finds the smallest cap C that a greedy left-to-right packing fits in ``n_stages`` runs;
    the packing then closes runs early only where the remaining items must each get a run of their own, which
    never raises a run's sum above C, so the result is optimal.

    Args:
        costs: non-negative cost of each item, in order.
        n_stages: number of runs, ``1 <= n_stages <= len(costs)``.

    Returns:
        The number of items in each run (sums to ``len(costs)``).

    Example:
        >>> balance_by_cost([4, 1, 1, 1, 1], 2)
        [1, 4]
    """
    if not 1 <= n_stages <= len(costs):
        raise ValueError(f"cannot split {len(costs)} layers into {n_stages} stages "
                         f"(each stage needs at least one layer)")
    if any(c < 0 for c in costs):
        raise ValueError(f"costs must be non-negative, got {list(costs)}")

    def runs_needed(cap: int) -> int:
        runs, total = 1, 0
        for c in costs:
            if total + c > cap:
                runs, total = runs + 1, 0
            total += c
        return runs

    lo, hi = max(costs), sum(costs)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs_needed(mid) <= n_stages else (mid + 1, hi)

    balance, size, total = [], 0, 0
    for i, c in enumerate(costs):
        runs_left_after_this = n_stages - len(balance) - 1
        if size and (total + c > lo or len(costs) - i == runs_left_after_this):
            balance.append(size)
            size, total = 0, 0
        size, total = size + 1, total + c
    balance.append(size)
    return balance


def balance_by_params(layers: nn.Sequential | Sequence[nn.Module], n_stages: int) -> list[int]:
    """Balance list that spreads the parameter count evenly over ``n_stages`` contiguous stages.

    Example:
        >>> balance_by_params(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), 2)
        [2, 1]
    """
    return balance_by_cost([sum(p.numel() for p in layer.parameters()) for layer in _as_layers(layers)], n_stages)


def split_stages(layers: nn.Sequential | Sequence[nn.Module], balance: Sequence[int] | None = None,
                 n_stages: int | None = None) -> list[nn.Sequential]:
    """Splits ``layers`` into contiguous stages (the layers are shared, not copied).

    Args:
        layers: an ``nn.Sequential`` or a list of modules, applied in order.
        balance: number of layers in each stage; must sum to the number of layers. If None, the split
            balances parameter counts over ``n_stages`` stages (:func:`balance_by_params`).
        n_stages: number of stages; required without ``balance``, checked against it otherwise.

    Returns:
        One ``nn.Sequential`` per stage.

    Example:
        >>> first, second = split_stages(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [2, 1])
    """
    items = _as_layers(layers)
    if balance is None:
        if n_stages is None:
            raise ValueError("pass a balance list or n_stages")
        balance = balance_by_params(items, n_stages)
    balance = list(balance)
    if n_stages is not None and len(balance) != n_stages:
        raise ValueError(f"balance {balance} has {len(balance)} stages but n_stages is {n_stages}")
    if not balance or any(not isinstance(b, int) or b < 1 for b in balance):
        raise ValueError(f"balance must be a non-empty list of positive layer counts, got {balance}")
    if sum(balance) != len(items):
        raise ValueError(f"balance {balance} covers {sum(balance)} layers but the model has {len(items)}")
    stages, start = [], 0
    for count in balance:
        stages.append(nn.Sequential(*items[start:start + count]))
        start += count
    return stages


def shared_across_stages(stages: Sequence[nn.Sequential], devices: Sequence | None = None) -> str | None:
    """Describes the first parameter that two stages share (tied weights, a layer listed twice), or None.

    Within a stage sharing is fine (autograd sums the uses); across stages it is not where each stage lives
    on its own rank (every copy would get only its own stage's part of the gradient and train apart) or on
    its own device (moving the later stage moves the parameter away from the earlier one). With ``devices``
    (one per stage), only sharing between stages on different devices counts. Parameters are named as in
    the unsplit ``nn.Sequential`` (layer index, then the layer's own name).

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> shared_across_stages(split_stages([lin, nn.Tanh(), lin], [2, 1]))
        'parameter 0.weight of stage 0 is also 2.weight of stage 1'
    """
    owner: dict[int, tuple[int, str]] = {}
    offset = 0
    for s, stage in enumerate(stages):
        for name, p in stage.named_parameters():  # duplicates within one stage are listed once
            name = name_in_model(name, offset)
            first = owner.setdefault(id(p), (s, name))
            if first[0] != s and (devices is None or devices[first[0]] != devices[s]):
                return f"parameter {first[1]} of stage {first[0]} is also {name} of stage {s}"
        offset += len(stage)
    return None


def name_in_model(name: str, offset: int) -> str:
    """The unsplit ``nn.Sequential``'s name of a stage's parameter or buffer ``name``, the stage starting at
    layer ``offset``.

    Example:
        >>> name_in_model("1.weight", 3)
        '4.weight'
    """
    index, _, rest = name.partition(".")
    return f"{offset + int(index)}.{rest}"
