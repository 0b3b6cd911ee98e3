"""``predict``: segment an image with one checkpoint or an ensemble.

:func:`predict` checks the image, loads the checkpoints, asks the inferer registry
(:func:`~napari_medseg.engine.inference.inferers.select_inferer`) which inferer serves them and runs
it. It is a generator (DESIGN.md convention 2): it yields
:class:`~napari_medseg.engine.jobs.Progress` and *returns* a :class:`PredictionResult`, so closing
it cancels the job between tiles. Drive it with :func:`napari_medseg.engine.jobs.drive`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from napari_medseg.engine.checkpoints import Checkpoint, CheckpointError, load_checkpoint
from napari_medseg.engine.inference.config import InferenceError, PredictConfig
from napari_medseg.engine.inference.inferers import select_inferer
from napari_medseg.engine.inference.postprocessing import PredictionResult
from napari_medseg.engine.jobs import Progress

CheckpointsArg = Sequence[str | os.PathLike | Checkpoint] | str | os.PathLike | Checkpoint


def predict(
    image: np.ndarray,
    spacing: Sequence[float],
    checkpoints: CheckpointsArg,
    config: PredictConfig | dict | None = None,
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
        **overrides: :class:`PredictConfig` fields to change: ``device`` (``"auto"``, ``"cpu"``,
            ``"cuda:N"``, ``"mps"``), ``mirror`` (mirroring TTA), ``step`` (tile stride as a
            fraction of the patch), ``batch_size`` (tiles or slices per model call),
            ``largest_component``, ``return_probabilities`` (also the mean softmax
            ``(K, *spatial)``), ``return_uncertainty`` (normalised entropy of the mean softmax).

    Yields:
        ``Progress`` with stages ``"preprocess"``, ``"tiles"`` (one count over all checkpoints and
        mirrorings, total known up front) and ``"postprocess"``.

    Returns:
        :class:`PredictionResult`.

    Raises:
        InferenceError: unknown or invalid settings, or an image/spacing that do not match.
        CheckpointError: unreadable checkpoints, or an image they cannot take (checked before compute).
    """
    cfg = PredictConfig.build(config, **overrides)
    ckpts = _load_all(checkpoints)
    data, spacing = _as_channels_first(image, spacing)
    inferer = select_inferer(ckpts)
    return (yield from inferer.run(data, spacing, ckpts, cfg))


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
    if image.dtype.kind not in "biuf":
        image = image.astype(np.float32)
    return image, spacing


__all__ = ["InferenceError", "PredictionResult", "predict"]
