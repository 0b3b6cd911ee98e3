"""Label-map postprocessing after inference (nnU-Net's connected-component step)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)


def keep_largest_component(
    labels: np.ndarray, classes: Iterable[int] | None = None, *, connectivity: int = 1
) -> np.ndarray:
    """Keep only the largest connected component of each given class; the rest becomes background.

    Args:
        labels: Integer label map, any number of axes.
        classes: Classes to clean; default every non-zero class present.
        connectivity: 1 = faces only (scipy's default, as nnU-Net), up to ``labels.ndim`` = full.

    Returns:
        A new label map of the same shape and dtype.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"keep_largest_component needs an integer label map, got {labels.dtype}.")
    if not 1 <= connectivity <= max(labels.ndim, 1):
        raise ValueError(f"connectivity must be in 1..{labels.ndim}, got {connectivity}.")
    out = labels.copy()
    if classes is None:
        classes = [int(c) for c in np.unique(labels) if c != 0]
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
    for c in classes:
        mask = labels == c
        components, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        keep = int(np.argmax(sizes))
        out[mask & (components != keep)] = 0
        logger.debug("Class %d: kept 1 of %d components (%d voxels)", c, n, sizes[keep])
    return out


__all__ = ["keep_largest_component"]
