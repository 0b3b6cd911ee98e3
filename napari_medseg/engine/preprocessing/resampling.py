"""Resampling of images, label maps and probability maps to a new voxel spacing.

The rules are nnU-Net (v1)'s (Isensee et al., Nature Methods 18, 2021):

* When the original or the target spacing is anisotropic (largest / smallest spacing > 3) and exactly
  one axis is the coarse one, that axis is resampled *separately*: in-plane with the requested order
  (3 for images) and out-of-plane with order 0 (nearest), so that interpolation never smears across
  thick slices. Otherwise every axis is resampled together with the requested order.
* Images use cubic splines (order 3), clipped to the input range afterwards (as ``skimage``'s
  ``resize(clip=True)`` does in nnU-Net).
* Label maps are resampled by interpolating the one-hot encoding of every class linearly (order 1)
  and taking, per voxel, the class with the largest interpolated membership (argmax). nnU-Net
  thresholds every class at 0.5 instead; argmax gives the same answer wherever one class reaches 0.5
  and never leaves a voxel without a class. It is done one class at a time (running maximum), so the
  memory needed is two arrays of the output size whatever the number of classes.

Voxel centres are aligned as in ``skimage.transform.resize``: output voxel ``o`` of an axis resized
from ``n`` to ``m`` voxels samples input coordinate ``(o + 0.5) * n / m - 0.5``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from napari_medseg.errors import MedsegError
from napari_medseg.io.limits import GUARD_ENV, check_memory, guard_enabled

logger = logging.getLogger(__name__)

ANISOTROPY_THRESHOLD = 3.0


class ResamplingError(MedsegError, ValueError):
    """Inconsistent shapes or spacings were given to a resampling function."""


#: Resampling may make at most this many voxels out of each input voxel (when the result is also
#: larger than :data:`GUARD_MIN_VOXELS`): more means a voxel size in the wrong unit or a wrong model.
MAX_UPSAMPLING = 1000
GUARD_MIN_VOXELS = 2**24
#: Bytes per output voxel at the peak of resampling one channel (output, membership/spline temporaries).
_BYTES_PER_VOXEL = 12


def compute_new_shape(
    shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float], *, check: bool = True
) -> tuple[int, ...]:
    """Spatial shape after resampling ``shape`` from ``old_spacing`` to ``new_spacing`` (>= 1 each).

    With ``check`` (the default) the result is refused before anything is allocated when it is
    absurd: more than :data:`MAX_UPSAMPLING` voxels per input voxel (and more than
    :data:`GUARD_MIN_VOXELS`), or more memory than is available (:mod:`napari_medseg.io.limits`;
    ``MEDSEG_SIZE_GUARD=off`` skips both).

    Raises:
        ResamplingError: mismatched lengths, non-positive spacing, an axis of size 0, or an absurd result.
    """
    if not (len(shape) == len(old_spacing) == len(new_spacing)):
        raise ResamplingError(
            f"shape {tuple(shape)}, old spacing {tuple(old_spacing)} and new spacing "
            f"{tuple(new_spacing)} must have one entry per spatial axis"
        )
    if not (np.all(np.isfinite(old_spacing)) and np.all(np.isfinite(new_spacing))) or \
            min(old_spacing) <= 0 or min(new_spacing) <= 0:
        raise ResamplingError(f"Spacings must be finite and positive, got {tuple(old_spacing)} -> {tuple(new_spacing)}")
    if min(shape) <= 0:
        raise ResamplingError(f"The image has an axis of size 0 (shape {tuple(int(s) for s in shape)}): it holds no voxels")
    new = np.round(np.asarray(old_spacing, float) / np.asarray(new_spacing, float) * np.asarray(shape))
    out = tuple(max(int(v), 1) for v in new)
    if check:
        check_resample_size(shape, out, old_spacing, new_spacing)
    return out


def check_resample_size(
    shape: Sequence[int], new_shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]
) -> None:
    """Refuse resampling ``shape`` to ``new_shape`` when it multiplies the voxels absurdly or needs
    more memory than there is, with the numbers (see :func:`compute_new_shape`).

    Raises:
        ResamplingError: what would be made, from what, and what to check.
    """
    if not guard_enabled():
        return
    old_vox = math.prod(int(s) for s in shape)
    new_vox = math.prod(int(s) for s in new_shape)
    what = (f"Resampling {_x(shape)} voxels of {_x(old_spacing)} mm to {_x(new_spacing)} mm would make "
            f"{_x(new_shape)} = {new_vox:,} voxels")
    if new_vox > GUARD_MIN_VOXELS and new_vox > MAX_UPSAMPLING * old_vox:
        raise ResamplingError(
            f"{what}, {new_vox / old_vox:,.0f} per input voxel (at most {MAX_UPSAMPLING}). Is the voxel size right "
            f"(a file in metres or microns read as mm)? Is the model meant for images this coarse? Set "
            f"{GUARD_ENV}=off to resample anyway."
        )
    check_memory(new_vox * _BYTES_PER_VOXEL, f"Resampling {_x(shape)} voxels to {_x(new_shape)} ({_x(old_spacing)} "
                 f"-> {_x(new_spacing)} mm)", ResamplingError, "Is the voxel size right?")


def _x(values: Sequence[float]) -> str:
    return "x".join(str(int(v)) if float(v).is_integer() else f"{float(v):.4g}" for v in values)


def get_do_separate_z(spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD) -> bool:
    """Whether ``spacing`` is anisotropic enough to resample its coarse axis separately."""
    return max(spacing) / min(spacing) > threshold


def get_lowres_axis(spacing: Sequence[float]) -> tuple[int, ...]:
    """Axes whose spacing is the largest (the out-of-plane axes)."""
    spacing = np.asarray(spacing, float)
    return tuple(int(i) for i in np.flatnonzero(spacing == spacing.max()))


def separate_z_axis(
    old_spacing: Sequence[float],
    new_spacing: Sequence[float],
    force_separate_z: bool | None = None,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> int | None:
    """The axis to resample separately (nnU-Net's rule), or ``None`` to resample all axes together.

    Args:
        old_spacing: Spacing of the data now.
        new_spacing: Spacing wanted.
        force_separate_z: ``True``/``False`` overrides the anisotropy test; ``None`` applies it.
        threshold: Anisotropy (largest / smallest spacing) above which the coarse axis is separate.
    """
    if force_separate_z is False or len(old_spacing) < 3:
        return None
    if force_separate_z:
        axes = get_lowres_axis(old_spacing)
    elif get_do_separate_z(old_spacing, threshold):
        axes = get_lowres_axis(old_spacing)
    elif get_do_separate_z(new_spacing, threshold):
        axes = get_lowres_axis(new_spacing)
    else:
        return None
    # Two or three equally coarse axes (e.g. spacing (0.24, 1.25, 1.25)): resample all together.
    return axes[0] if len(axes) == 1 else None


def _zoom_to(arr: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resize ``arr`` to ``shape`` with spline ``order``, skimage's voxel-centre alignment."""
    shape = tuple(int(s) for s in shape)
    if arr.shape == shape:
        return arr.copy()
    if order == 0:
        return _nearest_to(arr, shape)
    factors = [n / o for n, o in zip(shape, arr.shape)]
    out = ndimage.zoom(arr, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != shape:  # cannot happen for integer shapes, but be explicit about the contract
        raise ResamplingError(f"Internal error: zoom gave {out.shape}, expected {shape}")
    return out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Input index nearest to every output voxel centre of an axis resized ``n_in -> n_out``."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.clip(idx, 0, n_in - 1)


def _nearest_to(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize by indexing (exact, any dtype)."""
    out = arr
    for ax, (n_in, n_out) in enumerate(zip(arr.shape, shape)):
        if n_in != n_out:
            out = np.take(out, _nearest_index(n_in, n_out), axis=ax)
    return np.ascontiguousarray(out)


def _resize_image_channel(
    arr: np.ndarray, shape: Sequence[int], order: int, order_z: int, axis: int | None, clip: bool
) -> np.ndarray:
    """Resize one float channel, with the separate-axis rule when ``axis`` is not ``None``."""
    if axis is None:
        out = _zoom_to(arr, shape, order)
    else:
        inplane = list(shape)
        inplane[axis] = arr.shape[axis]
        moved = np.moveaxis(arr, axis, 0)
        target2d = [s for i, s in enumerate(inplane) if i != axis]
        slices = [_zoom_to(np.ascontiguousarray(s), target2d, order) for s in moved]
        out = np.moveaxis(np.stack(slices), 0, axis)
        out = _resize_one_axis(out, axis, shape[axis], order_z)
    if clip and out.size:  # out is always a new array here: clip in place (no temporary)
        np.clip(out, arr.min(), arr.max(), out=out)
    return np.ascontiguousarray(out)


def _resize_one_axis(arr: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    if arr.shape[axis] == n_out:
        return arr
    if order == 0:
        return np.take(arr, _nearest_index(arr.shape[axis], n_out), axis=axis)
    target = list(arr.shape)
    target[axis] = n_out
    return _zoom_to(arr, target, order)


def _block_starts(n_in: int, n_out: int) -> np.ndarray:
    """First input index of each output voxel when every input voxel goes to the output voxel that
    holds its centre (``n_out <= n_in``: each output gets at least one)."""
    owner = np.floor((np.arange(n_in) + 0.5) * (n_out / n_in)).astype(np.intp)
    return np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])


def _painted_to(seg: np.ndarray, shape: tuple[int, ...], ignore_label: int) -> np.ndarray:
    """Shrink a partly painted label map keeping every painted voxel (see :func:`resize_segmentation`)."""
    starts = [None if n == o else _block_starts(o, n) for o, n in zip(seg.shape, shape)]
    best_val = np.zeros(shape, np.int32)  # painted voxels of the winning class; 0: none, stays ignore
    best_cls = np.full(shape, ignore_label, seg.dtype)
    for c in np.unique(seg):
        if c == ignore_label:
            continue
        count = (seg == c).astype(np.int32)
        for ax, st in enumerate(starts):
            if st is not None:
                count = np.add.reduceat(count, st, axis=ax)
        better = count > best_val
        best_val[better] = count[better]
        best_cls[better] = c
    return best_cls


def resize_segmentation(
    seg: np.ndarray,
    shape: Sequence[int],
    order: int = 1,
    order_z: int = 0,
    axis: int | None = None,
    ignore_label: int | None = None,
) -> np.ndarray:
    """Resize an integer label map: one-hot interpolation per class, then argmax.

    A partly painted map (``ignore_label`` present) that shrinks (no axis grows) is resized so that
    no painted voxel is lost: each input voxel goes to the output voxel holding its centre, and an
    output voxel takes the most frequent *painted* class among its inputs (the ignore label only
    where none is painted). One-hot interpolation instead drops painted slices that fall between
    the samples: three 1 mm slices painted on a brain kept one or two at 2 mm, an odd one none.

    Args:
        seg: Integer label map (spatial axes only).
        shape: Output spatial shape.
        order: Interpolation order of the class memberships (0 = nearest, 1 = linear).
        order_z: Order along ``axis`` when it is resampled separately (nnU-Net uses 0).
        axis: The separately resampled axis, or ``None``.
        ignore_label: The value of unpainted voxels (not a class), or ``None``.

    Returns:
        The resized label map with the dtype of ``seg``.
    """
    shape = tuple(int(s) for s in shape)
    if seg.shape == shape:
        return seg.copy()
    if (ignore_label is not None and all(n <= o for n, o in zip(shape, seg.shape))
            and np.any(seg == ignore_label)):
        return _painted_to(seg, shape, ignore_label)
    if order == 0 and (axis is None or order_z == 0):
        return _nearest_to(seg, shape)
    inplane = list(shape)
    if axis is not None:
        inplane[axis] = seg.shape[axis]
    classes = np.unique(seg)
    best_val = np.full(inplane, -1.0, np.float32)
    best_cls = np.zeros(inplane, seg.dtype)
    for c in classes:
        # With a separate axis, its factor is 1 here, where linear interpolation is the identity.
        memb = _zoom_to((seg == c).astype(np.float32), inplane, order)
        better = memb > best_val
        best_val[better] = memb[better]
        best_cls[better] = c
    if axis is not None:
        if order_z == 0:
            best_cls = np.take(best_cls, _nearest_index(seg.shape[axis], shape[axis]), axis=axis)
        else:
            best_cls = resize_segmentation(best_cls, shape, order=order_z)
    return np.ascontiguousarray(best_cls)


def resample_to_shape(
    arr: np.ndarray,
    new_shape: Sequence[int],
    is_seg: bool,
    axis: int | None = None,
    order: int | None = None,
    order_z: int = 0,
    clip: bool = True,
    ignore_label: int | None = None,
) -> np.ndarray:
    """Resize channels-first data ``(C, *spatial)`` to ``new_shape`` (spatial).

    Args:
        arr: ``(C, *spatial)`` array (float data, or integer labels when ``is_seg``).
        new_shape: Output spatial shape.
        is_seg: Label maps: one-hot interpolation + argmax (see :func:`resize_segmentation`).
        axis: Axis (spatial index) to resample separately with ``order_z``, or ``None``.
        order: Spline order; default 3 for data, 1 for labels.
        order_z: Order along ``axis`` when resampled separately.
        clip: Clip data to the input range (cubic splines overshoot); ignored for labels.
        ignore_label: Labels: the value of unpainted voxels (see :func:`resize_segmentation`).
    """
    new_shape = tuple(int(s) for s in new_shape)
    if arr.ndim != len(new_shape) + 1:
        raise ResamplingError(
            f"Expected channels-first data with {len(new_shape)} spatial axes, got shape {arr.shape}"
        )
    if order is None:
        order = 1 if is_seg else 3
    if is_seg:
        return np.stack([resize_segmentation(c, new_shape, order, order_z, axis, ignore_label) for c in arr])
    data = arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)
    if len(data) == 0:
        return np.empty((0, *new_shape), data.dtype)
    # Fill a preallocated output channel by channel: one channel's temporary at a time, not C + C.
    first = _resize_image_channel(data[0], new_shape, order, order_z, axis, clip)
    if len(data) == 1:
        return first[None]
    out = np.empty((len(data), *first.shape), first.dtype)
    out[0] = first
    del first
    for c in range(1, len(data)):
        out[c] = _resize_image_channel(data[c], new_shape, order, order_z, axis, clip)
    return out


def resample_image(
    arr: np.ndarray,
    old_spacing: Sequence[float],
    new_spacing: Sequence[float],
    is_seg: bool = False,
    order: int | None = None,
    order_z: int = 0,
    force_separate_z: bool | None = None,
    new_shape: Sequence[int] | None = None,
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample channels-first data from ``old_spacing`` to ``new_spacing`` with nnU-Net's rules.

    Args:
        arr: ``(C, *spatial)`` image (float) or label map (integer, with ``is_seg``).
        old_spacing: Current spacing per spatial axis.
        new_spacing: Target spacing per spatial axis.
        is_seg: Resample as a label map (one-hot linear + argmax) instead of cubic splines.
        order: Override of the in-plane order (default 3 for images, 1 for labels).
        order_z: Order along the separately resampled axis (default 0, nearest).
        force_separate_z: ``None`` = nnU-Net's anisotropy rule; ``True``/``False`` forces it.
        new_shape: Output spatial shape; default :func:`compute_new_shape`.
        anisotropy_threshold: See :func:`separate_z_axis`.

    Returns:
        The resampled ``(C, *new_shape)`` array (float32/float64 for images, input dtype for labels).
    """
    if arr.ndim != len(old_spacing) + 1:
        raise ResamplingError(
            f"resample_image expects (C, *spatial) with {len(old_spacing)} spatial axes, got {arr.shape}"
        )
    if new_shape is None:
        new_shape = compute_new_shape(arr.shape[1:], old_spacing, new_spacing)
    axis = separate_z_axis(old_spacing, new_spacing, force_separate_z, anisotropy_threshold)
    logger.debug(
        "resample %s -> %s (spacing %s -> %s, separate axis %s, seg=%s)",
        arr.shape[1:], tuple(new_shape), tuple(old_spacing), tuple(new_spacing), axis, is_seg,
    )
    return resample_to_shape(arr, new_shape, is_seg, axis=axis, order=order, order_z=order_z)
