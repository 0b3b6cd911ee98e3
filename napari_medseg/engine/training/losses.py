"""Dice + cross-entropy loss and deep supervision, as nnU-Net (v1) trains its U-Nets.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18, 2021.

The Dice term is ``1 - mean soft Dice`` (nnU-Net's ``SoftDiceLoss`` returns ``-mean soft Dice``; the
two differ by the constant 1, so gradients and optima are the same, but ours is >= 0 and a perfect
prediction gives a loss of about 0, which reads better in a loss curve).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_medseg.errors import MedsegError


class LossError(MedsegError, ValueError):
    """Logits and targets that do not fit together, or bad loss parameters."""


def _target_bk(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Target as ``(B, *spatial)`` long, checked against ``logits`` ``(B, K, *spatial)``."""
    if target.ndim == logits.ndim:
        if target.shape[1] != 1:
            raise LossError(f"Target must be (B, 1, *spatial) label indices, got {tuple(target.shape)}")
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise LossError(f"Target {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    return target.long()


class DiceCELoss(nn.Module):
    """Soft Dice (on softmax) plus cross-entropy.

    Args:
        batch_dice: Sum true/false positives over the batch before the Dice (nnU-Net's "batch Dice",
            used for 2D), instead of one Dice per sample averaged.
        ignore_label: Target value whose voxels count nowhere: ``ignore_index`` of the cross-entropy,
            and masked out of prediction and target in the Dice. May lie outside ``0..K-1``.
        smooth: Added to numerator and denominator of the Dice.
        do_bg: Include the background class (0) in the Dice.
        weight_ce: Weight of the cross-entropy term.
        weight_dice: Weight of the Dice term.

    Call with logits ``(B, K, *spatial)`` and target ``(B, 1, *spatial)`` (or ``(B, *spatial)``)
    integer labels; returns a scalar.
    """

    def __init__(
        self,
        batch_dice: bool = False,
        ignore_label: int | None = None,
        smooth: float = 1e-5,
        do_bg: bool = False,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
    ) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label
        self.smooth = float(smooth)
        self.do_bg = do_bg
        self.weight_ce = float(weight_ce)
        self.weight_dice = float(weight_dice)

    def soft_dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-class soft Dice, ``(K',)`` with ``batch_dice`` else ``(B, K')`` (K' drops background)."""
        target = _target_bk(target, logits)
        num_classes = logits.shape[1]
        probs = torch.softmax(logits.float(), dim=1)
        if self.ignore_label is not None:
            valid = (target != self.ignore_label)
            target = torch.where(valid, target, torch.zeros_like(target))
            valid = valid.unsqueeze(1).to(probs.dtype)
        else:
            valid = None
        if target.numel() and (int(target.max()) >= num_classes or int(target.min()) < 0):
            raise LossError(
                f"Target values must be in 0..{num_classes - 1} (or the ignore label), "
                f"found {int(target.min())}..{int(target.max())}"
            )
        onehot = F.one_hot(target, num_classes).movedim(-1, 1).to(probs.dtype)
        if valid is not None:
            probs = probs * valid
            onehot = onehot * valid
        axes = tuple(range(2, logits.ndim))
        if self.batch_dice:
            axes = (0, *axes)
        tp = (probs * onehot).sum(axes)
        fp = (probs * (1 - onehot)).sum(axes)  # probs are 0 at ignored voxels
        fn = ((1 - probs) * onehot).sum(axes)
        dice = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth + 1e-8)
        return dice if self.do_bg else dice[..., 1:]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target_bk = _target_bk(target, logits)
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.weight_dice:
            loss = loss + self.weight_dice * (1.0 - self.soft_dice(logits, target_bk).mean())
        if self.weight_ce:
            if self.ignore_label is None:
                ce = F.cross_entropy(logits.float(), target_bk)
            else:
                total = F.cross_entropy(logits.float(), target_bk, ignore_index=self.ignore_label,
                                        reduction="sum")
                ce = total / (target_bk != self.ignore_label).sum().clamp_min(1)
            loss = loss + self.weight_ce * ce
        return loss


def deep_supervision_weights(n_heads: int) -> list[float]:
    """nnU-Net's deep-supervision weights: ``1/2^i``, the lowest-resolution head 0, normalised to 1."""
    if n_heads < 1:
        raise LossError(f"n_heads must be >= 1, got {n_heads}")
    if n_heads == 1:
        return [1.0]
    w = [1.0 / 2**i for i in range(n_heads)]
    w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def downsample_targets(
    target: torch.Tensor,
    shapes: Sequence[Sequence[int]] | None = None,
    *,
    scales: Sequence[Sequence[float] | float] | None = None,
) -> list[torch.Tensor]:
    """Nearest-neighbour downsampled copies of a label target, one per deep-supervision head.

    Args:
        target: ``(B, 1, *spatial)`` labels.
        shapes: Spatial shape of every head's output (e.g. ``[o.shape[2:] for o in outputs]``).
        scales: Instead of ``shapes``: a scale per head (a number or one per axis, 1 = full size).

    Returns:
        A list of ``(B, 1, *shape)`` tensors with ``target``'s dtype; an entry of full size is
        ``target`` itself.
    """
    if (shapes is None) == (scales is None):
        raise LossError("Give exactly one of shapes or scales")
    spatial = tuple(target.shape[2:])
    if shapes is None:
        shapes = []
        for s in scales:
            s = [float(s)] * len(spatial) if isinstance(s, (int, float)) else [float(v) for v in s]
            shapes.append(tuple(max(1, int(round(n * f))) for n, f in zip(spatial, s)))
    out = []
    for shape in shapes:
        shape = tuple(int(v) for v in shape)
        if len(shape) != len(spatial):
            raise LossError(f"Shape {shape} does not have {len(spatial)} spatial axes")
        if shape == spatial:
            out.append(target)
        else:
            small = F.interpolate(target.float(), size=shape, mode="nearest-exact")
            out.append(small.to(target.dtype))
    return out


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over deep-supervision heads; heads with weight 0 are skipped.

    Args:
        loss: Loss of one head, ``loss(logits, target)``.
        weights: One weight per head, full resolution first (see :func:`deep_supervision_weights`);
            ``None`` uses ``deep_supervision_weights(number of heads)`` at every call.

    Call with a list of logits and a list of targets (full resolution first); a single tensor of
    logits (a model in eval mode) is passed to ``loss`` with the first target.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs, targets) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, targets[0] if isinstance(targets, (list, tuple)) else targets)
        if isinstance(targets, torch.Tensor):
            targets = downsample_targets(targets, [o.shape[2:] for o in outputs])
        weights = deep_supervision_weights(len(outputs)) if self.weights is None else self.weights
        if not (len(outputs) == len(targets) == len(weights)):
            raise LossError(f"{len(outputs)} outputs, {len(targets)} targets and {len(weights)} "
                            "weights must be as many")
        total = None
        for w, o, t in zip(weights, outputs, targets):
            if w == 0:
                continue
            term = w * self.loss(o, t)
            total = term if total is None else total + term
        return total if total is not None else outputs[0].sum() * 0.0
