"""Layer pickers: image channels and labels layers, resolved to what the engine takes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QToolButton, QVBoxLayout, QWidget

from napari_medseg.errors import MedsegError

# napari_medseg.io is imported where it is used: importing any of its modules imports the package,
# which imports nibabel and pydicom (about half a second), and every widget imports this module.


class LayerCombo(QComboBox):
    """The viewer's layers of one type, kept in sync with the layer list."""

    def __init__(self, viewer, layer_type: type, parent: QWidget | None = None, optional: bool = False):
        super().__init__(parent)
        self._viewer = viewer
        self._type = layer_type
        self._optional = optional
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(14)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed,
                   viewer.layers.events.moved):
            ev.connect(self.refresh)
        viewer.layers.events.inserted.connect(self._watch_name)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def _watch_name(self, event) -> None:
        event.value.events.name.connect(self.refresh)

    def refresh(self, *_args) -> None:
        """Re-list the layers; ``currentIndexChanged`` is emitted only when the chosen layer (or its
        name) changed, so that a layer added elsewhere does not make every listener redo its work."""
        current = self.layer()
        before = (current, self.currentText())
        self.blockSignals(True)
        self.clear()
        if self._optional:
            self.addItem("(none)", None)
        for layer in self._viewer.layers:
            if isinstance(layer, self._type):
                self.addItem(layer.name, layer)
        idx = self.findData(current) if current is not None else -1
        if idx < 0 and not self._optional and self.count():
            idx = self.count() - 1  # the newest layer
        self.setCurrentIndex(max(idx, 0))
        self.blockSignals(False)
        after = (self.layer(), self.currentText())
        if after[0] is not before[0] or after[1] != before[1]:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self):
        return self.currentData() if self.count() else None

    def set_layer(self, layer) -> None:
        idx = self.findData(layer)
        if idx >= 0:
            self.setCurrentIndex(idx)


class ChannelPicker(QWidget):
    """One image layer per channel ("+" adds a channel), or one stacked ``(C, z, y, x)`` layer.

    napari opens a multi-channel scan as one layer per channel: pick them here in channel order.
    A 4-D image layer counts as channels-first ``(C, z, y, x)``.
    """

    changed = Signal()

    def __init__(self, viewer, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Image

        self._viewer = viewer
        self._image_type = Image
        self._rows: list[LayerCombo] = []
        self._box = QVBoxLayout()
        self._box.setContentsMargins(0, 0, 0, 0)
        self._box.setSpacing(2)
        self.add_button = QToolButton()
        self.add_button.setText("+")
        self.add_button.setToolTip("Add a channel: pick one image layer per channel, in the model's order")
        self.remove_button = QToolButton()
        self.remove_button.setText("−")
        self.remove_button.setToolTip("Remove the last channel")
        buttons = QHBoxLayout()
        buttons.setContentsMargins(0, 0, 0, 0)
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch(1)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(2)
        outer.addLayout(self._box)
        outer.addLayout(buttons)
        self.add_button.clicked.connect(self.add_channel)
        self.remove_button.clicked.connect(self.remove_channel)
        self.add_channel()

    def add_channel(self) -> LayerCombo:
        combo = LayerCombo(self._viewer, self._image_type)
        combo.currentIndexChanged.connect(lambda _i: self.changed.emit())
        self._rows.append(combo)
        self._box.addWidget(combo)
        self.remove_button.setEnabled(len(self._rows) > 1)
        self.changed.emit()
        return combo

    def remove_channel(self) -> None:
        if len(self._rows) > 1:
            combo = self._rows.pop()
            combo.setParent(None)
            combo.deleteLater()
        self.remove_button.setEnabled(len(self._rows) > 1)
        self.changed.emit()

    @property
    def combos(self) -> list[LayerCombo]:
        return list(self._rows)

    def layers(self) -> list:
        return [c.layer() for c in self._rows if c.layer() is not None]

    def set_layers(self, layers: list) -> None:
        while len(self._rows) < len(layers):
            self.add_channel()
        while len(self._rows) > len(layers) > 0:
            self.remove_channel()
        for combo, layer in zip(self._rows, layers):
            combo.set_layer(layer)


@dataclass
class ImageInput:
    """Image layers resolved to what the engine takes.

    Attributes:
        layers: The chosen layers (the first gives the geometry).
        num_channels: Channels.
        spatial_shape: Spatial shape, napari order.
        spacing: Voxel size per spatial axis in world units, napari order (the layer's scale for
            layers from this plugin's readers; measured through the whole transform otherwise).
    """

    layers: list
    num_channels: int
    spatial_shape: tuple[int, ...]
    spacing: tuple[float, ...]

    @property
    def reference(self):
        return self.layers[0]

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    @property
    def stacked(self) -> bool:
        return len(self.layers) == 1 and self.layers[0].ndim == 4

    def array(self) -> np.ndarray:
        """``(C, *spatial)`` float32 (reads the layer data: call it in the worker)."""
        from napari_medseg.io._dtypes import to_float32

        if self.stacked:
            return to_float32(self.layers[0].data, f"Layer {self.layers[0].name!r}", InputError)
        return np.stack([to_float32(layer.data, f"Layer {layer.name!r}", InputError) for layer in self.layers])

    def spatial_transform(self) -> dict:
        """``scale``, ``translate``, ``rotate``, ``shear`` and ``affine`` of the spatial axes, for result layers.

        Result layers get the reference layer's whole data-to-world transform, so they land on the
        same world positions (rotation, flips and shear of a DICOM, NRRD or oblique NIfTI source
        included: :mod:`napari_medseg.io.world`), not only the same scale and origin.
        """
        ref = self.reference
        n = self.spatial_dims
        matrix = np.asarray(ref.affine.affine_matrix)[-(n + 1):, -(n + 1):]
        return {
            "scale": tuple(float(s) for s in ref.scale[-n:]),
            "translate": tuple(float(t) for t in ref.translate[-n:]),
            "rotate": np.asarray(ref.rotate)[-n:, -n:],
            "shear": _shear_block(ref.shear, ref.ndim, n),
            "affine": matrix,
        }


def _shear_block(shear, ndim: int, n: int) -> np.ndarray:
    """The trailing ``n x n`` block of napari's upper-triangular shear (given as a vector or matrix)."""
    arr = np.asarray(shear, dtype=np.float64)
    if arr.ndim == 2:
        return arr[-n:, -n:]
    mat = np.eye(ndim)
    if arr.size:
        mat[np.triu(np.ones((ndim, ndim), bool), 1)] = arr
    return mat[-n:, -n:]


def world_spacing(layer, n: int) -> tuple[float, ...]:
    """Voxel size (world units, mm for this plugin's layers) of the last ``n`` axes of ``layer``.

    Measured through the layer's whole data-to-world transform, so it is right whether the voxel
    size sits in ``scale`` (this plugin's readers) or in ``affine`` (other readers).
    """
    lead = (0,) * (layer.ndim - n)
    origin = np.asarray(layer.data_to_world(lead + (0,) * n), dtype=np.float64)
    out = []
    for axis in range(n):
        step = [0] * n
        step[axis] = 1
        out.append(float(np.linalg.norm(np.asarray(layer.data_to_world(lead + tuple(step))) - origin)))
    return tuple(out)


class InputError(MedsegError, ValueError):
    """The chosen layers cannot be used (shown to the user as is)."""


def resolve_image_input(layers: list) -> ImageInput:
    """Check the chosen image layers and describe them.

    Raises:
        InputError: no layer, RGB, complex values, mismatched shapes, or not 2D/3D.
    """
    if not layers:
        raise InputError("Choose an image layer (open a scan or a sample first).")
    for layer in layers:
        if getattr(layer, "rgb", False):
            raise InputError(f"Layer {layer.name!r} is RGB; medical scans must be greyscale layers.")
        if getattr(layer, "multiscale", False):
            raise InputError(f"Layer {layer.name!r} is multiscale; use a single-resolution layer.")
        if np.dtype(getattr(layer.data, "dtype", np.float32)).kind == "c":
            raise InputError(f"Layer {layer.name!r} holds complex values; take the magnitude (or the real "
                             "part) first.")
    ref = layers[0]
    if len(layers) == 1 and ref.ndim == 4:
        channels, shape = int(ref.data.shape[0]), tuple(int(s) for s in ref.data.shape[1:])
    else:
        shapes = {tuple(int(s) for s in layer.data.shape) for layer in layers}
        if len(shapes) > 1:
            raise InputError(f"The channel layers differ in shape: {sorted(shapes)}.")
        shape = shapes.pop()
        channels = len(layers)
        if len(shape) == 4:
            raise InputError("A 4-D layer must be the only channel entry (it is read as C, z, y, x).")
    if len(shape) not in (2, 3):
        raise InputError(f"Layer {ref.name!r} has {len(shape)} spatial axes; images must be 2D or 3D.")
    spacing = world_spacing(ref, len(shape))
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(f"Layer {ref.name!r} has a degenerate transform (voxel size {spacing}).")
    return ImageInput(list(layers), channels, shape, spacing)


def layer_grid_matrix(layer, n: int) -> np.ndarray:
    """The ``(n + 1)`` square data-to-world matrix of the last ``n`` axes of ``layer`` (napari
    order), measured through its whole transform (scale, translate, rotate, shear and affine)."""
    lead = (0,) * (layer.ndim - n)
    origin = np.asarray(layer.data_to_world(lead + (0,) * n), dtype=np.float64)[-n:]
    matrix = np.eye(n + 1)
    matrix[:n, n] = origin
    for axis in range(n):
        step = [0] * n
        step[axis] = 1
        matrix[:n, axis] = np.asarray(layer.data_to_world(lead + tuple(step)), dtype=np.float64)[-n:] - origin
    return matrix


#: The grid comparison's words, as napari names the parts of a layer's transform.
_LAYER_TERMS = {"spacing": "voxel size (scale)", "origin": "origin (translate)",
                "orientation": "their orientation (rotate, shear or affine)"}


def check_same_grid(image: ImageInput, layer) -> None:
    """Refuse a labels layer that does not lie on the image's voxel grid.

    Same shape is not enough: a labels layer with another voxel size, origin or orientation (as
    napari places it in world space) would teach the model a shifted or stretched segmentation.
    Everything is compared in world coordinates, so layers that split the same transform
    differently between scale, translate, rotate, shear and affine still match. The comparison is
    the one dataset reading applies to label files (:func:`napari_medseg.io.grid.grid_difference`).

    Raises:
        InputError: the shapes, world voxel size, origin or orientation differ.
    """
    from napari_medseg.io.grid import grid_difference

    n = image.spatial_dims
    if tuple(layer.data.shape) != image.spatial_shape:
        raise InputError(
            f"Labels {layer.name!r} have shape {tuple(layer.data.shape)}; the image's is {image.spatial_shape}."
        )
    problem = grid_difference(image.spatial_shape, layer_grid_matrix(layer, n), image.spatial_shape,
                              layer_grid_matrix(image.reference, n), ref_name="the image's", terms=_LAYER_TERMS)
    if problem:
        raise InputError(
            f"Labels {layer.name!r} are not on the image's grid: {problem}. Use labels made on this image "
            "(or resample them to it first)."
        )
