"""The Display widget: the view's orientation (radiological or neurological) and window presets.

Everything here changes the *view*: ``viewer.dims`` and the camera for the orientation and a
layer's ``contrast_limits`` for the window. Layer data and transforms (the geometry that saving
relies on) are never touched. The logic lives in Qt-free modules: the views in
:mod:`napari_medseg._launcher` (:func:`~napari_medseg._launcher.view_spec`,
:func:`~napari_medseg._launcher.direction_letters`), the windows in :mod:`napari_medseg._reader`
(:data:`~napari_medseg._reader.WINDOW_PRESETS`, :func:`~napari_medseg._reader.percentile_limits`).
"""

from __future__ import annotations

import logging

from qtpy.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from napari_medseg._launcher import (
    CONVENTIONS,
    PLANES,
    apply_view,
    current_letters,
    current_plane,
    follow_viewer,
    show_standard_view,
    view_spec,
    viewer_camera,
    viewer_convention,
)
from napari_medseg._reader import (
    PERCENTILE_WINDOW,
    WINDOW_PRESETS,
    percentile_limits,
    window_limits,
)

from ._common import MedsegPanel, scroll_area, show_status, status_label
from ._layers import LayerCombo

logger = logging.getLogger(__name__)

CONVENTION_TEXT = {
    "radiological": "Radiological: patient's left on screen right",
    "neurological": "Neurological: patient's left on screen left",
}


def preset_label(name: str) -> str:
    """Button text of a window preset, e.g. ``"Soft tissue 400/40"`` (width/level; two fit a row)."""
    if name == PERCENTILE_WINDOW:
        return "MR 1-99 %"
    width, level = WINDOW_PRESETS[name]
    return f"{name.removeprefix('CT ').capitalize()} {width:g}/{level:g}"


def preset_tooltip(name: str) -> str:
    if name == PERCENTILE_WINDOW:
        return "The 1st to 99th percentile of the layer's values (what an MR opens with)"
    width, level = WINDOW_PRESETS[name]
    lo, hi = window_limits(width, level)
    return f"{name}: width {width:g} HU, level {level:g} HU ({lo:g} to {hi:g} HU)"


class DisplayWidget(MedsegPanel, QWidget):
    """Orientation of the 2D view and intensity window presets of an image layer.

    Args:
        napari_viewer: The viewer (npe2 passes it).
    """

    def __init__(self, napari_viewer):
        super().__init__()
        from napari.layers import Image

        self.viewer = napari_viewer
        follow_viewer(napari_viewer)
        # --- orientation
        self.plane = QComboBox()
        for plane in PLANES:
            self.plane.addItem(plane.capitalize(), plane)
        self.plane.setToolTip("The slice plane; the standard view of a volume is its acquisition plane")
        self.conventions = QButtonGroup(self)
        self.convention_buttons: dict[str, QRadioButton] = {}
        for name in CONVENTIONS:
            button = QRadioButton(CONVENTION_TEXT[name])
            self.conventions.addButton(button)
            self.convention_buttons[name] = button
        self.convention_buttons[viewer_convention(napari_viewer)].setChecked(True)
        self.standard_button = QPushButton("Standard view of the volume")
        self.standard_button.setToolTip("The acquisition plane of the first napari-medseg layer, in this convention")
        self.directions = status_label()
        # --- window
        self.layer = LayerCombo(napari_viewer, Image)
        self.preset_buttons: dict[str, QPushButton] = {}
        for name in [*WINDOW_PRESETS, PERCENTILE_WINDOW]:
            button = QPushButton(preset_label(name))
            button.setToolTip(preset_tooltip(name))
            button.clicked.connect(lambda _=False, n=name: self.apply_window(n))
            self.preset_buttons[name] = button
        self.window_info = status_label()

        self._build_layout()
        self.plane.currentIndexChanged.connect(self._on_plane)
        self.conventions.buttonClicked.connect(self._on_convention)
        self.standard_button.clicked.connect(self.standard_view)
        self.layer.currentIndexChanged.connect(self._show_window)
        emitters = (napari_viewer.dims.events.order, napari_viewer.dims.events.ndisplay,
                    viewer_camera(napari_viewer).events.orientation, napari_viewer.layers.events.inserted,
                    napari_viewer.layers.events.removed)
        callback = self._show_view
        for emitter in emitters:
            emitter.connect(callback)
        # a closed dock deletes the Qt widget: stop the viewer's events from reaching it
        self.destroyed.connect(lambda *_: [e.disconnect(callback) for e in emitters])
        self._show_view()
        self._show_window()

    def _build_layout(self) -> None:
        box_view = QGroupBox("Orientation")
        form = QFormLayout(box_view)
        form.addRow("Plane:", self.plane)
        for button in self.convention_buttons.values():
            form.addRow(button)
        form.addRow(self.standard_button)
        form.addRow(self.directions)

        box_window = QGroupBox("Window (width/level, HU)")
        grid = QGridLayout(box_window)
        row = QHBoxLayout()
        row.addWidget(self.layer, 1)
        grid.addLayout(row, 0, 0, 1, 2)
        for i, button in enumerate(self.preset_buttons.values()):
            grid.addWidget(button, 1 + i // 2, i % 2)
        grid.addWidget(self.window_info, 2 + len(self.preset_buttons) // 2, 0, 1, 2)

        inner = QWidget()
        layout = QVBoxLayout(inner)
        layout.addWidget(box_view)
        layout.addWidget(box_window)
        layout.addStretch(1)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll_area(inner))
        self.setMinimumWidth(300)

    # ------------------------------------------------------------------------ orientation
    def convention(self) -> str:
        return next(name for name, b in self.convention_buttons.items() if b.isChecked())

    def set_convention(self, name: str) -> None:
        """Switch between ``"radiological"`` and ``"neurological"`` in the current plane."""
        self.convention_buttons[name].setChecked(True)
        self._on_convention()

    def set_plane(self, plane: str) -> None:
        self.plane.setCurrentIndex(self.plane.findData(plane))

    def _on_plane(self, *_args) -> None:
        apply_view(self.viewer, view_spec(self.plane.currentData(), self.convention()))

    def _on_convention(self, *_args) -> None:
        plane = current_plane(self.viewer) or self.plane.currentData()
        apply_view(self.viewer, view_spec(plane, self.convention()))

    def standard_view(self) -> None:
        """The acquisition plane of the first napari-medseg layer, in the chosen convention."""
        show_standard_view(self.viewer, convention=self.convention())

    def _show_view(self, *_args) -> None:
        plane = current_plane(self.viewer)
        if plane is not None and self.plane.currentData() != plane:
            self.plane.blockSignals(True)
            self.plane.setCurrentIndex(self.plane.findData(plane))
            self.plane.blockSignals(False)
        letters = current_letters(self.viewer)
        if letters is None:
            self.directions.setText("Directions are shown for napari-medseg volumes in a 2D view.")
        else:
            self.directions.setText(
                f"Screen: top {letters['top']}, bottom {letters['bottom']}, "
                f"left {letters['left']}, right {letters['right']}"
            )

    # ----------------------------------------------------------------------------- window
    def apply_window(self, name: str) -> tuple[float, float] | None:
        """Give the chosen image layer the window ``name`` (a preset, or the percentile window)."""
        layer = self.layer.layer()
        if layer is None:
            show_status(self.window_info, "No image layer to window.", error=True)
            return None
        limits = percentile_limits(layer.data) if name == PERCENTILE_WINDOW else window_limits(*WINDOW_PRESETS[name])
        if limits is None:
            show_status(self.window_info, f"{layer.name!r} has a single value: no window to set.", error=True)
            return None
        layer.contrast_limits = limits
        layer.metadata["medseg_window"] = name
        self._show_window()
        return limits

    def _show_window(self, *_args) -> None:
        layer = self.layer.layer()
        if layer is None:
            self.window_info.setText("")
            return
        lo, hi = (float(v) for v in layer.contrast_limits)
        name = layer.metadata.get("medseg_window", "custom")
        self.window_info.setText(f"{layer.name}: {name}, W{hi - lo:g} / L{(hi + lo) / 2:g}")
        self.window_info.setStyleSheet("")
