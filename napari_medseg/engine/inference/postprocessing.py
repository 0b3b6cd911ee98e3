"""From blended logits or mean probabilities to the :class:`PredictionResult` of a prediction.

Every inferer ends here: logits become probabilities (:func:`softmax_inplace`) or, when only labels
are wanted, labels directly (:func:`argmax_relative`); the mean softmax becomes labels
(:func:`argmax_labels`), optionally cleaned with nnU-Net's connected-component step
(:func:`keep_largest_component`), and an uncertainty map (:func:`finish`). The helpers work a slab
at a time, so no second ``(K, *spatial)`` volume and no int64 index volume is ever made.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

logger = logging.getLogger(__name__)


@dataclass
class PredictionResult:
    """What :func:`~napari_medseg.engine.inference.predict` returns, in the source geometry.

    Attributes:
        labels: ``(z, y, x)`` (or ``(y, x)`` for a 2D image), uint8, or uint16 beyond 256 classes.
        probabilities: ``(K, *spatial)`` float32 mean softmax, when requested.
        uncertainty: ``(*spatial)`` float32 entropy of the mean softmax / log K, in [0, 1], when requested.
        label_names: Class index -> name.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    label_names: dict[int, str] = field(default_factory=dict)


#: The share of a component's voxels on one side of the mid-plane for it to count on that side.
SIDE_SHARE = 0.25
#: The share of a foreground component's voxels a class needs to count as held by it.
CLASS_SHARE = 0.01


def keep_largest_component(
    labels: np.ndarray, classes: Iterable[int] | None = None, *, connectivity: int = 1,
    paired: Iterable[int] = (), side_axis: int = -1, foreground_first: bool = False,
) -> np.ndarray:
    """Keep only the largest connected component of each given class; the rest becomes background.

    With ``foreground_first``, all classes are first taken as one region (nnU-Net's first
    post-processing candidate) and only its main component is kept: the one holding the most
    classes, then the largest (one per side when classes are paired; gaps of one voxel between
    neighbouring structures do not split it). A structure that is part of an anatomical complex
    survives even where a larger false positive lies elsewhere (in the scalp of a whole-head scan).

    A *paired* class holds a left and a right structure in one class (a model trained with both
    hippocampi as "hippocampus"): it keeps its largest component on each side of the mid-plane,
    which is the centre of all foreground along ``side_axis`` (the left-right axis). nnU-Net's rule
    (one component per class) would delete one side of such a class.

    Args:
        labels: Integer label map, any number of axes.
        classes: Classes to clean; default every non-zero class present.
        connectivity: 1 = faces only (scipy's default, as nnU-Net), up to ``labels.ndim`` = full.
        paired: Classes with one structure on each side (see above).
        side_axis: The left-right axis of ``labels``, for ``paired`` classes.
        foreground_first: First keep the main component of the foreground as a whole (see above).

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
    paired = {int(c) for c in paired}
    midline = _midline(labels, side_axis) if paired else None
    if foreground_first:
        _keep_largest_foreground(out, structure, side_axis if paired else None, midline)
    for c in classes:
        mask = out == c
        components, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        keep = [int(np.argmax(sizes))]
        if int(c) in paired and midline is not None:
            keep = _largest_per_side(components, n, sizes, side_axis, midline)
        out[mask & ~np.isin(components, keep)] = 0
        logger.debug("Class %d: kept %d of %d components (%s voxels)", c, len(keep), n, sizes[keep].tolist())
    return out


def _keep_largest_foreground(out: np.ndarray, structure: np.ndarray, side_axis: int | None,
                             midline: float | None) -> None:
    """In place: the foreground's main component (per side with ``side_axis``), the rest background.

    "Main" is the component holding the most classes (each with at least
    :data:`CLASS_SHARE` of its voxels), then the largest: an anatomical complex holds several
    structures, a false positive far from it mostly one class, and may be larger.
    """
    foreground = out != 0
    components, n = ndimage.label(ndimage.binary_dilation(foreground, structure=structure), structure=structure)
    if n <= 1:
        return
    components[~foreground] = 0  # every grown component holds foreground: no size is 0
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0
    classes_held = np.zeros(n + 1, np.int64)
    for c in np.unique(out[foreground]):
        per_component = np.bincount(components[out == c], minlength=n + 1)
        classes_held += per_component >= np.maximum(CLASS_SHARE * sizes, 1)
    rank = classes_held * (int(sizes.max()) + 1) + sizes  # the most classes, then the most voxels
    if side_axis is not None and midline is not None:
        keep = _largest_per_side(components, n, sizes, side_axis, midline, rank=rank)
    else:
        keep = [int(np.argmax(rank[1:])) + 1]
    out[foreground & ~np.isin(components, keep)] = 0


def _midline(labels: np.ndarray, axis: int) -> float | None:
    """The centre of all foreground along ``axis`` (``None`` without foreground)."""
    axis = axis % labels.ndim
    other = tuple(a for a in range(labels.ndim) if a != axis)
    profile = np.count_nonzero(labels, axis=other) if other else (labels != 0).astype(np.int64)
    total = profile.sum()
    return float((profile * np.arange(profile.size)).sum() / total) if total else None


def _largest_per_side(components: np.ndarray, n: int, sizes: np.ndarray, axis: int, midline: float,
                      rank: np.ndarray | None = None) -> list[int]:
    """For each side of ``midline`` along ``axis``, the largest component (highest ``rank``, if
    given) with at least :data:`SIDE_SHARE` of its voxels on that side. A component across the
    mid-plane (both thalami touching there) serves both sides, so a smaller one elsewhere does not
    join it."""
    rank = sizes if rank is None else rank
    axis = axis % components.ndim
    index = np.arange(1, n + 1)
    coords = np.arange(components.shape[axis]).reshape([-1 if a == axis else 1 for a in range(components.ndim)])
    low = ndimage.sum_labels(np.broadcast_to(coords < midline, components.shape), components, index)
    share_low = low / np.maximum(sizes[1:], 1)
    keep = []
    for side in (share_low >= SIDE_SHARE, 1.0 - share_low >= SIDE_SHARE):
        if side.any():
            best = int(index[side][np.argmax(rank[1:][side])])
            if best not in keep:
                keep.append(best)
    return keep


def softmax_inplace(logits: torch.Tensor, slab_voxels: int = 1 << 22) -> torch.Tensor:
    """Softmax over axis 0, in place, a slab of axis-1 positions at a time.

    The same values as ``torch.softmax(logits, 0)`` without a second ``(K, *spatial)`` tensor; a
    tensor with fewer than 2 axes is not modified (its softmax is returned).

    Returns:
        ``logits``, now holding the probabilities.
    """
    if logits.ndim < 2:
        return torch.softmax(logits, dim=0)
    per_row = max(1, math.prod(logits.shape[2:]))
    step = max(1, slab_voxels // per_row)
    for z0 in range(0, logits.shape[1], step):
        logits[:, z0 : z0 + step] = torch.softmax(logits[:, z0 : z0 + step], dim=0)
    return logits


def argmax_labels(mean: np.ndarray, slab_voxels: int = 1 << 22, weights: np.ndarray | None = None) -> np.ndarray:
    """``argmax`` over axis 0 as uint8 (uint16 beyond 256 classes), a slab at a time.

    The int64 index array numpy makes exists for one slab only; ties pick the first class, as
    ``np.argmax`` does. With ``weights`` (one factor per class) the argmax is of ``mean`` times
    them (a slab's copy at a time; ``mean`` is not changed).
    """
    labels = np.empty(mean.shape[1:], np.uint8 if mean.shape[0] <= 256 else np.uint16)
    scale = None if weights is None else np.asarray(weights, np.float32).reshape((-1,) + (1,) * (mean.ndim - 1))
    if labels.ndim == 0:
        labels[()] = np.argmax(mean if scale is None else mean * scale.ravel())
        return labels
    step = max(1, slab_voxels // max(1, math.prod(mean.shape[2:])))
    for z0 in range(0, mean.shape[1], step):
        slab = mean[:, z0 : z0 + step]
        labels[z0 : z0 + step] = np.argmax(slab if scale is None else slab * scale, axis=0)
    return labels


def argmax_relative(
    relative: torch.Tensor, slab_voxels: int = 1 << 22, weights: np.ndarray | None = None
) -> np.ndarray:
    """Labels from logits relative to class 0, a slab at a time.

    ``relative`` is ``(K - 1, *spatial)`` (see ``sliding_window(..., relative=True)``); the labels
    are the ``argmax`` over ``[0, l_1 - l_0, ...]``, the first class on ties (class 0 wins a tie at
    0), as uint8 (uint16 beyond 256 classes). With ``weights`` (one factor per class, as
    :func:`argmax_labels` takes them on the softmax) each class's relative logit is moved by
    ``log(w_k / w_0)``: the same labels as the weighted softmax's argmax.
    """
    k = relative.shape[0] + 1
    shift = None
    if weights is not None:
        w = np.asarray(weights, np.float64)
        shift = torch.as_tensor(np.log(w[1:] / w[0]), dtype=torch.float32, device=relative.device)
        shift = shift.reshape((-1,) + (1,) * (relative.ndim - 1))
    labels = np.empty(tuple(relative.shape[1:]), np.uint8 if k <= 256 else np.uint16)
    step = max(1, slab_voxels // max(1, math.prod(relative.shape[2:])))
    with torch.inference_mode():
        for z0 in range(0, relative.shape[1], step):
            slab = relative[:, z0 : z0 + step].float()
            if shift is not None:
                slab = slab + shift
            best, idx = slab.max(0)  # the first maximum on ties
            idx += 1
            idx.masked_fill_(best <= 0, 0)  # class 0 (relative logit 0) wins ties
            labels[z0 : z0 + step] = idx.cpu().numpy()
    return labels


def finish(
    mean: np.ndarray, largest_component: bool, return_probabilities: bool, return_uncertainty: bool,
    class_weights: np.ndarray | None = None,
) -> PredictionResult:
    """The result of a prediction from its mean softmax ``(K, *spatial)`` in the source geometry.

    Labels are :func:`argmax_labels` (of ``mean`` times ``class_weights`` when given; the
    probabilities and the uncertainty are of ``mean`` itself) (then :func:`keep_largest_component` of every foreground class
    with ``largest_component``); the uncertainty is the entropy of ``mean`` divided by ``log K``
    (zeros for one class). ``label_names`` is left for the caller to fill.
    """
    num_classes = mean.shape[0]
    labels = argmax_labels(mean, weights=class_weights)
    if largest_component:
        labels = keep_largest_component(labels, range(1, num_classes))
    uncertainty = None
    if return_uncertainty:
        if num_classes < 2:
            uncertainty = np.zeros(mean.shape[1:], np.float32)
        else:
            p = np.clip(mean, 1e-12, 1.0)
            entropy = -(p * np.log(p)).sum(axis=0) / math.log(num_classes)
            uncertainty = np.clip(entropy, 0.0, 1.0).astype(np.float32)
    return PredictionResult(
        labels=labels, probabilities=mean if return_probabilities else None, uncertainty=uncertainty
    )


__all__ = [
    "PredictionResult",
    "argmax_labels",
    "argmax_relative",
    "finish",
    "keep_largest_component",
    "softmax_inplace",
]
