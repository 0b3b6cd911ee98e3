"""``predict``: segment an image with one checkpoint or an ensemble.

:func:`predict` checks the image, loads the checkpoints, asks the inferer registry
(:func:`~napari_medseg.engine.inference.inferers.select_inferer`) which inferer serves them and runs
it. With the image's ``affine`` and a checkpoint that records its training orientation, the image
is reoriented to it first (permutations and flips only) and the result back; an image far outside
the checkpoint's training domain raises :class:`DomainError` before any compute (unless
``force``). It is a generator (DESIGN.md convention 2): it yields
:class:`~napari_medseg.engine.jobs.Progress` and *returns* a :class:`PredictionResult`, so closing
it cancels the job between tiles. Drive it with :func:`napari_medseg.engine.jobs.drive`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from napari_medseg.engine.checkpoints import Checkpoint, CheckpointError, load_checkpoint
from napari_medseg.engine.inference.config import DomainError, InferenceError, PredictConfig
from napari_medseg.engine.inference.domain import check_domain
from napari_medseg.engine.inference.inferers import select_inferer
from napari_medseg.engine.inference.postprocessing import PredictionResult
from napari_medseg.engine.jobs import Progress
from napari_medseg.engine.preprocessing import (
    OrientationError,
    Reorientation,
    orientation_codes,
    reorientation,
)
from napari_medseg.io.world import check_affine

logger = logging.getLogger(__name__)

CheckpointsArg = Sequence[str | os.PathLike | Checkpoint] | str | os.PathLike | Checkpoint


def predict(
    image: np.ndarray,
    spacing: Sequence[float],
    checkpoints: CheckpointsArg,
    config: PredictConfig | dict | None = None,
    *,
    affine: np.ndarray | None = None,
    **overrides: Any,
) -> Generator[Progress, None, PredictionResult]:
    """Segment an image with one checkpoint or an ensemble (softmax averaged over checkpoints).

    With the default inferer each checkpoint's own plan preprocesses the image (checkpoints sharing
    a plan share the work), the sliding window runs (slice by slice for a 2D model), the softmax is
    restored to the source geometry and averaged; labels are its argmax. Checkpoints another
    registered inferer claims (e.g. patch-free models) are run by that inferer.

    Args:
        image: ``(z, y, x)`` or ``(C, z, y, x)`` (or 2D ``(y, x)`` / ``(C, y, x)``), napari order.
        spacing: One value per spatial axis, napari order, mm.
        checkpoints: Paths or loaded :class:`Checkpoint` s.
        config: A :class:`PredictConfig` (or a dict of its fields); default settings when ``None``.
        affine: The image's 4x4 voxel-to-RAS+ matrix (``Volume.affine``: file voxel axes, i.e. the
            napari axes reversed), or ``None`` when unknown. With it, an image in another orientation
            than the checkpoints were trained in (``Checkpoint.orientation``) is reoriented to theirs
            by permutations and flips, and the result (labels, probabilities, uncertainty) is put
            back on the input's own layout exactly. Without it (or for checkpoints without an
            orientation) the image is used as it is.
        **overrides: :class:`PredictConfig` fields to change: ``device`` (``"auto"``, ``"cpu"``,
            ``"cuda:N"``, ``"mps"``), ``mirror`` (mirroring TTA), ``step`` (tile stride as a
            fraction of the patch), ``batch_size`` (tiles or slices per model call),
            ``largest_component``, ``return_probabilities`` (also the mean softmax
            ``(K, *spatial)``), ``return_uncertainty`` (normalised entropy of the mean softmax),
            ``force`` (segment even an image far outside the training domain).

    Yields:
        ``Progress`` with stages ``"preprocess"``, ``"tiles"`` (one count over all checkpoints and
        mirrorings, total known up front) and ``"postprocess"``.

    Returns:
        :class:`PredictionResult`.

    Raises:
        InferenceError: unknown or invalid settings, or an image/spacing that do not match.
        CheckpointError: unreadable checkpoints, or an image they cannot take (checked before compute).
        DomainError: the image lies far outside a checkpoint's training domain (another modality,
            much coarser or finer voxels; see :mod:`.domain`) and ``force`` is not set; raised
            before any compute.
    """
    cfg = PredictConfig.build(config, **overrides)
    ckpts = _load_all(checkpoints)
    data, spacing = _as_channels_first(image, spacing)
    transform = _reorientation_for(ckpts, affine, len(spacing))
    if transform is not None:
        data, spacing = np.ascontiguousarray(transform.apply(data)), transform.apply_spacing(spacing)
    if not cfg.force:
        reasons = [r for c in ckpts for r in check_domain(data, spacing, c)]
        if reasons:
            raise DomainError(list(dict.fromkeys(reasons)))
    inferer = select_inferer(ckpts)
    result = yield from inferer.run(data, spacing, ckpts, cfg)
    return result if transform is None else _restored(result, transform)


def _reorientation_for(ckpts: Sequence[Checkpoint], affine: Any, ndim: int) -> Reorientation | None:
    """The reorientation from the image's layout (``affine``) to the checkpoints' training one, or
    ``None`` when nothing moves or either is unknown.

    Raises:
        InferenceError: an invalid affine, or ensemble members trained in different orientations.
    """
    if affine is None:
        return None
    try:
        affine = check_affine(affine, "predict(affine=...)")
    except ValueError as err:
        raise InferenceError(str(err)) from None
    known = sorted({c.orientation for c in ckpts if c.orientation})
    if len(known) > 1:
        raise InferenceError(f"The checkpoints of an ensemble were trained in different orientations {known}.")
    if not known:
        return None
    try:
        transform = reorientation(orientation_codes(affine, ndim), known[0])
    except OrientationError as err:  # e.g. a 2D image whose plane is not the one trained on
        logger.warning("Not reorienting the image: %s", err)
        return None
    return None if transform.is_identity else transform


def _restored(result: PredictionResult, transform: Reorientation) -> PredictionResult:
    """``result`` (computed in the training orientation) on the input's own layout, voxel for voxel."""
    def back(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(transform.restore(a))

    result.labels = back(result.labels)
    result.probabilities = back(result.probabilities)
    result.uncertainty = back(result.uncertainty)
    return result


def _load_all(checkpoints: CheckpointsArg) -> list[Checkpoint]:
    if isinstance(checkpoints, (str, os.PathLike, Checkpoint)):
        checkpoints = [checkpoints]
    ckpts = [c if isinstance(c, Checkpoint) else load_checkpoint(c) for c in checkpoints]
    if not ckpts:
        raise InferenceError("No checkpoint given: predict needs at least one trained model.")
    classes = {c.num_classes for c in ckpts}
    if len(classes) > 1:
        raise CheckpointError(f"Checkpoints of an ensemble must predict the same classes; got counts {sorted(classes)}.")
    return ckpts


def _as_channels_first(image: Any, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Return ``(C, *spatial)`` and the spacing as floats.

    Numbers keep their dtype (preprocessing casts them: a lazily preprocessed integer CT is cast
    tile by tile, never as a float32 volume); anything else is cast to float32 here."""
    image = np.asarray(image)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) not in (2, 3):
        raise InferenceError(f"Spacing must have 2 or 3 entries (one per spatial axis), got {spacing}.")
    if image.ndim == len(spacing):
        image = image[None]
    elif image.ndim != len(spacing) + 1:
        raise InferenceError(
            f"Image of shape {image.shape} does not match a {len(spacing)}D spacing {spacing}: expected "
            f"{len(spacing)} spatial axes, optionally after a channel axis."
        )
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InferenceError(f"Spacing must be finite and positive, got {spacing}.")
    if image.dtype.kind == "c":
        raise InferenceError("The image holds complex values; take the magnitude (np.abs) or the real part first.")
    if image.dtype.kind not in "biuf":
        image = image.astype(np.float32)
    return image, spacing


__all__ = ["DomainError", "InferenceError", "PredictionResult", "predict"]
