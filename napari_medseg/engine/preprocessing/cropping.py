"""Cropping to the nonzero region (nnU-Net's first preprocessing step) and its bounding boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any channel of ``image`` ``(C, *spatial)`` is nonzero, with holes filled."""
    mask = np.any(image != 0, axis=0)
    return ndimage.binary_fill_holes(mask)


def bbox_of(mask: np.ndarray) -> list[list[int]]:
    """``[start, stop)`` per axis of the ``True`` voxels; the whole array when there are none."""
    if not mask.any():
        return [[0, int(s)] for s in mask.shape]
    box = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(i for i in range(mask.ndim) if i != ax)))
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


def bbox_slices(bbox: Sequence[Sequence[int]]) -> tuple[slice, ...]:
    """The slices that cut ``bbox`` (``[start, stop)`` per axis) out of an array."""
    return tuple(slice(a, b) for a, b in bbox)


__all__ = ["bbox_of", "bbox_slices", "nonzero_mask"]
