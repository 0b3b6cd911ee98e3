"""Online validation during training: nnU-Net's pooled "pseudo Dice" and early stopping.

Isensee et al., "nnU-Net", Nature Methods 18, 2021: TP / FP / FN are summed over all validation
patches of an epoch before the Dice is taken, so small patches without a class do not count as
Dice 0 (or 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from napari_medseg.engine.data import PatchSampler
from napari_medseg.engine.runtime import distributed as ddp


class DiceCounts:
    """Per-class TP / FP / FN pooled over validation batches, and the Dice they give.

    Args:
        num_classes: Classes including background (class 0 is not counted).
    """

    def __init__(self, num_classes: int):
        self.tp = torch.zeros(num_classes, dtype=torch.float64)
        self.fp = torch.zeros_like(self.tp)
        self.fn = torch.zeros_like(self.tp)

    def add(self, pred: torch.Tensor, ref: torch.Tensor, ignore_label: int | None = None) -> None:
        """Count a batch of predicted and reference label maps (voxels with ``ignore_label`` skipped)."""
        valid = ref != ignore_label if ignore_label is not None else torch.ones_like(ref, dtype=torch.bool)
        for c in range(1, len(self.tp)):
            p, r = (pred == c) & valid, (ref == c) & valid
            self.tp[c] += float((p & r).sum())
            self.fp[c] += float((p & ~r).sum())
            self.fn[c] += float((~p & r).sum())

    def dice(self, label_names: dict[int, str]) -> dict[str, float]:
        """Dice per foreground class, by name (NaN where the class is absent from both)."""
        out = {}
        for c in range(1, len(self.tp)):
            denom = 2 * self.tp[c] + self.fp[c] + self.fn[c]
            out[label_names.get(c, f"class_{c}")] = float(2 * self.tp[c] / denom) if denom > 0 else float("nan")
        return out


def should_stop_early(history: Sequence[dict], patience: int | None) -> bool:
    """Whether the last ``patience`` epochs brought no validation loss below the best before them.

    Args:
        history: One dict per finished epoch (``EpochEnd`` as a dict), with ``val_loss``.
        patience: Epochs without a lower validation loss; ``None`` or 0: never stop early.
    """
    losses = [h.get("val_loss") for h in history if h.get("val_loss") is not None]
    if not patience or len(losses) <= patience:
        return False
    return min(losses[-patience:]) >= min(losses[:-patience])


@torch.no_grad()
def validate_on_patches(trainer) -> tuple[float | None, dict[str, float]]:
    """The base trainer's validation: loss and pooled Dice over ``val_batches`` fixed patch batches.

    The patches come from a sampler with a fixed seed, so every epoch sees the same ones. Batches
    go through ``trainer.prepare_batch(..., train=False)`` and the bare network (no DDP collectives
    in evaluation); in a distributed run the loss and TP/FP/FN are then pooled over ranks.
    """
    cfg = trainer.config
    if cfg.val_batches <= 0:
        return None, {}
    trainer.model.eval()
    sampler = PatchSampler(
        trainer.data.val_cases, trainer.plan.patch_size, trainer.plan.batch_size,
        oversample_foreground=cfg.oversample_foreground, seed=trainer.val_sampler_seed,
        ignore_label=cfg.ignore_label,
    )
    counts = DiceCounts(trainer.num_classes)
    base = trainer.loss_fn.loss if hasattr(trainer.loss_fn, "loss") else trainer.loss_fn
    losses = []
    for _ in range(cfg.val_batches):
        images, labels = trainer.prepare_batch(*sampler.sample(), train=False)
        with torch.autocast(trainer.device.type, dtype=torch.float16, enabled=trainer.amp):
            out = trainer.unwrapped_model(images)
            if isinstance(out, (list, tuple)):
                out = out[0]
            losses.append(float(base(out, labels)))
        counts.add(out.argmax(1), labels[:, 0], cfg.ignore_label)
    if trainer.world_size > 1:
        counts.tp, counts.fp, counts.fn = ddp.all_reduce_sum(counts.tp, counts.fp, counts.fn)
    return ddp.all_reduce_mean(float(np.mean(losses))), counts.dice(trainer.data.label_names)


__all__ = ["DiceCounts", "should_stop_early", "validate_on_patches"]
