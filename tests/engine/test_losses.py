"""Dice + CE loss, ignore label, batch Dice, deep supervision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_medseg.engine.training.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    LossError,
    deep_supervision_weights,
    downsample_targets,
)


def random_problem(shape=(2, 3, 6, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    return logits, target


def manual_dice(probs, onehot, axes, smooth=1e-5):
    tp = (probs * onehot).sum(axes)
    fp = (probs * (1 - onehot)).sum(axes)
    fn = ((1 - probs) * onehot).sum(axes)
    return (2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_matches_hand_computation(batch_dice):
    logits, target = random_problem()
    loss = DiceCELoss(batch_dice=batch_dice)(logits, target)
    probs = logits.softmax(1)
    onehot = F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    dice = manual_dice(probs, onehot, axes)[..., 1:]
    expected = F.cross_entropy(logits, target[:, 0]) + 1 - dice.mean()
    torch.testing.assert_close(loss, expected)


def test_perfect_prediction_is_optimal():
    _, target = random_problem((2, 3, 4, 6, 6))
    perfect = 50.0 * F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    assert DiceCELoss()(perfect, target).item() == pytest.approx(0.0, abs=1e-5)
    assert DiceCELoss(weight_ce=0)(perfect, target).item() == pytest.approx(0.0, abs=1e-5)
    worse = perfect.roll(1, dims=1)  # predicts the wrong class everywhere
    assert DiceCELoss(weight_ce=0)(worse, target).item() > 0.9


def test_batch_dice_differs_from_per_sample_dice():
    # sample 0: large object predicted perfectly; sample 1: tiny object missed entirely
    target = torch.zeros(2, 1, 10, 10, dtype=torch.int64)
    target[0, 0, :, :5] = 1
    target[1, 0, 0, 0] = 1
    logits = torch.zeros(2, 2, 10, 10)
    logits[:, 0] = 50.0
    logits[0, 1, :, :5] = 100.0
    per_sample = DiceCELoss(weight_ce=0).soft_dice(logits, target)
    batch = DiceCELoss(weight_ce=0, batch_dice=True).soft_dice(logits, target)
    assert per_sample.shape == (2, 1) and batch.shape == (1,)
    assert per_sample[0, 0] == pytest.approx(1.0, abs=1e-4)
    assert per_sample[1, 0] == pytest.approx(0.0, abs=1e-4)
    assert batch[0] == pytest.approx(100 / 101, abs=1e-4)  # 2*50 / (2*50 + 1 missed voxel)


@pytest.mark.parametrize("ignore_label", [2, 255])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_ignore_label_has_no_effect(ignore_label, batch_dice):
    logits, target = random_problem((2, 2, 5, 6, 6))
    ignored = torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    target = torch.where(ignored, torch.full_like(target, ignore_label), target)
    loss_fn = DiceCELoss(batch_dice=batch_dice, ignore_label=ignore_label)
    logits = logits.requires_grad_(True)
    loss = loss_fn(logits, target)
    loss.backward()
    grad_at_ignored = logits.grad.movedim(1, -1)[ignored[:, 0]]
    assert grad_at_ignored.abs().max().item() == 0.0
    assert logits.grad.abs().sum() > 0
    changed = logits.detach().clone()
    mask = ignored.expand_as(changed)
    changed[mask] = torch.randn(int(mask.sum())) * 100
    assert loss_fn(changed, target).item() == loss.item()


def test_everything_ignored_gives_finite_loss():
    logits, target = random_problem((1, 2, 3, 3, 3))
    loss = DiceCELoss(ignore_label=9)(logits, torch.full_like(target, 9))
    assert torch.isfinite(loss)


def test_2d_and_target_without_channel_axis():
    logits, target = random_problem((3, 4, 8, 8))
    a = DiceCELoss()(logits, target)
    b = DiceCELoss()(logits, target[:, 0])
    torch.testing.assert_close(a, b)
    with pytest.raises(LossError):
        DiceCELoss()(logits, target[:, :, :4])
    with pytest.raises(LossError):
        DiceCELoss()(logits, target + 10)


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    w = deep_supervision_weights(5)
    assert sum(w) == pytest.approx(1.0) and w[-1] == 0.0
    assert w[0] == pytest.approx(2 * w[1]) == pytest.approx(4 * w[2])


def test_downsample_targets():
    target = torch.arange(4).repeat_interleave(2).view(1, 1, 1, 8).expand(1, 1, 8, 8).contiguous()
    outs = downsample_targets(target, [(8, 8), (4, 4), (2, 2)])
    assert [tuple(o.shape) for o in outs] == [(1, 1, 8, 8), (1, 1, 4, 4), (1, 1, 2, 2)]
    assert outs[0] is target and outs[1].dtype == torch.int64
    assert outs[1][0, 0, 0].tolist() == [0, 1, 2, 3]
    by_scale = downsample_targets(target, scales=[1, (0.5, 0.5), 0.25])
    assert all(torch.equal(a, b) for a, b in zip(outs, by_scale))
    with pytest.raises(LossError):
        downsample_targets(target)


def test_deep_supervision_loss():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (2, 1, 8, 8, 8), generator=g)
    outs = [torch.randn(2, 2, *(8 // 2**i,) * 3, generator=g) for i in range(3)]
    targets = downsample_targets(target, [o.shape[2:] for o in outs])
    base = DiceCELoss()
    weights = deep_supervision_weights(3)
    ds = DeepSupervisionLoss(base, weights)
    expected = sum(w * base(o, t) for w, o, t in zip(weights, outs, targets))
    torch.testing.assert_close(ds(outs, targets), expected)
    torch.testing.assert_close(ds(outs, target), expected)  # targets downsampled on the fly
    outs[2] = outs[2] * 10  # lowest-resolution head has weight 0
    torch.testing.assert_close(ds(outs, targets), expected)
    torch.testing.assert_close(ds(outs[0], targets), base(outs[0], targets[0]))
    with pytest.raises(LossError):
        ds(outs[:2], targets[:2])
    torch.testing.assert_close(DeepSupervisionLoss(base)(outs, targets), expected)  # default weights
