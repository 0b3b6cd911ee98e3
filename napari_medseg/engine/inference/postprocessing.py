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


def argmax_labels(mean: np.ndarray, slab_voxels: int = 1 << 22) -> np.ndarray:
    """``argmax`` over axis 0 as uint8 (uint16 beyond 256 classes), a slab at a time.

    The int64 index array numpy makes exists for one slab only; ties pick the first class, as
    ``np.argmax`` does.
    """
    labels = np.empty(mean.shape[1:], np.uint8 if mean.shape[0] <= 256 else np.uint16)
    if labels.ndim == 0:
        labels[()] = np.argmax(mean)
        return labels
    step = max(1, slab_voxels // max(1, math.prod(mean.shape[2:])))
    for z0 in range(0, mean.shape[1], step):
        labels[z0 : z0 + step] = np.argmax(mean[:, z0 : z0 + step], axis=0)
    return labels


def argmax_relative(relative: torch.Tensor, slab_voxels: int = 1 << 22) -> np.ndarray:
    """Labels from logits relative to class 0, a slab at a time.

    ``relative`` is ``(K - 1, *spatial)`` (see ``sliding_window(..., relative=True)``); the labels
    are the ``argmax`` over ``[0, l_1 - l_0, ...]``, the first class on ties (class 0 wins a tie at
    0), as uint8 (uint16 beyond 256 classes).
    """
    k = relative.shape[0] + 1
    labels = np.empty(tuple(relative.shape[1:]), np.uint8 if k <= 256 else np.uint16)
    step = max(1, slab_voxels // max(1, math.prod(relative.shape[2:])))
    with torch.inference_mode():
        for z0 in range(0, relative.shape[1], step):
            slab = relative[:, z0 : z0 + step].float()
            best, idx = slab.max(0)  # the first maximum on ties
            idx += 1
            idx.masked_fill_(best <= 0, 0)  # class 0 (relative logit 0) wins ties
            labels[z0 : z0 + step] = idx.cpu().numpy()
    return labels


def finish(
    mean: np.ndarray, largest_component: bool, return_probabilities: bool, return_uncertainty: bool
) -> PredictionResult:
    """The result of a prediction from its mean softmax ``(K, *spatial)`` in the source geometry.

    Labels are :func:`argmax_labels` (then :func:`keep_largest_component` of every foreground class
    with ``largest_component``); the uncertainty is the entropy of ``mean`` divided by ``log K``
    (zeros for one class). ``label_names`` is left for the caller to fill.
    """
    num_classes = mean.shape[0]
    labels = argmax_labels(mean)
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
