"""Small event dataclasses that long-running engine generators yield.

``engine.train`` and ``engine.predict`` are generators (DESIGN.md convention 2): they yield these
events and *return* their result. The widgets forward them to napari progress bars and plots, the
CLI to tqdm. Events are plain, immutable and cheap to create.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
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
        validation: What ``val_dice`` is measured on: ``"held-out cases"``, ``"held-out slices"``,
            ``"training cases"`` (fitting, not accuracy) or ``"none"``.
    """

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float | None
    val_dice: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    elapsed_s: float = 0.0
    validation: str = ""

    @property
    def mean_dice(self) -> float | None:
        vals = [v for v in self.val_dice.values() if v == v]  # drop NaN
        return sum(vals) / len(vals) if vals else None


@dataclass(frozen=True)
class Message:
    """Something the user should read: a fallback taken, a checkpoint saved, a warning."""

    text: str
    level: str = "info"  # "info" | "warning" | "error"


def drive(gen: Generator[Any, None, Any], on_event: Callable[[Any], None] | None = None) -> Any:
    """Drive an engine generator to its end and return the value it returned.

    The one driver of the package: the CLI's progress bar, the widgets' workers, the public API
    and the tests all run engine generators through it (or through :func:`relay`). If
    ``on_event`` raises (a cancelled widget, Ctrl-C in the CLI), the generator is closed first, so
    it stops at its current ``yield`` and runs its own clean-up (e.g. training saves a resumable
    checkpoint) before the exception propagates.

    Args:
        gen: An engine generator (``predict``, ``train``, ``find_best`` ...).
        on_event: Called with every event the generator yields.
    """
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            if on_event is not None:
                on_event(event)
    finally:
        gen.close()


def collect(gen: Generator[Any, None, Any]) -> tuple[list[Any], Any]:
    """Drive an engine generator to its end: ``(every event it yielded, the value it returned)``."""
    events: list[Any] = []
    result = drive(gen, events.append)
    return events, result


class Cancelled(Exception):
    """A job was asked to stop (:func:`relay`'s ``should_stop``, a signal under
    :func:`stop_on_signals`); the generator has been closed, so it ran its own clean-up."""


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[threading.Event]:
    """Turn SIGINT (Ctrl-C) and SIGTERM (``kill``, a job scheduler) into a request to stop.

    Inside the block, the first such signal only sets the returned event; the job's event callback
    checks it and raises :class:`Cancelled`, so :func:`drive` closes the generator at its next
    ``yield`` (within one training iteration or one tile): training saves a resumable checkpoint.
    A second Ctrl-C interrupts at once. Outside the main thread nothing is installed.
    """
    stop = threading.Event()
    stop.signum = None  # which signal asked
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
        stop.set()

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def relay(
    gen: Generator[Any, None, Any],
    transform: Callable[[Any], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[Any, None, Any]:
    """Re-yield ``gen``'s events (through ``transform`` when given) and return its value.

    Unlike a bare ``yield from``, the inner generator is closed when the outer one is closed or
    fails, so a cancelled job stops all the way down. With ``should_stop``, it is asked before
    each step of ``gen``; when it answers true, ``gen`` is closed (it stops at its current
    ``yield``, running its own clean-up) and :class:`Cancelled` is raised. An error raised by
    that clean-up propagates instead, with the ``Cancelled`` as its context.
    """
    try:
        while True:
            if should_stop is not None and should_stop():
                raise Cancelled()
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            yield event if transform is None else transform(event)
    finally:
        gen.close()
