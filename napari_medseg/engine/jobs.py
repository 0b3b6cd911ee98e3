"""Small event dataclasses that long-running engine generators yield.

``engine.train`` and ``engine.predict`` are generators (DESIGN.md convention 2): they yield these
events and *return* their result. The widgets forward them to napari progress bars and plots, the
CLI to tqdm. Events are plain, immutable and cheap to create.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    """Progress of one stage of a long job.

    Attributes:
        stage: What is running, e.g. ``"tiles"``, ``"preprocess"``, ``"train"``, ``"validate"``.
        current: Units done so far (1-based after the first unit completes).
        total: Units in this stage; ``0`` when unknown.
        message: Optional human-readable detail.
    """

    stage: str
    current: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.current / self.total if self.total else 0.0


@dataclass(frozen=True)
class EpochEnd:
    """Metrics at the end of one training epoch.

    Attributes:
        epoch: Zero-based index of the epoch that just ended.
        epochs: Total number of epochs planned.
        train_loss: Mean training loss over the epoch.
        val_loss: Mean validation loss, or ``None`` without validation data.
        val_dice: Per-class validation Dice, keyed by label name.
        lr: Learning rate used during the epoch.
        elapsed_s: Wall time since training started.
    """

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float | None
    val_dice: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    elapsed_s: float = 0.0

    @property
    def mean_dice(self) -> float | None:
        vals = [v for v in self.val_dice.values() if v == v]  # drop NaN
        return sum(vals) / len(vals) if vals else None


@dataclass(frozen=True)
class Preview:
    """A preview prediction (e.g. of the slice the user looks at) during training."""

    epoch: int
    labels: Any  # np.ndarray of ints, the shape of the previewed region
    region: tuple = ()


@dataclass(frozen=True)
class Message:
    """Something the user should read: a fallback taken, a checkpoint saved, a warning."""

    text: str
    level: str = "info"  # "info" | "warning" | "error"


def collect(gen: Generator[Any, None, Any]) -> tuple[list[Any], Any]:
    """Drive an engine generator to its end: ``(every event it yielded, the value it returned)``.

    For scripts and tests that want the events too; ``training.run_to_completion`` keeps only the
    result.
    """
    events: list[Any] = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value
