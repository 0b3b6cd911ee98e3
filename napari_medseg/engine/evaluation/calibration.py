"""Class-prior calibration: factors on the softmax so that predicted volumes match the references.

A network trained on labels resampled to a coarser grid, or on few subjects, can be biased towards
a class: on its own training subject it already predicts a structure 10-15 % larger than the
reference. Multiplying class ``k``'s softmax by ``w_k`` before the argmax (adding ``log w_k`` to
its logit) moves every boundary of that class the same way; :func:`fit_class_weights` finds the
factors that make the predicted volume of every class equal its reference volume on the cases
given (the training cases: nothing held out is looked at), and a checkpoint carries them in
``extra["class_weights"]`` (``engine.checkpoints.fields.CLASS_WEIGHTS``), which prediction applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from napari_medseg.engine.evaluation.metrics import EvaluationError
from napari_medseg.engine.inference.postprocessing import argmax_labels

__all__ = ["class_volumes", "fit_class_weights"]


def class_volumes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Voxel count of every class ``0..num_classes-1`` in ``labels``."""
    return np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=num_classes)[:num_classes]


def fit_class_weights(
    probabilities: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    clean: Callable[[np.ndarray], np.ndarray] | None = None,
    iterations: int = 20,
    tolerance: float = 0.01,
    max_step: float = 4.0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Factors ``w`` (background's 1) so that ``argmax(p * w)`` has each class's reference volume.

    Iterated over all cases together: ``log w_k -= g_k * log(V_pred,k / V_ref,k)``, with a gain
    ``g_k`` per class that doubles while the class stays on the same side of its volume and halves
    when it crosses (a confident softmax needs factors far from the volume ratio); each step is
    bounded by ``max_step`` either way, so a class the labels lack cannot run away. It stops when
    every class is within ``tolerance`` of its volume or ``iterations`` are done.

    Args:
        probabilities: One mean softmax ``(K, *spatial)`` per case.
        references: The cases' reference label maps (``*spatial``, values ``0..K-1``).
        clean: What prediction does to labels after the argmax (e.g. the checkpoint's
            largest-component step), so that the volumes compared are those a user gets.
        iterations, tolerance, max_step: As above.

    Returns:
        ``(weights, history)``: the factors (float64 ``(K,)``) and the predicted/reference volume
        ratio of every class at each step (the first with no weights).

    Raises:
        EvaluationError: no cases, or a case whose probabilities and reference disagree in shape.
    """
    if not probabilities or len(probabilities) != len(references):
        raise EvaluationError("fit_class_weights needs one reference per probability map, and at least one.")
    num_classes = probabilities[0].shape[0]
    for p, r in zip(probabilities, references, strict=True):
        if p.shape[0] != num_classes or p.shape[1:] != np.shape(r):
            raise EvaluationError(
                f"Probabilities {p.shape} do not fit a reference of shape {np.shape(r)} with {num_classes} classes."
            )
    reference = sum(class_volumes(r, num_classes) for r in references).astype(np.float64)
    weights = np.ones(num_classes)
    gain = np.ones(num_classes)
    history: list[np.ndarray] = []
    for step in range(iterations + 1):
        predicted = np.zeros(num_classes)
        for p in probabilities:
            labels = argmax_labels(p, weights=weights)
            predicted += class_volumes(labels if clean is None else clean(labels), num_classes)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(reference > 0, predicted / np.maximum(reference, 1), np.nan)
        history.append(ratio)
        fg = ratio[1:]
        if step == iterations or np.all(np.isnan(fg) | (np.abs(fg - 1) <= tolerance)):
            break
        log_ratio = np.where(np.isnan(ratio), 0.0, np.log(np.clip(ratio, 1e-6, None)))
        if len(history) > 1:
            previous = np.nan_to_num(history[-2], nan=1.0)
            same_side = np.sign(previous - 1) == np.sign(np.nan_to_num(ratio, nan=1.0) - 1)
            gain = np.clip(np.where(same_side, gain * 2.0, gain * 0.5), 0.25, 16.0)
        step_ = np.clip(-gain * log_ratio, -np.log(max_step), np.log(max_step))
        step_[0] = 0.0
        weights = weights * np.exp(step_)
    return weights, history
