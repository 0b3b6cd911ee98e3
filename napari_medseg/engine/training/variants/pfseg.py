"""PFSeg's trainer variant (Wang et al., MICCAI 2021; ARCHITECTURES.md section 4).

:class:`PFSegTrainer` overrides the hooks PFSeg needs (convention 8): the loss
(:class:`~napari_medseg.engine.training.variants.pfseg_losses.PFSegLoss`), :meth:`~PFSegTrainer.train_step`
(LR input, guidance crop and mask, SR target), :meth:`~PFSegTrainer.validate` (whole volumes),
:meth:`~PFSegTrainer.lr_at` / :meth:`~PFSegTrainer.on_epoch_end` (ReduceLROnPlateau on the
validation Dice, patience 20, factor 0.1), :meth:`~PFSegTrainer.configure_plan` (the whole-volume
"patch"), :meth:`~PFSegTrainer.make_sampler` and :meth:`~PFSegTrainer.shrink_for_memory`. It
registers itself as the trainer of the ``pfseg`` model.

**Whole volumes instead of patches.** The "patch" is the whole preprocessed case: every case is
zero-padded centrally (labels with 0) to one run-wide shape, the largest case's shape per axis
rounded up to a multiple of 32 (:data:`~napari_medseg.engine.inference.variants.patchfree.HR_DIVISOR`), which is
stored as the plan's ``patch_size``. :class:`WholeVolumeSampler` draws ``batch_size`` cases (1 in
the paper) at random. A training step then builds, from the HR batch:

* the LR input: the batch downsampled 2x (trilinear);
* the guidance patch: its central crop, a quarter of each axis, and the mask of that region;
* the SR target: the HR batch min-max scaled to ``[0, 1]`` per sample, because the SR head ends in
  a ReLU (the paper's images are in ``[0, 1]``; the z-scored input has negative values).

The optimiser is Adam (lr 1e-4) from the model's recipe; gradients are clipped at
``config.grad_clip`` like every other trainer here. Ignore labels are not supported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from napari_medseg.engine.inference.variants.patchfree import (
    center_pad,
    center_pad_slices,
    downsample,
    guidance_crop,
    guidance_mask,
    whole_volume_grid,
)
from napari_medseg.engine.jobs import EpochEnd
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.runtime.oom import InsufficientMemoryError, release_memory
from napari_medseg.engine.training.config import TrainingError
from napari_medseg.engine.training.registry import register_trainer
from napari_medseg.engine.training.trainer import Trainer
from napari_medseg.engine.training.validation import DiceCounts
from napari_medseg.engine.training.variants.pfseg_losses import PFSegLoss, segmentation_loss
from napari_medseg.models import get_model_spec

logger = logging.getLogger(__name__)


def sr_target(hr: torch.Tensor) -> torch.Tensor:
    """``hr`` ``(B, C, *spatial)`` min-max scaled to ``[0, 1]`` per sample (constant: zeros)."""
    flat = hr.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (hr.ndim - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (hr.ndim - 1)))
    return (hr - lo) / (hi - lo).clamp_min(1e-8)


def whole_volume_shape(cases: Sequence) -> tuple[int, ...]:
    """The run-wide padded shape: the largest case per axis, rounded up to a multiple of 32.

    (See :func:`~napari_medseg.engine.inference.variants.patchfree.whole_volume_grid` for the one exception.)
    """
    shapes = np.array([c.image.shape[1:] for c in cases])
    return whole_volume_grid(shapes.max(axis=0).tolist())


class WholeVolumeSampler:
    """Batches of whole cases, zero-padded centrally to ``shape`` (the PFSeg "patch").

    Args:
        cases: Preprocessed cases ``(C, z, y, x)`` with labels.
        shape: Spatial shape every case is padded to (at least each case's shape).
        batch_size: Cases per batch, drawn at random with replacement.
        seed: Seed of the draw.
    """

    def __init__(self, cases: Sequence, shape: Sequence[int], batch_size: int, seed: int = 0) -> None:
        self.cases = list(cases)
        if not self.cases:
            raise ValueError("WholeVolumeSampler needs at least one case.")
        self.shape = tuple(int(s) for s in shape)
        too_big = [c.name for c in self.cases if any(a > b for a, b in zip(c.image.shape[1:], self.shape))]
        if too_big:
            raise ValueError(f"Cases {too_big[:3]} are larger than the whole-volume shape {self.shape}.")
        self.batch_size = int(batch_size)
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images float32 (B, C, *shape), labels int64 (B, 1, *shape))``."""
        idx = self.rng.integers(0, len(self.cases), self.batch_size)
        images, labels = [], []
        for i in idx:
            case = self.cases[int(i)]
            images.append(center_pad(torch.from_numpy(np.asarray(case.image, np.float32)), self.shape))
            lab = torch.from_numpy(np.asarray(case.label, np.int64))[None]
            labels.append(center_pad(lab, self.shape))
        return torch.stack(images), torch.stack(labels)


@register_trainer("pfseg", models=("pfseg",))
class PFSegTrainer(Trainer):
    """:class:`Trainer` for ``pfseg``: whole volumes, multi-task loss, plateau schedule.

    Raises:
        TrainingError: the run has an ignore label (partially annotated data is not supported).
    """

    def __init__(self, config, data):
        if config.ignore_label is not None:
            raise TrainingError("PFSeg does not support an ignore label (partially annotated data).")
        super().__init__(config, data)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=0.1, patience=int(self.recipe.get("plateau_patience", 20))
        )
        shape = tuple(self.plan.patch_size)
        self.messages.append(
            f"PFSeg trains on whole volumes padded to {'x'.join(map(str, shape))} (input "
            f"{'x'.join(str(s // 2) for s in shape)})."
        )

    @property
    def recipe(self) -> dict:
        """The model's training recipe (``ModelSpec.training``)."""
        return get_model_spec(self.config.model).training

    def configure_plan(self, plan: Plan) -> Plan:
        """A copy of ``plan`` whose "patch" is the run-wide whole-volume shape and batch the recipe's (1)."""
        shape = whole_volume_shape(list(self.data.train_cases) + list(self.data.val_cases))
        if self.config.patch_size is not None and tuple(self.config.patch_size) != shape:
            logger.info("PFSeg trains on whole volumes %s; patch_size %s is not used.", shape, self.config.patch_size)
        return replace(plan, patch_size=shape, batch_size=int(self.config.batch_size or self.recipe.get("batch_size", 1)))

    def make_sampler(self, patch: tuple[int, ...], batch_size: int) -> WholeVolumeSampler:
        """Whole (padded) cases: ``patch`` is the whole-volume shape."""
        return WholeVolumeSampler(self.data.train_cases, patch, batch_size, seed=self.sampler_seed)

    def shrink_for_memory(self, err: BaseException) -> str:
        """Out of memory: halve the batch; PFSeg cannot fall back to smaller patches."""
        if self.world_size > 1 or int(self.plan.batch_size) <= 1:
            raise InsufficientMemoryError(
                f"Out of memory on {self.device} training PFSeg on whole volumes "
                f"{'x'.join(map(str, self.plan.patch_size))} with batch {self.plan.batch_size} "
                f"({type(err).__name__}). PFSeg has no smaller patch to fall back to: use a device with "
                "more memory, or crop or downsample the cases."
            ) from err
        old = int(self.plan.batch_size)
        self.plan.batch_size = old // 2
        self.build_sampling(tuple(self.plan.patch_size), self.plan.batch_size)
        release_memory(self.device)
        text = f"Out of memory on {self.device}: halved the batch {old} -> {self.plan.batch_size}; training goes on."
        logger.warning(text)
        return text

    # ----------------------------------------------------------------- hooks
    def build_loss(self) -> PFSegLoss:
        """PFSeg's multi-task loss (segmentation, super-resolution, task fusion), whatever ``config.loss``."""
        if self.config.loss not in (None, "pfseg"):
            logger.info("PFSeg always uses its own multi-task loss; loss=%r is not used.", self.config.loss)
        return PFSegLoss()

    def lr_at(self, epoch: int) -> float:
        """The learning rate ReduceLROnPlateau has left in the optimiser."""
        return float(self.optimizer.param_groups[0]["lr"])

    def on_epoch_end(self, event: EpochEnd) -> None:
        """Record the epoch, then step the plateau schedule on its mean validation Dice."""
        super().on_epoch_end(event)
        dice = event.mean_dice
        if dice is not None and math.isfinite(dice):
            self.scheduler.step(dice)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One step: the LR input, the guidance crop and mask, and the SR target from the HR batch."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        mask = guidance_mask(images.shape[2:], device=images.device)
        target = sr_target(images)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            seg, sr = self.model(downsample(images), guidance_crop(images))
            loss = self.loss_fn(seg, sr, labels, target, mask)
        return self.optimize(loss)

    @torch.no_grad()
    def validate(self) -> tuple[float | None, dict[str, float]]:
        """Segmentation loss and per-class Dice (TP/FP/FN pooled) over whole validation cases.

        Under torchrun every rank validates the same cases with the same weights, so all ranks take
        the same plateau, best-checkpoint and early-stopping decisions without a collective.
        """
        if self.config.val_batches <= 0:
            return None, {}
        self.model.eval()
        counts = DiceCounts(self.num_classes)
        losses = []
        for case in self.data.val_cases[: self.config.val_batches]:
            image = torch.from_numpy(np.asarray(case.image, np.float32))
            spatial = tuple(image.shape[1:])
            shape = whole_volume_grid(spatial)
            inside = (slice(None), slice(None), *center_pad_slices(spatial, shape))
            hr = center_pad(image, shape)[None].to(self.device)
            label = torch.from_numpy(np.asarray(case.label, np.int64))[None, None].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                out = self.unwrapped_model(downsample(hr), guidance_crop(hr))
            logits = (out[0] if isinstance(out, (tuple, list)) else out)[inside].float()
            losses.append(float(segmentation_loss(logits, label)))
            counts.add(logits.argmax(1).cpu(), label[:, 0].cpu())
        return float(np.mean(losses)), counts.dice(self.data.label_names)


__all__ = ["PFSegTrainer", "WholeVolumeSampler", "sr_target", "whole_volume_shape"]
