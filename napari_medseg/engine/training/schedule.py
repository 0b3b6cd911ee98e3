"""Time budgets and the learning-rate schedules that fit them.

"Train for N minutes" (``TrainConfig.minutes``; CLI ``--minutes``; the Train widget's budget) is
what a user at a laptop can decide; epochs x iterations is not, because an iteration takes 0.05 s
on one machine and 15 s on another. With a budget, the run stops when the time is spent (or after
``epochs`` epochs, whichever comes first), and the learning rate follows the *time* spent instead
of the epoch: a linear warm-up over the first ``warmup`` fraction of the budget (fine-tuning: the
new head and re-planned layers start from random weights, and a full learning rate at once tears
the pretrained weights apart), then nnU-Net's poly decay to 0 at the end of the budget, so that a
5-minute run anneals as fully as a 5-day one.
"""

from __future__ import annotations

import time


class TimeBudget:
    """Wall-clock budget of a training run.

    Args:
        minutes: The budget (> 0).
    """

    def __init__(self, minutes: float) -> None:
        if not minutes or minutes <= 0:
            raise ValueError(f"A time budget must be positive, got {minutes} minutes")
        self.seconds = float(minutes) * 60.0
        self._start: float | None = None

    def start(self) -> None:
        """Start the clock (again: a resumed run gets a whole new budget)."""
        self._start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start` (0 before)."""
        return 0.0 if self._start is None else time.perf_counter() - self._start

    @property
    def fraction(self) -> float:
        """Share of the budget spent, in ``[0, 1]``."""
        return min(1.0, self.elapsed / self.seconds)

    @property
    def exhausted(self) -> bool:
        return self.elapsed >= self.seconds

    def describe(self) -> str:
        """``"1:05 of 5:00"`` (minutes:seconds)."""
        return f"{_mmss(self.elapsed)} of {_mmss(self.seconds)}"


def _mmss(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}"


def scheduled_lr(base_lr: float, schedule: str, progress: float, warmup: float = 0.0) -> float:
    """The learning rate at ``progress`` (0 to 1) of a run.

    Args:
        base_lr: The peak learning rate.
        schedule: ``"poly"`` (nnU-Net: ``(1 - progress) ** 0.9``) or ``"constant"``.
        progress: Share of the run done (of the epochs, or of the time budget).
        warmup: Share of the run with a linear warm-up from ``0.1 * base_lr``.

    Raises:
        ValueError: an unknown schedule.
    """
    progress = min(max(float(progress), 0.0), 1.0)
    if schedule == "poly":
        lr = base_lr * (1.0 - progress) ** 0.9
    elif schedule == "constant":
        lr = base_lr
    else:
        raise ValueError(f"No time-based form of the learning-rate schedule {schedule!r}; use 'poly' or 'constant'.")
    if warmup > 0 and progress < warmup:
        lr *= 0.1 + 0.9 * progress / warmup
    return lr


__all__ = ["TimeBudget", "scheduled_lr"]
