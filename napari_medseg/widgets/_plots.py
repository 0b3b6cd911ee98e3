"""Live training curves: loss (train, validation) and validation Dice per class, per epoch.

**Drawn off the GUI thread.** A matplotlib draw of the two small axes (text, ticks, legends, the
constrained layout) took hundreds of milliseconds of napari's event loop per epoch while torch
trained beside it. Here the widget only keeps the numbers (:class:`Series`) and shows a finished
image; one daemon thread (:class:`_Renderer`) owns every matplotlib figure of the process, draws
them with the Agg backend and hands back a ``QImage``. matplotlib is imported in that thread, and
only once there is a point to draw (until then the widget paints a one-line placeholder), so
opening the Train widget does not wait for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import queue
import threading
import weakref

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtGui import QImage, QPainter
from qtpy.QtWidgets import QWidget

logger = logging.getLogger(__name__)

_DARK = "#262930"  # napari's dark theme background
_FG = "#d6d6d6"
_DPI = 90


class Series:
    """The points of one curve (what a matplotlib ``Line2D`` offered the tests: ``get_xdata``/``get_ydata``)."""

    def __init__(self, label: str):
        self.label = label
        self.xs: list[float] = []
        self.ys: list[float] = []

    def append(self, x: float, y) -> None:
        self.xs.append(float(x))
        self.ys.append(float("nan") if y is None or (isinstance(y, float) and math.isnan(y)) else float(y))

    def get_xdata(self) -> np.ndarray:
        return np.asarray(self.xs, dtype=float)

    def get_ydata(self) -> np.ndarray:
        return np.asarray(self.ys, dtype=float)


class TrainingCurves(QWidget):
    """Two small plots updated on every ``EpochEnd``; drawn in a background thread.

    Attributes:
        loss_line: Training loss per epoch (:class:`Series`).
        val_loss_line: Validation loss per epoch.
        dice_lines: Class name -> validation Dice per epoch.
        renders: Images shown so far (a new one after each epoch and each resize).
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(300)
        self.setAttribute(Qt.WA_OpaquePaintEvent)
        self.loss_line = Series("train")
        self.val_loss_line = Series("validation")
        self.dice_lines: dict[str, Series] = {}
        self.renders = 0
        self._image: QImage | None = None
        self._requested = 0  # generation of the newest request; an older image is still shown
        self._shown = 0
        _relay().register(self)
        self.destroyed.connect(lambda *_a, key=id(self): _renderer().drop(key))

    # ----------------------------------------------------------------------------- data
    def prepare(self) -> None:
        """Import matplotlib in the renderer's thread now, before a run draws its first curves."""
        _renderer().prepare()

    def clear(self) -> None:
        """Forget every point (a new run)."""
        self.loss_line = Series("train")
        self.val_loss_line = Series("validation")
        self.dice_lines = {}
        self._request()

    def add_epoch(self, event) -> None:
        """Append one epoch's metrics (an ``engine.events.EpochEnd``) and redraw (in the background)."""
        epoch = int(event.epoch) + 1
        self.loss_line.append(epoch, event.train_loss)
        self.val_loss_line.append(epoch, event.val_loss)
        for name, value in (event.val_dice or {}).items():
            self.dice_lines.setdefault(name, Series(str(name))).append(epoch, value)
        self._request()

    @property
    def up_to_date(self) -> bool:
        """Whether what is shown has every point and the widget's size (tests, screenshots)."""
        return self._shown == self._requested and (self._image is not None or not self.loss_line.xs)

    # ---------------------------------------------------------------------------- drawing
    def _snapshot(self) -> dict:
        return {
            "loss": (list(self.loss_line.xs), list(self.loss_line.ys)),
            "val_loss": (list(self.val_loss_line.xs), list(self.val_loss_line.ys)),
            "dice": {name: (list(s.xs), list(s.ys)) for name, s in self.dice_lines.items()},
        }

    def _request(self) -> None:
        width, height = self.width(), self.height()
        if width < 10 or height < 10:
            return  # not laid out yet: drawn on the first resize
        self._requested += 1
        if not self.loss_line.xs:  # nothing to plot: the placeholder, without matplotlib
            self._shown, self._image = self._requested, None
            self.update()
            return
        ratio = float(self.devicePixelRatioF()) if hasattr(self, "devicePixelRatioF") else 1.0
        _renderer().submit(id(self), self._requested, self._snapshot(), width, height, ratio)

    def _show_image(self, generation: int, image: QImage) -> None:
        if generation < self._shown:
            return  # an older request finished late
        self._shown = generation
        self._image = image
        self.renders += 1
        self.update()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt API
        super().resizeEvent(event)
        self._request()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        try:
            painter.fillRect(self.rect(), _qcolor(_DARK))
            if self._image is not None:  # until the next image arrives, the last one (scaled if resized)
                painter.drawImage(self.rect(), self._image)
            elif not self.loss_line.xs:
                painter.setPen(_qcolor(_FG))
                painter.drawText(self.rect(), Qt.AlignCenter | Qt.TextWordWrap,
                                 "Loss and validation Dice curves appear here after the first epoch.")
        finally:
            painter.end()


def _qcolor(name: str):
    from qtpy.QtGui import QColor

    return QColor(name)


# ------------------------------------------------------------------------------ the renderer
class _Relay(QObject):
    """Lives in the GUI thread; the renderer's results reach the widgets through its signal."""

    rendered = Signal(object, int, object)  # widget key, generation, QImage

    def __init__(self):
        super().__init__()
        self._widgets: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.rendered.connect(self._deliver)

    def register(self, widget: TrainingCurves) -> None:
        self._widgets[id(widget)] = widget

    def _deliver(self, key: int, generation: int, image) -> None:
        widget = self._widgets.get(key)
        if widget is None:
            return
        with contextlib.suppress(RuntimeError):  # the Qt widget was deleted meanwhile
            widget._show_image(generation, image)


@functools.cache
def _relay() -> _Relay:
    """The process-wide relay (created on first use, in the GUI thread)."""
    return _Relay()


_PREPARE = object()  # the renderer's "import matplotlib now" request


class _Renderer:
    """One daemon thread that owns all matplotlib figures: draws the newest request of each widget."""

    def __init__(self):
        self._pending: dict[int, tuple] = {}  # widget key -> newest request (older ones are skipped)
        self._lock = threading.Lock()
        self._wake: queue.SimpleQueue = queue.SimpleQueue()
        self._figures: dict[int, _Figure] = {}
        self.prepared = threading.Event()  # set once prepare() has run (done or failed)
        self._thread = threading.Thread(target=self._run, name="napari-medseg curves", daemon=True)
        self._thread.start()

    def submit(self, key: int, generation: int, snapshot: dict, width: int, height: int, ratio: float) -> None:
        with self._lock:
            self._pending[key] = (generation, snapshot, width, height, ratio)
        self._wake.put(key)

    def prepare(self) -> None:
        """Import matplotlib and draw one throwaway figure in this thread now (fonts load on the
        first draw), so that the first curves of a run neither wait for it nor make the objects that
        set off a full garbage collection during training; then freeze what is alive again."""
        self._wake.put(_PREPARE)

    def _prepare(self) -> None:
        from ._common import frozen_imports
        from ._quiet_import import collector_paused

        with collector_paused():
            # epochs count from 1, and a widget-sized canvas: a real draw, without matplotlib's warnings
            curve = ([1, 2], [1.0, 0.5])
            _Figure().render({"loss": curve, "val_loss": curve, "dice": {"a": curve}}, 400, 320, 1.0)
        frozen_imports().refreeze()

    def drop(self, key: int) -> None:
        with self._lock:
            self._pending[key] = None
        self._wake.put(key)

    def _run(self) -> None:
        while True:
            key = self._wake.get()
            if key is _PREPARE:
                try:
                    self._prepare()
                except Exception:  # noqa: BLE001 - only a head start: the first draw imports it
                    logger.debug("could not prepare matplotlib", exc_info=True)
                self.prepared.set()
                continue
            with self._lock:
                if key not in self._pending:
                    continue  # already drawn with a newer request
                job = self._pending.pop(key)
            if job is None:
                self._figures.pop(key, None)
                continue
            try:
                image = self._draw(key, *job)
            except Exception:  # noqa: BLE001 - a plot must never take the widget down
                logger.warning("Could not draw the training curves", exc_info=True)
                continue
            with contextlib.suppress(RuntimeError):  # the relay was deleted (interpreter exit)
                _relay().rendered.emit(key, job[0], image)  # made by the first widget

    def _draw(self, key: int, generation: int, snapshot: dict, width: int, height: int, ratio: float) -> QImage:
        figure = self._figures.get(key)
        if figure is None:
            figure = self._figures[key] = _Figure()
        return figure.render(snapshot, width, height, ratio)


@functools.cache
def _renderer() -> _Renderer:
    """The process-wide renderer thread (started on first use)."""
    return _Renderer()


class _Figure:
    """The matplotlib figure of one widget (used only in the renderer's thread)."""

    def __init__(self):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.figure = Figure(figsize=(4.0, 3.2), dpi=_DPI, facecolor=_DARK, layout="constrained")
        self.canvas = FigureCanvasAgg(self.figure)
        self.ax_loss = self.figure.add_subplot(2, 1, 1)
        self.ax_dice = self.figure.add_subplot(2, 1, 2, sharex=self.ax_loss)
        for ax, title in ((self.ax_loss, "loss"), (self.ax_dice, "validation Dice")):
            ax.set_facecolor(_DARK)
            ax.set_ylabel(title, color=_FG, fontsize=8)
            ax.tick_params(colors=_FG, labelsize=7)
            ax.grid(True, alpha=0.2)
            for spine in ax.spines.values():
                spine.set_color("#5a5f6b")
        self.ax_dice.set_xlabel("epoch", color=_FG, fontsize=8)
        self.ax_dice.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.ax_dice.set_ylim(0, 1)
        (self.loss_line,) = self.ax_loss.plot([], [], "-o", ms=3, color="#4fc3f7", label="train")
        (self.val_loss_line,) = self.ax_loss.plot([], [], "-o", ms=3, color="#ffb74d", label="validation")
        self.ax_loss.legend(fontsize=7, facecolor=_DARK, labelcolor=_FG, edgecolor="#5a5f6b")
        self.dice_lines: dict = {}

    def render(self, snapshot: dict, width: int, height: int, ratio: float) -> QImage:
        self.loss_line.set_data(*snapshot["loss"])
        self.val_loss_line.set_data(*snapshot["val_loss"])
        dice = snapshot["dice"]
        if set(dice) != set(self.dice_lines):  # a new run, or a new class
            for line in self.dice_lines.values():
                line.remove()
            self.dice_lines = {}
            for name in dice:
                (self.dice_lines[name],) = self.ax_dice.plot([], [], "-o", ms=3, label=str(name))
            legend = self.ax_dice.get_legend()
            if legend is not None:
                legend.remove()
            if dice:
                self.ax_dice.legend(fontsize=7, facecolor=_DARK, labelcolor=_FG, edgecolor="#5a5f6b",
                                    loc="lower right")
        for name, (xs, ys) in dice.items():
            self.dice_lines[name].set_data(xs, ys)
        epochs = snapshot["loss"][0]
        self.ax_loss.relim()
        self.ax_loss.autoscale_view()
        if epochs:
            self.ax_dice.set_xlim(0.5, max(epochs) + 0.5)
        self.figure.set_dpi(_DPI * ratio)
        self.figure.set_size_inches(width / _DPI, height / _DPI)
        self.canvas.draw()
        buffer = self.canvas.buffer_rgba()
        h, w = buffer.shape[:2]
        image = QImage(bytes(buffer), w, h, 4 * w, QImage.Format_RGBA8888).copy()  # owns its pixels
        image.setDevicePixelRatio(ratio)
        return image
