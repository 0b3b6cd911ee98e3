"""PFSeg's losses (Wang et al., MICCAI 2021; ARCHITECTURES.md section 4) as plain functions.

Total loss of one batch::

    seg_loss(seg_logits, labels)                       # Dice (p 2, smooth 1) + BCE / CE
    + 0.5 * (MSE(sr, hr) + MSE(mask * sr, mask * hr))  # SR + self-supervised guidance
    + 0.5 * (MSE(fg * sr, lab * hr) + affinity(fg * sr, lab * hr))   # task fusion

``fg`` is the predicted foreground probability and ``lab`` the binary foreground mask of the
labels; ``mask`` marks the HR guidance region. Multi-class generalisation (documented choice):
with ``K >= 2`` logits the segmentation loss is the softmax Dice over the foreground classes plus
cross-entropy, and ``fg = 1 - p(background)``. For ``K == 2`` this equals the paper's sigmoid
Dice + BCE on the logit difference; ``K == 1`` is the paper's single sigmoid channel. The Dice
numerator carries the usual factor 2 (the public code's ``sum(p*t) + 1`` without it caps the
Dice at 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(
    probs: torch.Tensor, target: torch.Tensor, p: float = 2.0, smooth: float = 1.0
) -> torch.Tensor:
    """``1 - (2 sum(x y) + s) / (sum(x^p) + sum(y^p) + s)`` per sample and channel, averaged.

    Args:
        probs: Probabilities ``(B, C, *spatial)``.
        target: Same shape, values in ``[0, 1]`` (one-hot or binary masks).
        p: Exponent of the denominator terms (2 in PFSeg).
        smooth: Added to numerator and denominator (1 in PFSeg).
    """
    if probs.shape != target.shape:
        raise ValueError(f"Dice needs equal shapes, got {tuple(probs.shape)} and {tuple(target.shape)}.")
    x = probs.flatten(2).float()
    y = target.flatten(2).float()
    num = 2.0 * (x * y).sum(-1) + smooth
    den = x.pow(p).sum(-1) + y.pow(p).sum(-1) + smooth
    return (1.0 - num / den).mean()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice (p 2, smooth 1) + BCE for one logit channel; softmax Dice (foreground) + CE for ``K >= 2``.

    Args:
        logits: ``(B, K, *spatial)``.
        labels: Integer labels ``(B, 1, *spatial)`` (or ``(B, *spatial)``), values in ``[0, K)``
            (``{0, 1}`` when ``K == 1``).
    """
    if labels.ndim == logits.ndim:
        labels = labels[:, 0]
    labels = labels.long()
    k = logits.shape[1]
    if k == 1:
        target = labels.unsqueeze(1).to(logits.dtype)
        return soft_dice_loss(torch.sigmoid(logits), target) + F.binary_cross_entropy_with_logits(
            logits.float(), target.float()
        )
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels, k).movedim(-1, 1).to(probs.dtype)
    dice = soft_dice_loss(probs[:, 1:], onehot[:, 1:])
    return dice + F.cross_entropy(logits.float(), labels)


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """Foreground probability ``(B, 1, *spatial)``: sigmoid of one channel, else ``1 - p(background)``."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits.float())
    return 1.0 - torch.softmax(logits.float(), dim=1)[:, :1]


def guidance_sr_loss(sr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``MSE(sr, hr) + MSE(mask * sr, mask * hr)``: SR loss plus the self-supervised guidance loss."""
    return F.mse_loss(sr.float(), hr.float()) + F.mse_loss((mask * sr).float(), (mask * hr).float())


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    # AvgPool3d(size) as in the paper; an axis shorter than ``size`` is pooled whole.
    kernel = tuple(min(size, s) for s in x.shape[2:])
    return F.avg_pool3d(x.float(), kernel, stride=kernel)


def affinity_loss(a: torch.Tensor, b: torch.Tensor, pool: int = 10) -> torch.Tensor:
    """L1 between voxel-affinity Gram matrices of AvgPool3d(``pool``)-reduced maps.

    With ``F_a`` the pooled ``a`` reshaped to ``(B, C, N)`` (``N`` pooled voxels), the affinity is
    ``G_a = F_a^T F_a`` (``N x N``). Returns ``sum |G_a - G_b| / ((H * W)^2 * B)`` where ``H, W``
    are the last two axes of the pooled map (as the paper's 2D-derived normalisation).
    """
    if a.shape != b.shape:
        raise ValueError(f"affinity_loss needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}.")
    pa, pb = _pool(a, pool), _pool(b, pool)
    h, w = pa.shape[-2], pa.shape[-1]
    fa, fb = pa.flatten(2), pb.flatten(2)
    ga = fa.transpose(1, 2) @ fa
    gb = fb.transpose(1, 2) @ fb
    return (ga - gb).abs().sum() / (float(h * w) ** 2 * a.shape[0])


def task_fusion_loss(
    fg: torch.Tensor, sr: torch.Tensor, fg_label: torch.Tensor, hr: torch.Tensor, pool: int = 10
) -> torch.Tensor:
    """``MSE(fg * sr, lab * hr) + affinity_loss(fg * sr, lab * hr)`` (the task-fusion module)."""
    pred = fg * sr
    ref = fg_label.to(hr.dtype) * hr
    return F.mse_loss(pred.float(), ref.float()) + affinity_loss(pred, ref, pool)


class PFSegLoss(nn.Module):
    """PFSeg's total loss; :meth:`forward` returns the scalar, :attr:`last` its parts.

    Args:
        sr_weight: Weight of ``MSE_SR + MSE_guidance`` (0.5 in the paper).
        fusion_weight: Weight of the task-fusion loss (0.5 in the paper).
        pool: AvgPool3d kernel of the affinity term (10 in the paper).
    """

    def __init__(self, sr_weight: float = 0.5, fusion_weight: float = 0.5, pool: int = 10) -> None:
        super().__init__()
        self.sr_weight, self.fusion_weight, self.pool = float(sr_weight), float(fusion_weight), int(pool)
        self.last: dict[str, float] = {}

    def forward(
        self,
        seg_logits: torch.Tensor,
        sr: torch.Tensor,
        labels: torch.Tensor,
        hr: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Total loss.

        Args:
            seg_logits: ``(B, K, *hr_spatial)``.
            sr: Super-resolved image ``(B, C, *hr_spatial)``.
            labels: ``(B, 1, *hr_spatial)`` integer labels.
            hr: SR target ``(B, C, *hr_spatial)``.
            mask: ``(1 or B, 1, *hr_spatial)``: 1 inside the guidance region, else 0.
        """
        seg = segmentation_loss(seg_logits, labels)
        sr_term = guidance_sr_loss(sr, hr, mask)
        lab = labels if labels.ndim == seg_logits.ndim else labels.unsqueeze(1)
        fusion = task_fusion_loss(foreground_probability(seg_logits), sr, lab > 0, hr, self.pool)
        self.last = {"seg": float(seg.detach()), "sr": float(sr_term.detach()), "fusion": float(fusion.detach())}
        return seg + self.sr_weight * sr_term + self.fusion_weight * fusion
