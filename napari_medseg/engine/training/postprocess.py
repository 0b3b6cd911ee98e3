"""Post-processing chosen on held-out data when training ends, as nnU-Net chooses it.

nnU-Net compares, on its validation cases, the Dice of each class with and without keeping only
the largest connected component, and applies the step at inference only where it does not lower
the Dice. A model trained on a few painted slices has such held-out data: the painted slices kept
out of training (:func:`~napari_medseg.engine.data.painted.hold_out_slices`). Its false positives
lie mostly in slices far from the paint (look-alike tissue the model never saw labelled), which
the largest-component step removes: on five painted slices of a CT it is the difference between
0.76 and 0.93 mean Dice on the other slices (``benchmarks/bench_finetune.py``). A class made of
several pieces (two kidneys as one class) loses a piece on a held-out slice, and the step stays off.

:func:`choose_largest_component` predicts the held-out case with the trained network on the plan's
grid as Segment would (with its test-time mirroring: without it, a five-slice CT run saw a false
positive outgrow the right kidney and chose wrongly), scores both labelings on the held-out voxels
and, when no class loses, records :data:`~napari_medseg.engine.checkpoints.fields.LARGEST_COMPONENT`
in the final checkpoint (Segment then checks *Keep the largest component* for it; the user can
still turn it off). A run that
inherited its parent's post-processing (a correction) keeps the parent's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Generator

import numpy as np
import torch

from napari_medseg.engine.checkpoints import load_checkpoint
from napari_medseg.engine.checkpoints.build import write_checkpoint
from napari_medseg.engine.checkpoints.fields import LARGEST_COMPONENT, POSTPROCESSING
from napari_medseg.engine.evaluation.metrics import dice_per_class, nan_mean
from napari_medseg.engine.inference.inferers import tta_mirror_axes
from napari_medseg.engine.inference.postprocessing import keep_largest_component
from napari_medseg.engine.inference.sliding_window import sliding_window
from napari_medseg.engine.jobs import Message, Progress

logger = logging.getLogger(__name__)

#: A class may lose this much held-out Dice to the step and still count as "not lowered" (rounding).
TOLERANCE = 1e-6


def held_out_dice(labels: np.ndarray, reference: np.ndarray, counted: np.ndarray, classes) -> dict[int, float]:
    """Dice per class on the ``counted`` voxels (NaN for a class in neither)."""
    return dice_per_class(labels[counted], reference[counted], classes)


def step_helps(before: dict[int, float], after: dict[int, float]) -> bool:
    """Whether keeping the largest component lowers no class's Dice (classes absent in both: no vote)."""
    scored = [c for c in before if not (np.isnan(before[c]) and np.isnan(after[c]))]
    return bool(scored) and all(np.nan_to_num(after[c]) >= np.nan_to_num(before[c]) - TOLERANCE for c in scored)


def choose_largest_component(trainer, final: str) -> Generator[Progress | Message, None, str]:
    """After a run validated on held-out painted slices: record in ``final`` whether Segment should
    keep the largest component of each class (see the module docstring). Returns ``final``."""
    data, cfg = trainer.data, trainer.config
    if trainer.validation_kind != "held-out slices" or trainer.world_size > 1:
        return final
    if any(key in data.extra for key in POSTPROCESSING):  # a correction keeps its parent's rules
        return final
    case = data.val_cases[0]
    classes = range(1, data.plan.num_classes)
    try:
        ckpt = load_checkpoint(final)
        model = trainer.unwrapped_model.eval()
        image = torch.from_numpy(np.ascontiguousarray(case.image))
        # as Segment predicts, mirroring included: which blob is the largest can hinge on it
        logits = yield from sliding_window(model, image, data.plan.patch_size, data.plan.num_classes,
                                           mirror_axes=tta_mirror_axes(ckpt), device=trainer.device,
                                           accumulate_device="cpu")
        labels = logits.argmax(0).numpy()
        counted = case.label != cfg.ignore_label
        before = held_out_dice(labels, case.label, counted, classes)
        after = held_out_dice(keep_largest_component(labels, classes), case.label, counted, classes)
    except Exception as err:  # noqa: BLE001 - a choice of post-processing never fails a finished run
        logger.warning("Could not choose the post-processing: %s", err, exc_info=True)
        yield Message(f"Could not choose the post-processing on the held-out slices ({err}); none recorded.",
                      "warning")
        return final
    keep = step_helps(before, after)
    mean = [nan_mean(list(d.values())) for d in (before, after)]
    yield Message(
        f"Held-out slices: mean Dice {mean[0]:.3f}, {mean[1]:.3f} keeping the largest component of each class: "
        + ("Segment will keep it (turn 'Keep the largest component' off to see everything)." if keep
           else "not kept (a class lost Dice).")
    )
    if keep:
        write_checkpoint(dataclasses.replace(ckpt, extra={**ckpt.extra, LARGEST_COMPONENT: True}), final)
    return final


__all__ = ["choose_largest_component", "held_out_dice", "step_helps"]
