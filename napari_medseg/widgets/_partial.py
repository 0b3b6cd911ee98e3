"""Partial-label fine-tuning: remember which voxels of a Labels layer the user corrected.

A :class:`EditTracker` follows one Labels layer from a *baseline* (the prediction, or the moment
tracking started):

* every history item napari records (``layer.events.paint``: brush strokes, fill, polygons,
  ``data_setitem``) marks the voxels it changed, and the slice the user was looking at (the
  viewer's non-displayed axis at that moment) as painted;
* when training data is built, voxels that differ from the baseline snapshot are added too, so
  edits that bypass napari's history (scripts writing ``layer.data`` directly) are not lost.

:func:`mask_labels` then turns the labels into training labels where every voxel that does not
count holds the ignore label (``TrainConfig.ignore_label``): in ``"voxels"`` mode only painted
voxels count, in ``"slices"`` mode every voxel of a slice with at least one painted voxel counts
(the user vouches for the whole slice they corrected).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

MODES = {
    "all": "All voxels of the labels layer",
    "slices": "Painted slices only (corrections)",
    "voxels": "Painted voxels only (corrections)",
}


def mask_labels(labels: np.ndarray, counted: np.ndarray, ignore_label: int) -> np.ndarray:
    """Labels where ``counted`` is True, ``ignore_label`` elsewhere (int16)."""
    out = np.asarray(labels).astype(np.int16, copy=True)
    out[~counted] = ignore_label
    return out


class EditTracker:
    """Records which voxels and slices of a Labels layer were painted since a baseline.

    Args:
        layer: The napari Labels layer.
        viewer: The viewer (to know the slice axis while painting); optional.
        baseline: A copy of the layer's data made beforehand (e.g. in the worker thread that built
            the layer), used as the snapshot instead of copying the data here; optional.
    """

    def __init__(self, layer, viewer=None, baseline: np.ndarray | None = None):
        self._layer_ref = weakref.ref(layer)
        self._viewer_ref = weakref.ref(viewer) if viewer is not None else None
        self._callbacks: list[Callable[[], None]] = []
        self.reset(baseline)
        layer.events.paint.connect(self._on_paint)
        layer.events.data.connect(self._on_data)

    # ------------------------------------------------------------------------------ state
    def reset(self, baseline: np.ndarray | None = None) -> None:
        """Take the current labels (or ``baseline``, a copy of them) as the new baseline and forget all edits."""
        layer = self.layer
        data = np.asarray(layer.data) if layer is not None else np.zeros((0,), np.uint8)
        if baseline is not None and baseline.shape == data.shape and baseline is not data:
            self.snapshot = baseline
        else:
            self.snapshot = np.array(data, copy=True)
        self.touched = np.zeros(self.snapshot.shape, dtype=bool)
        self.slices: dict[int, set[int]] = {}
        self.last_axis = 0
        self.started = time.time()
        self._notify()

    @property
    def layer(self):
        return self._layer_ref()

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every recorded edit or reset (once per callback)."""
        if callback not in self._callbacks:
            self._callbacks.append(callback)

    def _notify(self) -> None:
        for cb in list(getattr(self, "_callbacks", [])):
            try:
                cb()
            except RuntimeError:  # a deleted Qt widget
                self._callbacks.remove(cb)

    # ---------------------------------------------------------------------------- events
    def _slice_axis(self) -> int:
        viewer = self._viewer_ref() if self._viewer_ref is not None else None
        ndim = self.touched.ndim
        if viewer is None or ndim < 3:
            return 0
        offset = viewer.dims.ndim - ndim
        hidden = [a - offset for a in viewer.dims.not_displayed if a - offset >= 0]
        return hidden[-1] if hidden else 0

    def _on_data(self, _event=None) -> None:
        layer = self.layer
        if layer is not None and np.shape(layer.data) != self.snapshot.shape:
            logger.info("Labels layer %r got new data of another shape: tracking restarts", layer.name)
            self.reset()

    def _on_paint(self, event) -> None:
        axis = self._slice_axis()
        self.last_axis = axis
        for atom in event.value or ():
            try:
                self._mark_atom(atom, axis)
            except (IndexError, ValueError, TypeError) as err:  # an atom format we do not know
                logger.warning("Could not record a paint edit (%s); the snapshot diff will catch it", err)
        self._notify()

    def _mark_atom(self, atom, axis: int) -> None:
        if hasattr(atom, "slice_key"):  # napari >= 0.9: a bounding box plus a mask
            key = tuple(atom.slice_key)
            region = self.touched[key]
            mask = np.ones(region.shape, bool) if atom.mask is None else np.asarray(atom.mask, bool)
            region |= mask
            self._add_slices(axis, key, mask)
            return
        indices = tuple(np.asarray(i).ravel() for i in atom[0])  # (indices, old, new)
        if not indices or indices[0].size == 0:
            return
        self.touched[indices] = True
        if axis < len(indices):
            self.slices.setdefault(axis, set()).update(int(i) for i in np.unique(indices[axis]))

    def _add_slices(self, axis: int, key: tuple, mask: np.ndarray) -> None:
        if axis >= mask.ndim:
            return
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.nonzero(mask.any(axis=others))[0] if others else np.nonzero(mask)[0]
        start = (key[axis].start or 0) if isinstance(key[axis], slice) else int(key[axis])
        self.slices.setdefault(axis, set()).update(int(start + i) for i in hit)

    # ------------------------------------------------------------------------------ results
    def painted_voxels(self) -> np.ndarray:
        """Voxels painted since the baseline (events plus any other change of the data)."""
        layer = self.layer
        if layer is not None and np.shape(layer.data) == self.snapshot.shape:
            painted = np.not_equal(np.asarray(layer.data), self.snapshot)
            painted |= self.touched
            return painted
        return self.touched.copy()

    def painted_slices(self, painted: np.ndarray | None = None) -> dict[int, list[int]]:
        """Axis -> sorted slice indices that hold at least one painted voxel (``painted``: the
        result of :meth:`painted_voxels` when the caller has it already)."""
        slices = {a: set(s) for a, s in self.slices.items()}
        extra = (self.painted_voxels() if painted is None else painted) & ~self.touched
        if extra.any() and extra.ndim >= 3:
            others = tuple(a for a in range(extra.ndim) if a != self.last_axis)
            slices.setdefault(self.last_axis, set()).update(
                int(i) for i in np.nonzero(extra.any(axis=others))[0]
            )
        return {a: sorted(s) for a, s in slices.items() if s}

    def counted(self, mode: str, painted: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask of the voxels that count for training in ``mode`` (``painted``: the result
        of :meth:`painted_voxels` when the caller has it already)."""
        if mode == "all":
            return np.ones(self.snapshot.shape, bool)
        if mode == "voxels" or self.touched.ndim < 3:
            return self.painted_voxels() if painted is None else painted
        if mode != "slices":
            raise ValueError(f"Unknown partial-label mode {mode!r}; use one of {list(MODES)}.")
        mask = np.zeros(self.snapshot.shape, bool)
        for axis, idx in self.painted_slices(painted).items():
            sel = [slice(None)] * mask.ndim
            sel[axis] = idx
            mask[tuple(sel)] = True
        return mask

    def training_labels(
        self, mode: str, ignore_label: int, counted: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(labels for training, counted mask)`` for ``mode``; uncounted voxels get ``ignore_label``
        (``counted``: the result of :meth:`counted` when the caller has it already)."""
        layer = self.layer
        if layer is None:
            raise ValueError("The tracked labels layer was deleted.")
        counted = self.counted(mode) if counted is None else counted
        return mask_labels(np.asarray(layer.data), counted, ignore_label), counted

    def summary(self, mode: str) -> str:
        """A sentence on what counts in ``mode`` (reads the whole volume: the Train widget calls it
        in a background thread)."""
        mask = self.painted_voxels()
        painted = int(np.count_nonzero(mask))
        total = int(np.prod(self.snapshot.shape)) or 1
        if mode == "all":
            return f"All {total:,} voxels count ({painted:,} painted since tracking started)."
        slices = self.painted_slices(mask)
        n_slices = sum(len(v) for v in slices.values())
        count = int(np.count_nonzero(self.counted(mode, mask)))
        where = ", ".join(f"axis {a}: {v[:6]}{'…' if len(v) > 6 else ''}" for a, v in slices.items())
        return (
            f"{painted:,} painted voxels on {n_slices} slice(s){' (' + where + ')' if where else ''}. "
            f"Counting {count:,} voxels ({100 * count / total:.2g} %); the rest is ignored."
        )


_TRACKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tracker_for(layer, viewer=None, create: bool = True, baseline: np.ndarray | None = None) -> EditTracker | None:
    """The :class:`EditTracker` of ``layer``, started on first request (baseline: now, or
    ``baseline``, a copy of the layer's data made beforehand)."""
    tracker = _TRACKERS.get(layer)
    if tracker is None and create:
        tracker = EditTracker(layer, viewer, baseline)
        _TRACKERS[layer] = tracker
    return tracker
