"""Live training curves: loss (train, validation) and validation Dice per class, per epoch."""

from __future__ import annotations

import math

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_DARK = "#262930"  # napari's dark theme background
_FG = "#d6d6d6"


class TrainingCurves(FigureCanvasQTAgg):
    """Two small axes updated on every ``EpochEnd``.

    Attributes:
        loss_line: Training loss per epoch.
        val_loss_line: Validation loss per epoch.
        dice_lines: Class name -> validation Dice line.
    """

    def __init__(self, parent=None):
        self.figure = Figure(figsize=(4.0, 3.2), dpi=90, facecolor=_DARK, layout="constrained")
        super().__init__(self.figure)
        self.setParent(parent)
        self.setMinimumHeight(300)
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
        self._epochs: list[int] = []

    def clear(self) -> None:
        """Forget every point (a new run)."""
        self._epochs = []
        for line in (self.loss_line, self.val_loss_line, *self.dice_lines.values()):
            line.set_data([], [])
        for line in self.dice_lines.values():
            line.remove()
        self.dice_lines = {}
        if self.ax_dice.get_legend():
            self.ax_dice.get_legend().remove()
        self.draw_idle()

    def add_epoch(self, event) -> None:
        """Append one epoch's metrics (an ``engine.events.EpochEnd``) and redraw."""
        epoch = int(event.epoch) + 1
        self._epochs.append(epoch)
        _append(self.loss_line, epoch, event.train_loss)
        _append(self.val_loss_line, epoch, event.val_loss)
        new_class = False
        for name, value in (event.val_dice or {}).items():
            line = self.dice_lines.get(name)
            if line is None:
                (line,) = self.ax_dice.plot([], [], "-o", ms=3, label=str(name))
                self.dice_lines[name] = line
                new_class = True
            _append(line, epoch, value)
        if new_class:
            self.ax_dice.legend(fontsize=7, facecolor=_DARK, labelcolor=_FG, edgecolor="#5a5f6b",
                                loc="lower right")
        self.ax_loss.relim()
        self.ax_loss.autoscale_view()
        self.ax_dice.set_xlim(0.5, max(self._epochs) + 0.5)
        self.draw_idle()


def _append(line, x: float, y) -> None:
    xs, ys = list(line.get_xdata()), list(line.get_ydata())
    xs.append(x)
    ys.append(float("nan") if y is None or (isinstance(y, float) and math.isnan(y)) else float(y))
    line.set_data(xs, ys)
