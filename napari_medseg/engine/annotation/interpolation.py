"""Fill between slices: shape-based (signed-distance) interpolation of a sparsely painted label map.

A user paints every few slices along one axis; the slices in between are filled as 3D Slicer's and
ITK-SNAP's interpolation tools do, without a model:

* For each label value and each pair of consecutive painted slices, the two slice masks become
  signed distance maps (``scipy.ndimage.distance_transform_edt``; negative inside, ``-0.5`` /
  ``+0.5`` on the pixels on either side of the contour, so the zero level lies on the pixel edges).
* An unpainted slice at fraction ``w`` of the way from the first to the second slice gets the
  blend ``(1 - w) * d0 + w * d1``; the label covers the pixels where the blend is negative
  (morphological contour interpolation). Several objects of one label are handled by the same
  maps: nearby objects merge or split smoothly; an object with no counterpart nearby shrinks and
  disappears on the way.
* **An object present in only one of the two slices** (its label is absent from the other slice)
  shrinks towards its centre and is gone halfway: the missing side's map is the constant ``r``,
  the object's largest inside depth, so the blend ``(1 - w) d + w r`` keeps the pixels deeper than
  ``w r / (1 - w)`` and nothing from ``w = 0.5`` on. A fade by area was not chosen: it would keep a
  full-size object and then drop it.
* **Several labels**: a pixel claimed by two labels takes the one with the lower (more inside)
  blended distance; ties go to the lower label value.

The result depends on the painted slices alone: they are returned unchanged, the unpainted slices
between the first and the last painted one are replaced by the interpolation, and every slice before
the first or after the last painted slice is 0. Like every linear interpolation of shapes, it cannot
create a cross-section larger than both of its neighbours (the equator of a sphere painted on two
slices either side of it), so paint near where the shape changes fastest.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

__all__ = ["fill_between_slices", "painted_slices"]


def _check_labels(labels: np.ndarray, axis: int) -> int:
    if labels.ndim < 2:
        raise ValueError(f"fill between slices needs a label map of 2 or more axes, got shape {labels.shape}.")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"fill between slices needs integer labels, got dtype {labels.dtype}.")
    if not -labels.ndim <= int(axis) < labels.ndim:
        raise ValueError(f"axis {axis} is out of range for a label map of {labels.ndim} axes.")
    return int(axis) % labels.ndim


def painted_slices(labels: np.ndarray, axis: int = 0) -> list[int]:
    """Indices along ``axis`` of the slices that hold any nonzero label, in order.

    Args:
        labels: Integer label map, e.g. ``(z, y, x)``.
        axis: The axis the slices are taken along (the axis the user painted across).
    """
    arr = np.asarray(labels)
    axis = _check_labels(arr, axis)
    others = tuple(a for a in range(arr.ndim) if a != axis)
    return [int(i) for i in np.flatnonzero(np.any(arr, axis=others))]


def _normalise_slices(slices: Iterable[int], length: int) -> list[int]:
    try:
        values = sorted({int(s) for s in slices})
    except (TypeError, ValueError):
        raise ValueError(f"slices must be integer slice indices, got {slices!r}.") from None
    bad = [s for s in values if not 0 <= s < length]
    if bad:
        raise ValueError(f"painted slice indices {bad} are outside 0..{length - 1} along the axis.")
    return values


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by one pixel (clipped to the array)."""
    box = []
    for a in range(mask.ndim):
        others = tuple(b for b in range(mask.ndim) if b != a)
        hit = np.flatnonzero(np.any(mask, axis=others))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, mask.shape[a])))
    return tuple(box)


def _signed_distance(mask: np.ndarray) -> np.ndarray | None:
    """Negative inside, positive outside, +-0.5 next to the contour; ``None`` for an empty mask."""
    if not mask.any():
        return None
    if mask.all():  # no contour in sight: everything is deep inside
        return np.full(mask.shape, -float(max(mask.shape)), np.float32)
    outside = ndimage.distance_transform_edt(~mask)
    inside = ndimage.distance_transform_edt(mask)
    return np.where(mask, 0.5 - inside, outside - 0.5).astype(np.float32)


def _fill_gap(first: np.ndarray, last: np.ndarray, steps: int, dtype: np.dtype) -> np.ndarray:
    """The ``steps`` slices strictly between the painted slices ``first`` and ``last``."""
    out = np.zeros((steps, *first.shape), dtype=dtype)
    values = np.union1d(np.unique(first), np.unique(last))
    values = values[values != 0]
    if steps == 0 or values.size == 0:
        return out
    best = np.zeros(out.shape, np.float32)  # only negative (inside) distances claim a pixel
    weight = (np.arange(1, steps + 1, dtype=np.float32) / (steps + 1)).reshape((steps,) + (1,) * first.ndim)
    for value in values:
        m0, m1 = first == value, last == value
        box = _box(m0 | m1)
        d0, d1 = _signed_distance(m0[box]), _signed_distance(m1[box])
        if d0 is None:  # only in the last slice: grows from nothing halfway
            d0 = np.full_like(d1, -float(d1.min()))
        if d1 is None:  # only in the first slice: shrinks to nothing halfway
            d1 = np.full_like(d0, -float(d0.min()))
        blend = (1.0 - weight) * d0 + weight * d1
        region = (slice(None), *box)
        claimed = blend < best[region]
        best[region][claimed] = blend[claimed]
        out[region][claimed] = value
    return out


def fill_between_slices(labels: np.ndarray, axis: int = 0, slices: Iterable[int] | None = None) -> np.ndarray:
    """Interpolate the unpainted slices of a label map from the painted ones (no model).

    Shape-based interpolation (see the module docstring): for each label and each pair of consecutive
    painted slices, the signed distance maps of the two slice masks are blended linearly by position
    and thresholded at 0. An object (label) present in only one of the two slices shrinks towards its
    centre and is gone halfway; voxels claimed by two labels take the one with the lower blended
    distance.

    Args:
        labels: Integer label map, e.g. ``(z, y, x)`` in napari order, painted on some slices along
            ``axis``; 0 is background.
        axis: The axis the slices are taken along (the slider axis the user painted on).
        slices: Indices of the painted slices. Default: the slices holding any nonzero label
            (:func:`painted_slices`). A slice painted entirely as background (to say "the object
            ends here") holds no label and is invisible to the default: pass ``slices`` explicitly
            to count it, and objects then end halfway towards it.

    Returns:
        A new array of the same shape and dtype: the painted slices unchanged, the slices between
        the first and the last painted one interpolated, 0 before the first and after the last.

    Raises:
        ValueError: not an integer array of 2 or more axes, ``axis`` out of range, or a slice index
            outside the array.
    """
    arr = np.asarray(labels)
    axis = _check_labels(arr, axis)
    src = np.moveaxis(arr, axis, 0)
    painted = painted_slices(arr, axis) if slices is None else _normalise_slices(slices, src.shape[0])
    result = np.zeros_like(arr)
    out = np.moveaxis(result, axis, 0)  # a view: writing it writes ``result``
    for index in painted:
        out[index] = src[index]
    for start, stop in zip(painted[:-1], painted[1:]):
        if stop - start > 1:
            out[start + 1:stop] = _fill_gap(src[start], src[stop], stop - start - 1, arr.dtype)
    return result
