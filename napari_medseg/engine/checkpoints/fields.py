"""The optional fields of a checkpoint that describe its training data: ``orientation`` and ``domain``.

Both are absent from checkpoints written before they existed (and from the shipped one); a missing
field loads as ``None``, which means "unknown": no reorientation, no domain check.

``orientation``
    The axis codes (napari order, e.g. ``"SAR"`` for an axis-aligned RAS+ NIfTI; see
    :mod:`napari_medseg.engine.preprocessing.orientation`) of the layout the model was trained in.
    Prediction with a known image affine reorients the image to it, and the result back.

``domain``
    What the training images looked like, so that prediction can warn about an image far outside
    it (:func:`napari_medseg.engine.inference.domain.check_domain`). A plain dict::

        {"modality": "T1" | "CT" | None,            # dataset.json channel names, when known
         "spacing_mm": [[min per axis], [max per axis]],        # napari order, training layout
         "field_of_view_mm": [[min per axis], [max per axis]],
         "intensity_percentiles": {"0.5": .., "50": .., "99.5": ..},  # raw foreground, channel 0
         "strongly_negative_fraction": 0.0,     # whole images, channel 0 (see inference.domain)
         "channels": [{"intensity_percentiles": {...}, "strongly_negative_fraction": ..}, ...],
         "num_cases": 12}

    Every key is optional (``channels`` lists every channel of a multi-channel model); unknown
    keys are kept, so later versions may add some.

``extra`` keys that prediction reads (:data:`PAIRED_CLASSES`, :data:`LARGEST_COMPONENT`,
:data:`LARGEST_FOREGROUND`): the post-processing the checkpoint recommends, applied unless the user
says otherwise (see ``engine.inference.inferers.clean_labels``); :data:`CLASS_WEIGHTS`: the
factors on the softmax before the argmax (see ``engine.evaluation.calibration``).
"""

from __future__ import annotations

import math
from typing import Any

from napari_medseg.engine.checkpoints.plain import CheckpointError

__all__ = [
    "CLASS_WEIGHTS",
    "LARGEST_COMPONENT",
    "LARGEST_FOREGROUND",
    "PAIRED_CLASSES",
    "POSTPROCESSING",
    "check_domain_field",
    "check_orientation_field",
]

#: ``Checkpoint.extra`` key: classes that hold a left and a right structure in one class, for the
#: largest-component rule (one component per side; see ``keep_largest_component``).
PAIRED_CLASSES = "paired_classes"
#: ``Checkpoint.extra`` key: whether its labels should keep only the largest component of each
#: class (per side for paired classes) unless the user says otherwise, like the post-processing
#: nnU-Net decides on validation and applies by default.
LARGEST_COMPONENT = "largest_component"
#: ``Checkpoint.extra`` key: with the largest-component step, first keep the main component of
#: the foreground as a whole (all classes as one; per side with paired classes).
LARGEST_FOREGROUND = "largest_foreground_component"
#: ``Checkpoint.extra`` key: one positive factor per class (background first) that multiplies the
#: mean softmax before the argmax, i.e. adds ``log(factor)`` to each class's logit: a correction of
#: the class priors fitted after training (e.g. so that predicted volumes match the reference on
#: the training data, :func:`napari_medseg.engine.evaluation.fit_class_weights`). Returned
#: probabilities stay the model's own.
CLASS_WEIGHTS = "class_weights"
#: The ``extra`` keys that describe the labels' shape rather than the weights (one piece per class
#: and side): a fine-tune on the same classes keeps them; :data:`CLASS_WEIGHTS`, fitted to one set
#: of weights, it does not (``engine.training.correction.inherited_extra``).
POSTPROCESSING = (PAIRED_CLASSES, LARGEST_COMPONENT, LARGEST_FOREGROUND)

_PAIRS = ("RL", "AP", "SI")


def check_orientation_field(value: Any) -> str | None:
    """``value`` if it is ``None`` or 2-3 axis codes (each world axis once), else raise CheckpointError."""
    if value is None:
        return None
    if not isinstance(value, str) or not 2 <= len(value) <= 3:
        raise CheckpointError(f"Checkpoint field 'orientation' should be axis codes such as 'SAR', not {value!r}.")
    axes = [next((i for i, pair in enumerate(_PAIRS) if c in pair), None) for c in value]
    if None in axes or len(set(axes)) != len(axes):
        raise CheckpointError(f"Checkpoint field 'orientation' {value!r} is not a set of axis codes (R/L, A/P, S/I).")
    return value


def _number(value: Any, where: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"Checkpoint field domain.{where} should be a finite number, not {value!r}.")


def _range(value: Any, where: str) -> None:
    ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, list) for v in value)
    if not ok or len(value[0]) != len(value[1]) or not 2 <= len(value[0]) <= 3:
        raise CheckpointError(f"Checkpoint field domain.{where} should be [[min per axis], [max per axis]].")
    for i, v in enumerate(value[0] + value[1]):
        _number(v, f"{where}[{i}]", allow_none=False)


def _intensity(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise CheckpointError(f"Checkpoint field domain.{where} should be a dict.")
    percentiles = value.get("intensity_percentiles", {})
    if not isinstance(percentiles, dict):
        raise CheckpointError(f"Checkpoint field domain.{where}intensity_percentiles should be a dict.")
    for key, v in percentiles.items():
        _number(v, f"{where}intensity_percentiles[{key!r}]")
    fraction = value.get("strongly_negative_fraction")
    _number(fraction, f"{where}strongly_negative_fraction")
    if fraction is not None and not 0 <= fraction <= 1:
        raise CheckpointError(f"Checkpoint field domain.{where}strongly_negative_fraction must be in [0, 1].")


def check_domain_field(value: Any) -> dict | None:
    """``value`` if it is ``None`` or a domain dict of the documented shape, else raise CheckpointError."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f"Checkpoint field 'domain' should be a dict or None, not {type(value).__name__}.")
    modality = value.get("modality")
    if modality is not None and not isinstance(modality, str):
        raise CheckpointError("Checkpoint field domain.modality should be a string or None.")
    for key in ("spacing_mm", "field_of_view_mm"):
        if value.get(key) is not None:
            _range(value[key], key)
    _intensity(value, "")
    channels = value.get("channels")
    if channels is not None:
        if not isinstance(channels, list):
            raise CheckpointError("Checkpoint field domain.channels should be a list (one dict per channel).")
        for i, channel in enumerate(channels):
            _intensity(channel, f"channels[{i}].")
    return value
