"""Preprocessing of one case (crop, transpose, resample, normalise) and its exact inverse.

The steps and their order are nnU-Net (v1)'s (Isensee et al., Nature Methods 18, 2021):

1. **Crop to nonzero**: the bounding box of the voxels where any channel is not 0. The label map is
   cropped with the same box; labelled voxels outside it are lost (a warning is logged).
2. **Transpose** the spatial axes by ``plan.transpose_forward`` (coarsest axis first).
3. **Resample** to ``plan.spacing`` (see :mod:`.resampling`). The 2D configuration keeps the spacing of
   the first (transposed) axis: it only resamples in-plane.
4. **Normalise** every channel by ``plan.normalization[c]``: ``"ct"`` clips to the dataset's 0.5 and
   99.5 percentiles and subtracts the dataset mean / divides by its standard deviation
   (``plan.intensity_stats[c]``); ``"zscore"`` uses the image's own mean and std, computed inside the
   nonzero mask when ``plan.use_mask_for_norm[c]`` (outside is then set to 0); ``"none"`` leaves it.

A 2D image ``(y, x)`` with a 2-entry spacing is handled as a 3D image with one slice.
:func:`restore_probabilities` and :func:`restore_labels` undo steps 1-3 for network outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from napari_medseg.engine.planning.plan import Plan
from napari_medseg.engine.preprocessing.cropping import bbox_of, bbox_slices, nonzero_mask
from napari_medseg.engine.preprocessing.normalization import (
    LazyNormalizedImage,
    PreprocessingError,
    normalization_params,
    normalize,
    per_channel,
)
from napari_medseg.engine.preprocessing.resampling import (
    compute_new_shape,
    resample_to_shape,
    separate_z_axis,
)

logger = logging.getLogger(__name__)

#: Spacing given to the added slice axis of a 2D image (nnU-Net's convention for 2D data).
DUMMY_SPACING = 999.0
@dataclass
class CaseProperties:
    """Everything needed to map network outputs back onto the original image (plain types).

    Attributes:
        original_shape: Spatial shape before cropping, napari order (2 entries for a 2D image).
        original_spacing: Spacing of the original image, napari order.
        bbox: Crop to nonzero, ``[start, stop)`` per spatial axis of the original image.
        shape_after_crop: Spatial shape after cropping, napari order.
        shape_after_resample: Spatial shape on the plan grid, transposed order (always 3 axes).
        spacing_after_resample: Spacing on the plan grid, transposed order.
    """

    original_shape: tuple[int, ...]
    original_spacing: tuple[float, ...]
    bbox: list[list[int]]
    shape_after_crop: tuple[int, ...]
    shape_after_resample: tuple[int, ...]
    spacing_after_resample: tuple[float, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "original_shape": [int(s) for s in self.original_shape],
            "original_spacing": [float(s) for s in self.original_spacing],
            "bbox": [[int(a), int(b)] for a, b in self.bbox],
            "shape_after_crop": [int(s) for s in self.shape_after_crop],
            "shape_after_resample": [int(s) for s in self.shape_after_resample],
            "spacing_after_resample": [float(s) for s in self.spacing_after_resample],
        }

    @classmethod
    def from_dict(cls, d: dict) -> CaseProperties:
        return cls(
            original_shape=tuple(int(s) for s in d["original_shape"]),
            original_spacing=tuple(float(s) for s in d["original_spacing"]),
            bbox=[[int(a), int(b)] for a, b in d["bbox"]],
            shape_after_crop=tuple(int(s) for s in d["shape_after_crop"]),
            shape_after_resample=tuple(int(s) for s in d["shape_after_resample"]),
            spacing_after_resample=tuple(float(s) for s in d.get("spacing_after_resample", ())),
        )

    @property
    def is_2d_input(self) -> bool:
        return len(self.original_shape) == 2


def _check_plan(plan: Plan) -> tuple[list[int], list[int]]:
    tf, tb = list(plan.transpose_forward), list(plan.transpose_backward)
    if sorted(tf) != [0, 1, 2] or [tf[i] for i in tb] != [0, 1, 2]:
        raise PreprocessingError(
            f"plan.transpose_forward {tf} / transpose_backward {tb} are not inverse permutations of 3 axes"
        )
    if len(plan.spacing) != 3:
        raise PreprocessingError(f"plan.spacing must have 3 entries, got {plan.spacing}")
    return tf, tb


def _as_3d(
    image: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, tuple[float, ...], bool]:
    spacing = tuple(float(s) for s in spacing)
    if image.ndim == len(spacing):
        image = image[None]
    if image.ndim != len(spacing) + 1 or len(spacing) not in (2, 3):
        raise PreprocessingError(
            f"Expected an image (C, z, y, x) or (z, y, x) with a 3-entry spacing (or (C, y, x) / (y, x) "
            f"with 2 entries); got shape {image.shape} with spacing {spacing}"
        )
    if min(spacing) <= 0:
        raise PreprocessingError(f"Spacing must be positive, got {spacing}")
    if len(spacing) == 2:
        return image[:, None], (DUMMY_SPACING, *spacing), True
    return image, spacing, False


def target_spacing_for(
    spacing_t: Sequence[float], plan: Plan, keep_axes_t: Sequence[bool] = (False, False, False)
) -> tuple[float, ...]:
    """Target spacing (transposed order): the plan's, except axes kept at their own spacing.

    The 2D configuration keeps transposed axis 0 (it resamples in-plane only), and so does the
    slice axis added to a 2D image.
    """
    keep = list(keep_axes_t)
    if plan.spatial_dims == 2:
        keep[0] = True
    return tuple(float(s if k else p) for s, p, k in zip(spacing_t, plan.spacing, keep))


def _check_finite(img: np.ndarray) -> None:
    """Refuse NaN / infinite voxels with their counts: what they stand for is the user's call."""
    finite = np.isfinite(img)
    if finite.all():
        return
    n_nan = int(np.isnan(img).sum())
    n_inf = int(finite.size - finite.sum()) - n_nan
    raise PreprocessingError(
        f"The image contains {n_nan:,} NaN and {n_inf:,} infinite voxel value(s) (of {img.size:,}). "
        "napari-medseg does not guess what they stand for: replace them (e.g. with the background "
        "intensity) before segmenting or training."
    )


def preprocess_case(
    image: np.ndarray,
    spacing: Sequence[float],
    plan: Plan,
    label: np.ndarray | None = None,
    *,
    lazy: bool = False,
    ignore_label: int | None = None,
) -> tuple[np.ndarray | LazyNormalizedImage, np.ndarray | None, CaseProperties]:
    """Crop, transpose, resample and normalise one case for the network.

    Args:
        image: ``(C, z, y, x)`` (or ``(z, y, x)`` for one channel; ``(C, y, x)`` / ``(y, x)`` with a
            2-entry spacing), napari order.
        spacing: Spacing per spatial axis, napari order, mm.
        plan: The configuration's plan.
        label: Integer label map with the image's spatial shape, or ``None``.
        lazy: When the case needs no resampling (and has no label), return the image as a
            :class:`LazyNormalizedImage` (views of ``image``, normalised tile by tile when read)
            instead of a float32 copy: prediction then holds one volume less.
        ignore_label: The label of unpainted voxels in a partly painted ``label``: shrinking keeps
            every painted voxel (:func:`~.resampling.resize_segmentation`).

    Returns:
        ``(image (C, *grid) float32, label (*grid) int16 or None, properties)`` where ``grid`` is the
        transposed, resampled shape ``properties.shape_after_resample``.

    Raises:
        PreprocessingError: on mismatched shapes, channels, spacing or plan fields.
    """
    image = np.asarray(image)
    if image.dtype.kind == "c":
        raise PreprocessingError("The image holds complex values; take the magnitude (np.abs) or the real part first.")
    orig_shape = image.shape[-len(spacing):] if image.ndim >= len(spacing) else image.shape
    img, sp, is_2d = _as_3d(image, spacing)
    if plan.num_channels and img.shape[0] != plan.num_channels:
        raise PreprocessingError(f"The plan expects {plan.num_channels} channel(s), the image has {img.shape[0]}")
    tf, _ = _check_plan(plan)
    if not np.issubdtype(img.dtype, np.floating):
        if not lazy:  # lazily, tiles are cast when read (integers are finite)
            img = img.astype(np.float32)
    else:
        _check_finite(img)
    lab = None
    if label is not None:
        lab = np.asarray(label)
        if lab.shape != tuple(orig_shape):
            raise PreprocessingError(f"Label shape {lab.shape} differs from the image's spatial shape {tuple(orig_shape)}")
        if not (np.issubdtype(lab.dtype, np.integer) or np.issubdtype(lab.dtype, np.bool_)):
            if not np.array_equal(lab, np.round(lab)):
                raise PreprocessingError("Label map has non-integer values")
        if lab.size and (int(lab.max()) >= 2**15 or int(lab.min()) < -(2**15)):
            raise PreprocessingError("Label values must fit in int16 (|value| < 32768)")
        lab = lab.astype(np.int16)
        if is_2d:
            lab = lab[None]

    # 1. crop to nonzero
    mask = nonzero_mask(img)
    bbox3 = bbox_of(mask)
    sl = bbox_slices(bbox3)
    img = img[(slice(None), *sl)]
    mask = mask[sl]
    if lab is not None:
        # class voxels only: values from the plan's number of classes up (an ignore label) are not labels
        classes = (lab > 0) & (lab < plan.num_classes) if plan.num_classes else lab != 0
        lost = int(np.count_nonzero(classes)) - int(np.count_nonzero(classes[sl]))
        if lost:
            logger.warning("%d labelled voxels lie outside the nonzero image region and are cropped away", lost)
        lab = lab[sl]
    shape_after_crop = img.shape[1:]

    # 2. transpose
    img = np.transpose(img, [0] + [1 + a for a in tf])
    mask = np.transpose(mask, tf)
    lab = np.transpose(lab, tf) if lab is not None else None
    sp_t = tuple(sp[a] for a in tf)

    # 3. resample
    keep = [is_2d and a == 0 for a in tf]
    target = target_spacing_for(sp_t, plan, keep)
    new_shape = compute_new_shape(img.shape[1:], sp_t, target)
    axis = separate_z_axis(sp_t, target)
    identity = tuple(new_shape) == tuple(img.shape[1:])
    needs_mask = any(per_channel(plan.use_mask_for_norm or [False], img.shape[0], "use_mask_for_norm"))
    props = CaseProperties(
        original_shape=tuple(int(s) for s in orig_shape),
        original_spacing=tuple(float(s) for s in spacing),
        bbox=bbox3[1:] if is_2d else bbox3,
        shape_after_crop=tuple(int(s) for s in (shape_after_crop[1:] if is_2d else shape_after_crop)),
        shape_after_resample=tuple(int(s) for s in new_shape),
        spacing_after_resample=target,
    )
    if lazy and identity and lab is None:
        mask = mask if needs_mask else None
        return LazyNormalizedImage(img, normalization_params(img, plan, mask), mask), None, props
    if not np.issubdtype(img.dtype, np.floating):  # deferred above in case it stayed lazy
        img = img.astype(np.float32)
    if not identity:  # identity: skip the copy (normalize makes one)
        img = resample_to_shape(img, new_shape, is_seg=False, axis=axis, order=3, order_z=0)
    if needs_mask:
        mask = resample_to_shape(mask[None].astype(np.uint8), new_shape, True, axis=axis)[0].astype(bool)
    if lab is not None:
        lab = resample_to_shape(lab[None], new_shape, is_seg=True, axis=axis, order=1, order_z=0,
                                ignore_label=ignore_label)[0]

    # 4. normalise
    img = normalize(img, plan, mask if needs_mask else None)
    return np.ascontiguousarray(img, dtype=np.float32), lab, props


def _geometry_3d(props: CaseProperties, plan: Plan):
    """(original 3D shape, 3D bbox, 3D crop shape, 3D original spacing) of ``props``."""
    if props.is_2d_input:
        return (
            (1, *props.original_shape),
            [[0, 1], *props.bbox],
            (1, *props.shape_after_crop),
            (DUMMY_SPACING, *props.original_spacing),
        )
    return props.original_shape, props.bbox, props.shape_after_crop, props.original_spacing


def is_resampled(props: CaseProperties, plan: Plan) -> bool:
    """Whether preprocessing changed the grid (beyond the crop and the transpose)."""
    tf, _ = _check_plan(plan)
    crop_shape = _geometry_3d(props, plan)[2]
    return tuple(props.shape_after_resample) != tuple(int(crop_shape[a]) for a in tf)


def _check_grid(arr: np.ndarray, props: CaseProperties, what: str) -> None:
    if tuple(arr.shape[-3:]) != tuple(props.shape_after_resample):
        raise PreprocessingError(
            f"{what} have spatial shape {tuple(arr.shape[-3:])}, but this case's plan grid is "
            f"{tuple(props.shape_after_resample)}"
        )


def restore_probabilities(
    probs: np.ndarray, props: CaseProperties, plan: Plan, overwrite_input: bool = False
) -> np.ndarray:
    """Map class probabilities on the plan grid back onto the original image grid.

    Resamples linearly per class (nearest along a separately resampled coarse axis, as nnU-Net's
    export), undoes the transpose and pads into the original shape, where voxels outside the crop
    box get probability 1 for background (class 0).

    Args:
        probs: ``(K, *props.shape_after_resample)`` probabilities (or any per-class scores).
        props: From :func:`preprocess_case`.
        plan: The plan used for preprocessing.
        overwrite_input: Allow the result to be ``probs`` itself (float32) when nothing needs
            resampling, transposing or padding back -- no copy of a ``(K, *spatial)`` volume.

    Returns:
        ``(K, *props.original_shape)`` float32.
    """
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise PreprocessingError(f"Expected probabilities (K, z, y, x), got shape {probs.shape}")
    _check_grid(probs, props, "Probabilities")
    tf, tb = _check_plan(plan)
    orig_shape, bbox, crop_shape, orig_sp = _geometry_3d(props, plan)
    crop_t = [crop_shape[a] for a in tf]
    sp_t = tuple(orig_sp[a] for a in tf)
    axis = separate_z_axis(sp_t, props.spacing_after_resample or tuple(plan.spacing))
    out = probs.astype(np.float32, copy=False)
    if tuple(crop_t) != tuple(out.shape[1:]):
        out = resample_to_shape(out, crop_t, False, axis=axis, order=1, order_z=0, clip=False)
    out = np.transpose(out, [0] + [1 + a for a in tb])
    covers = all(lo == 0 and hi == n for (lo, hi), n in zip(bbox, orig_shape))
    if covers and tuple(out.shape[1:]) == tuple(orig_shape):  # nothing cropped: no padding back
        out = np.ascontiguousarray(out[:, 0] if props.is_2d_input else out)
        return out.copy() if not overwrite_input and np.shares_memory(out, probs) else out
    full = np.zeros((probs.shape[0], *orig_shape), np.float32)
    full[0] = 1.0
    full[(slice(None), *bbox_slices(bbox))] = out
    return full[:, 0] if props.is_2d_input else full


def restore_labels(labels: np.ndarray, props: CaseProperties, plan: Plan) -> np.ndarray:
    """Map a label map on the plan grid back onto the original grid (nearest neighbour, 0 outside)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise PreprocessingError(f"Expected a label map (z, y, x) on the plan grid, got shape {labels.shape}")
    _check_grid(labels, props, "Labels")
    tf, tb = _check_plan(plan)
    orig_shape, bbox, crop_shape, _ = _geometry_3d(props, plan)
    crop_t = [crop_shape[a] for a in tf]
    out = labels
    if tuple(crop_t) != tuple(labels.shape):  # an unchanged grid needs no (copying) resample
        out = resample_to_shape(labels[None], crop_t, True, order=0)[0]
    out = np.transpose(out, tb)
    covers = all(lo == 0 and hi == n for (lo, hi), n in zip(bbox, orig_shape))
    if covers and tuple(out.shape) == tuple(orig_shape):  # nothing cropped: no padding back
        out = np.ascontiguousarray(out)
        return out[0] if props.is_2d_input else out
    full = np.zeros(orig_shape, labels.dtype)
    full[bbox_slices(bbox)] = out
    return full[0] if props.is_2d_input else full
