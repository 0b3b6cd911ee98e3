"""Fill between slices: paint every few slices of a Labels layer, interpolate the rest (no model).

The widget calls :func:`napari_medseg.engine.annotation.fill_between_slices` on the chosen Labels
layer along the axis the user paints across (by default the viewer's slider axis at the moment of
the click) and puts the result in a new Labels layer ``"<name> filled"`` with the source layer's
scale, translate, rotate, shear, affine, metadata and colours, so that it overlays the painting.
Pressing the button again replaces that layer's data. The widget is self-contained (layer picker,
axis, optional slice list, button, status) so that other widgets can embed it.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ._common import call_in_thread, show_status, status_label
from ._layers import LayerCombo

logger = logging.getLogger(__name__)

#: ``metadata`` key of a layer this widget made: ``{"source", "axis", "slices"}``.
FILLED_KEY = "medseg_filled_from"
AXIS_NAMES = ("z", "y", "x")


def _axis_name(axis: int, ndim: int) -> str:
    offset = ndim - len(AXIS_NAMES)
    return AXIS_NAMES[axis - offset] if axis >= offset else str(axis)


class _FillJob:
    """One fill: the labels, the axis and the slices; called (in any thread) it returns the result."""

    def __init__(self, layer, data: np.ndarray, axis: int, given: list[int] | None) -> None:
        self.layer, self.data, self.axis, self.given = layer, data, axis, given
        self.used: list[int] = []
        self.seconds = 0.0

    def __call__(self) -> np.ndarray:
        # imported here: it imports scipy (seconds on a first open of the Train widget, which holds this one)
        from napari_medseg.engine.annotation import fill_between_slices, painted_slices

        start = time.perf_counter()
        self.used = painted_slices(self.data, self.axis) if self.given is None else sorted(set(self.given))
        if len(self.used) < 2:
            raise ValueError(
                f"paint at least two slices along axis {self.axis} (found {len(self.used)}: {self.used}); "
                "the slices between them are filled."
            )
        result = fill_between_slices(self.data, axis=self.axis, slices=self.given)
        self.seconds = time.perf_counter() - start
        return result


class FillBetweenSlicesWidget(QWidget):
    """A Labels layer picker, the painting axis and a "Fill between slices" button.

    Args:
        napari_viewer: The viewer whose Labels layers are filled.
        parent: Optional Qt parent (when embedded in another widget).

    Signals:
        filled: Emitted with the filled Labels layer after each successful fill.
    """

    filled = Signal(object)

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Labels  # napari is loaded by then; deferred to keep imports light

        self.viewer = napari_viewer
        self.labels = LayerCombo(self.viewer, Labels)
        self.labels.setToolTip("The Labels layer painted on some slices")
        self.axis = QComboBox()
        self.axis.setToolTip(
            "The axis the slices are taken along: by default the slider axis of the view you paint in"
        )
        self.slices = QLineEdit()
        self.slices.setPlaceholderText("auto: slices holding any label")
        self.slices.setToolTip(
            "Painted slice indices, e.g. 10,20,30. Leave empty to use every slice holding a label; "
            "list a slice you left as background to make the objects end there."
        )
        self.fill_button = QPushButton("Fill between slices")
        self.fill_button.setToolTip(
            "Interpolate the slices between painted ones (shape-based, no model) into a new layer"
        )
        self.status = status_label()

        form = QFormLayout()
        form.addRow("Labels:", self.labels)
        form.addRow("Axis:", self.axis)
        form.addRow("Slices:", self.slices)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.fill_button)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.fill_button.clicked.connect(self.fill_in_background)
        self.labels.currentIndexChanged.connect(self._refresh_axes)
        self.viewer.dims.events.order.connect(self._refresh_axes)
        self.viewer.dims.events.ndisplay.connect(self._refresh_axes)
        self._refresh_axes()

    # ------------------------------------------------------------------------------ axis
    def view_axis(self, layer=None) -> int:
        """The layer axis under the viewer's slider (the axis painted across); 0 in a 3D view."""
        layer = layer if layer is not None else self.labels.layer()
        ndim = layer.ndim if layer is not None else self.viewer.dims.ndim
        offset = self.viewer.dims.ndim - ndim
        hidden = [a - offset for a in self.viewer.dims.not_displayed if a - offset >= 0]
        return hidden[-1] if hidden else 0

    def _refresh_axes(self, *_args) -> None:
        layer = self.labels.layer()
        ndim = layer.ndim if layer is not None else 3
        current = self.axis.currentData()
        self.axis.blockSignals(True)
        self.axis.clear()
        view = self.view_axis(layer)
        self.axis.addItem(f"current view (axis {view}, {_axis_name(view, ndim)})", None)
        for a in range(ndim):
            self.axis.addItem(f"axis {a} ({_axis_name(a, ndim)})", a)
        idx = self.axis.findData(current) if current is not None else 0
        self.axis.setCurrentIndex(max(idx, 0))
        self.axis.blockSignals(False)

    def selected_axis(self, layer=None) -> int:
        """The chosen axis; "current view" is resolved now (the slider axis at this moment)."""
        chosen = self.axis.currentData()
        return self.view_axis(layer) if chosen is None else int(chosen)

    def _slice_list(self) -> list[int] | None:
        text = self.slices.text().strip()
        if not text:
            return None
        try:
            return [int(v) for v in text.replace(" ", "").replace(";", ",").split(",") if v]
        except ValueError:
            raise ValueError(f"Slices must be indices like 10,20,30, not {text!r}.") from None

    # ------------------------------------------------------------------------------ fill
    def fill(self, *_args):
        """Fill the chosen layer here and now; return the filled Labels layer (``None`` when refused).

        The button runs the same in the background (:meth:`fill_in_background`).
        """
        job = self._job()
        if job is None:
            return None
        try:
            return self._finish(job, job())
        except ValueError as err:
            self._failed(job.layer, err)
            return None

    def fill_in_background(self, *_args) -> None:
        """The button: the painted slices are found and interpolated in a thread (a head-sized
        layer takes a second or more), then the result layer is added in the GUI thread."""
        job = self._job()
        if job is None:
            return
        self.fill_button.setEnabled(False)
        show_status(self.status, f"Filling between the painted slices of {job.layer.name!r}...")

        def then(result, error) -> None:
            self.fill_button.setEnabled(True)
            if error is not None:
                self._failed(job.layer, error)
                return
            try:
                self._finish(job, result)
            except ValueError as err:
                self._failed(job.layer, err)

        call_in_thread(job, then)

    def _job(self) -> _FillJob | None:
        """What a click fills, read in the GUI thread (the layer's data is not copied)."""
        layer = self.labels.layer()
        if layer is None:
            show_status(self.status, "Add or paint a Labels layer first.", error=True)
            return None
        if getattr(layer, "multiscale", False):
            show_status(self.status, f"{layer.name!r} is multiscale; fill needs a single-scale layer.", error=True)
            return None
        try:
            return _FillJob(layer, np.asarray(layer.data), self.selected_axis(layer), self._slice_list())
        except ValueError as err:
            self._failed(layer, err)
            return None

    def _failed(self, layer, err: Exception) -> None:
        show_status(self.status, f"Could not fill {layer.name!r}: {err}", error=True)

    def _finish(self, job: _FillJob, result: np.ndarray):
        used = job.used
        target = self._put_result(job.layer, result, {"source": job.layer.name, "axis": job.axis, "slices": used})
        filled = sum(stop - start - 1 for start, stop in zip(used[:-1], used[1:]))
        show_status(
            self.status,
            f"Filled {filled} slice(s) between {len(used)} painted slices (axis {job.axis}: {used[0]}..{used[-1]}) "
            f"into {target.name!r} in {job.seconds:.2f} s.",
        )
        self.filled.emit(target)
        return target

    def _put_result(self, source, result: np.ndarray, info: dict):
        """Replace the data of this source's earlier "filled" layer, or add a new overlaying layer."""
        name = f"{source.name} filled"
        if name in self.viewer.layers:
            old = self.viewer.layers[name]
            made_here = (old.metadata or {}).get(FILLED_KEY, {}).get("source") == source.name
            if made_here and np.shape(old.data) == result.shape and old.ndim == source.ndim:
                old.data = result
                old.metadata = {**old.metadata, FILLED_KEY: info}
                return old
        metadata = copy.deepcopy(dict(source.metadata or {}))
        metadata[FILLED_KEY] = info
        layer = self.viewer.add_labels(
            result, name=name, scale=source.scale, translate=source.translate, rotate=source.rotate,
            shear=source.shear, affine=source.affine.affine_matrix, metadata=metadata,
            opacity=source.opacity, blending=source.blending,
        )
        try:  # the source's colours and label names (a convenience: never fail the fill for them)
            layer.colormap = source.colormap
            if len(source.features):
                layer.features = source.features.copy()
        except Exception:  # noqa: BLE001
            logger.debug("could not copy the colours or features of %r", source.name, exc_info=True)
        return layer
