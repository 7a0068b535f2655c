"""The order in which one pipeline stage runs forwards and backwards of its micro-batches.

- GPipe: all forwards, then all backwards. Stage ``s`` keeps the activations of all ``m`` micro-batches.
- 1F1B (PipeDream-Flush): ``p - s - 1`` warm-up forwards, then alternately one forward and one backward,
  then the remaining backwards. Stage ``s`` keeps at most ``p - s`` micro-batches' activations, the
  bubble is the same as GPipe's: ``(p - 1) / (m + p - 1)`` of the step.

Both run backwards in micro-batch order, so the point-to-point messages between two stages arrive in
the order each side expects.
"""

from __future__ import annotations

from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b")


class Action(NamedTuple):
    forward: bool  # False: backward
    microbatch: int


def stage_actions(schedule: str, n_stages: int, stage: int, n_microbatches: int) -> list[Action]:
    """One stage's actions in execution order.

    Args:
        schedule: ``"gpipe"`` or ``"1f1b"``.
        n_stages: number of pipeline stages ``p``.
        stage: this stage's index in ``[0, p)``.
        n_microbatches: number of micro-batches ``m`` (any ``m >= 1``; 1F1B with ``m < p`` has no steady phase).

    Returns:
        ``2 * m`` actions, each micro-batch's forward before its backward.

    Example:
        >>> [("F" if a.forward else "B") + str(a.microbatch) for a in stage_actions("1f1b", 2, 0, 3)]
        ['F0', 'F1', 'B0', 'F2', 'B1', 'B2']
    """
    check_schedule(schedule)
    m = n_microbatches
    forwards = [Action(True, i) for i in range(m)]
    backwards = [Action(False, i) for i in range(m)]
    if schedule == "gpipe":
        return forwards + backwards
    warmup = min(n_stages - stage - 1, m)
    steady = [a for i in range(warmup, m) for a in (forwards[i], backwards[i - warmup])]
    return forwards[:warmup] + steady + backwards[m - warmup:]


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule
