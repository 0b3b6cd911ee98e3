"""The nnU-Net (v1) cascade: a full-resolution U-Net that also sees the low-resolution prediction.

Isensee et al., "nnU-Net", Nature Methods 18, 2021: the ``3d_cascade_fullres`` stage takes the image
channels plus the one-hot (``num_classes - 1`` channels) of the ``3d_lowres`` stage's segmentation,
resampled to the full-resolution grid. During training that segmentation is perturbed (random
binary morphology per class, random removal of connected components) so that the second stage
learns to correct the first.

The low-res checkpoint is copied beside the cascade's checkpoints as ``previous_stage.pt`` and the
cascade checkpoint names it in ``train_config["variant_options"]["previous_stage"]``; :func:`previous_stage_checkpoint`
finds it again at inference.

At inference the cascade plugs into the default sliding-window inferer through its input-stage
extension point: :class:`CascadeInput` (registered here) applies to plans with
``plan.extras["previous_stage"]``, runs the previous stage, and appends its one-hot to the image
channels; each cascade checkpoint gets its own input (its previous stage is its own).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from napari_medseg.engine.checkpoints import Checkpoint, CheckpointError, load_checkpoint
from napari_medseg.engine.inference.config import PredictConfig
from napari_medseg.engine.inference.predict import predict
from napari_medseg.engine.inference.window_inferer import InputStage, register_input_stage
from napari_medseg.engine.jobs import Progress, relay
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.preprocessing import CaseProperties, preprocess_case

PREVIOUS_STAGE_FILE = "previous_stage.pt"


def is_cascade(plan: Plan) -> bool:
    """Whether ``plan`` is a cascade stage (it needs a previous stage's segmentation)."""
    return bool(plan.extras.get("previous_stage"))


def previous_stage_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """The low-res checkpoint that a cascade checkpoint builds on (beside it, or at its recorded path)."""
    options = ckpt.train_config.get("variant_options") or {}
    recorded = options.get("previous_stage") or ckpt.train_config.get("previous_stage")  # older runs
    candidates = []
    if ckpt.path:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(ckpt.path)), PREVIOUS_STAGE_FILE))
    if recorded:
        candidates.append(str(recorded))
    for path in candidates:
        if os.path.isfile(path):
            return load_checkpoint(path)
    raise CheckpointError(
        "This cascade checkpoint needs its low-resolution stage, which was not found "
        f"(looked for {', '.join(candidates) or PREVIOUS_STAGE_FILE}). Keep {PREVIOUS_STAGE_FILE} beside it."
    )


def previous_stage_labels(
    image: np.ndarray, spacing: Sequence[float], previous: Checkpoint, config: PredictConfig | dict | None = None,
    **overrides: Any,
) -> Generator[Progress, None, np.ndarray]:
    """Segment ``image`` (source geometry) with the previous stage; returns its labels.

    ``config`` and ``overrides`` are :func:`~napari_medseg.engine.inference.predict`'s; the
    previous stage's events are yielded with their stage prefixed by ``"previous stage "``.
    """
    def prefixed(event: Progress) -> Progress:
        return Progress(f"previous stage {event.stage}", event.current, event.total, event.message)

    result = yield from relay(predict(image, spacing, [previous], config, **overrides), prefixed)
    return result.labels


def cascade_input(
    image: np.ndarray, spacing, plan: Plan, previous_labels: np.ndarray, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, object]:
    """Preprocess ``image`` with the cascade plan and append the previous stage's one-hot channels.

    Returns ``(input (C + K - 1, *grid), label on the grid or None, CaseProperties)``.
    """

    pre, lab, props = preprocess_case(image, spacing, plan, label=label)
    _, prev, _ = preprocess_case(image, spacing, plan, label=np.asarray(previous_labels))
    onehot = np.stack([(prev == c) for c in range(1, plan.num_classes)]).astype(np.float32)
    return np.concatenate([pre, onehot]), lab, props


class CascadeInput(InputStage):
    """The cascade's input stage of the sliding-window inferer (see the module docstring)."""

    name = "cascade"

    def applies(self, plan: Plan) -> bool:
        """Plans of a cascade stage (:func:`is_cascade`)."""
        return is_cascade(plan)

    def group_key(self, plan: Plan, ckpt: Checkpoint, index: int) -> str:
        """The plan, and the checkpoint itself: a cascade's input depends on its own previous stage."""
        return super().group_key(plan, ckpt, index) + str(ckpt.path or index)

    def prepare(
        self, image: np.ndarray, spacing: tuple[float, ...], plan: Plan, ckpt: Checkpoint, config: PredictConfig
    ) -> Generator[Progress, None, tuple[np.ndarray, CaseProperties]]:
        """The low-res stage first (same device, mirroring, step and batch size), then
        :func:`cascade_input`."""
        prev = yield from previous_stage_labels(
            image, spacing, previous_stage_checkpoint(ckpt), device=config.device, mirror=config.mirror,
            step=config.step, batch_size=config.batch_size,
        )
        pre, _, props = cascade_input(image, spacing, plan, prev)
        return pre, props


register_input_stage(CascadeInput())


__all__ = [
    "PREVIOUS_STAGE_FILE",
    "CascadeInput",
    "cascade_input",
    "is_cascade",
    "previous_stage_checkpoint",
    "previous_stage_labels",
]
