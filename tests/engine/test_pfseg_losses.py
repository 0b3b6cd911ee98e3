"""PFSeg's losses on hand-made tensors whose values are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from napari_medseg.engine.training.variants.pfseg_losses import (
    PFSegLoss,
    affinity_loss,
    foreground_probability,
    guidance_sr_loss,
    segmentation_loss,
    soft_dice_loss,
    task_fusion_loss,
)


def _vol(*values) -> torch.Tensor:
    """A (1, 1, 1, 1, N) volume."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, 1, -1)


def test_soft_dice_p2_smooth1():
    # x = [1, 0, .5, .5], y = [1, 0, 1, 0]: num = 2 * (1 + .5) + 1 = 4;
    # den = (1 + 0 + .25 + .25) + (1 + 0 + 1 + 0) + 1 = 4.5 -> 1 - 4 / 4.5 = 1/9
    assert soft_dice_loss(_vol(1, 0, 0.5, 0.5), _vol(1, 0, 1, 0)).item() == pytest.approx(1 / 9)
    # perfect prediction: (2 * 2 + 1) / (2 + 2 + 1) = 1 -> 0
    assert soft_dice_loss(_vol(1, 1, 0), _vol(1, 1, 0)).item() == pytest.approx(0.0)


def test_binary_segmentation_loss_is_dice_plus_bce():
    # one logit channel, logits 0 -> p = .5 at both voxels; labels [1, 0]
    # Dice: num = 2 * .5 + 1 = 2, den = (.25 + .25) + 1 + 1 = 2.5 -> .2 ; BCE = ln 2
    logits, labels = _vol(0, 0), _vol(1, 0).long()
    assert segmentation_loss(logits, labels).item() == pytest.approx(0.2 + math.log(2), rel=1e-6)


def test_two_class_softmax_equals_the_sigmoid_of_the_logit_difference():
    torch.manual_seed(0)
    two = torch.randn(2, 2, 3, 4, 5)
    labels = torch.randint(0, 2, (2, 1, 3, 4, 5))
    one = two[:, 1:] - two[:, :1]
    assert segmentation_loss(two, labels).item() == pytest.approx(segmentation_loss(one, labels).item(), rel=1e-5)
    assert torch.allclose(foreground_probability(two), torch.sigmoid(one), atol=1e-6)


def test_multiclass_segmentation_loss():
    # 3 classes, zero logits -> p = 1/3 everywhere; labels [1, 2]
    # class 1: num = 2/3 + 1 = 5/3, den = 2/9 + 1 + 1 = 20/9 -> 1 - 15/20 = .25; class 2 the same
    # CE = ln 3
    logits = torch.zeros(1, 3, 1, 1, 2)
    labels = torch.tensor([1, 2]).view(1, 1, 1, 1, 2)
    assert segmentation_loss(logits, labels).item() == pytest.approx(0.25 + math.log(3), rel=1e-6)
    # foreground probability = 1 - p(background) = 2/3
    assert torch.allclose(foreground_probability(logits), torch.full((1, 1, 1, 1, 2), 2 / 3))


def test_guidance_sr_loss():
    # sr = [1, 2, 3, 4], hr = 1: MSE = (0 + 1 + 4 + 9) / 4 = 3.5;
    # mask [1, 1, 0, 0]: masked diffs [0, 1, 0, 0] -> 1/4 = .25 ; total 3.75
    loss = guidance_sr_loss(_vol(1, 2, 3, 4), _vol(1, 1, 1, 1), _vol(1, 1, 0, 0))
    assert loss.item() == pytest.approx(3.75)


def test_affinity_loss_by_hand():
    # pool 1, maps [1, 2] and [0, 1] on a 1x1x2 grid: G_a = [[1, 2], [2, 4]], G_b = [[0, 0], [0, 1]]
    # sum |G_a - G_b| = 1 + 2 + 2 + 3 = 8; (H * W)^2 = (1 * 2)^2 = 4 -> 2
    assert affinity_loss(_vol(1, 2), _vol(0, 1), pool=1).item() == pytest.approx(2.0)
    # AvgPool3d(10) on 20x10x10: halves of value 1 and 3 pool to [1, 3] on a (2, 1, 1) grid;
    # against zeros: G = [[1, 3], [3, 9]], sum 16; H * W = 1 -> 16
    a = torch.ones(1, 1, 20, 10, 10)
    a[:, :, 10:] = 3
    assert affinity_loss(a, torch.zeros_like(a)).item() == pytest.approx(16.0)
    # the batch mean: a second, identical pair adds nothing and halves the sum -> 8
    both = torch.cat([a, torch.zeros_like(a)])
    assert affinity_loss(both, torch.zeros_like(both)).item() == pytest.approx(8.0)


def test_task_fusion_loss_by_hand():
    # fg = [1, .5], sr = [2, 2] -> fg * sr = [2, 1]; label [1, 0], hr = [1, 1] -> [1, 0]
    # MSE = (1 + 1) / 2 = 1; G_a = [[4, 2], [2, 1]], G_b = [[1, 0], [0, 0]]: |diff| sum 3+2+2+1 = 8,
    # / (1 * 2)^2 -> 2 ; total 3
    loss = task_fusion_loss(_vol(1, 0.5), _vol(2, 2), _vol(1, 0), _vol(1, 1), pool=1)
    assert loss.item() == pytest.approx(3.0)


def test_total_loss_by_hand_and_gradients():
    # one logit channel at 0 (fg = .5), labels [1, 0]: seg = .2 + ln 2 (see above)
    # sr = [2, 2], hr = [1, 1], mask [1, 0]: MSE 1 + masked (1 + 0) / 2 = .5 -> 1.5
    # fusion: fg * sr = [1, 1], label * hr = [1, 0]: MSE .5; G_a = ones(2, 2), G_b = [[1, 0], [0, 0]]
    #   -> |diff| sum 3, / 4 = .75 ; fusion 1.25
    # total = .2 + ln 2 + .5 * 1.5 + .5 * 1.25 = 1.575 + ln 2
    logits = _vol(0, 0).requires_grad_()
    sr = _vol(2, 2).requires_grad_()
    loss_fn = PFSegLoss(pool=1)
    loss = loss_fn(logits, sr, _vol(1, 0).long(), _vol(1, 1), _vol(1, 0))
    assert loss.item() == pytest.approx(1.575 + math.log(2), rel=1e-6)
    assert loss_fn.last == pytest.approx({"seg": 0.2 + math.log(2), "sr": 1.5, "fusion": 1.25}, rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0 and sr.grad.abs().sum() > 0


def test_shape_mismatches_are_refused():
    with pytest.raises(ValueError, match="equal shapes"):
        soft_dice_loss(_vol(1, 0), _vol(1, 0, 1))
    with pytest.raises(ValueError, match="equal shapes"):
        affinity_loss(_vol(1, 0), _vol(1, 0, 1))
