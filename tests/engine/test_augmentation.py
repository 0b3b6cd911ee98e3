"""Torch augmentation: determinism, identity, label integrity, exact geometry of flips/rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medseg.engine.data.augmentation import (
    AugmentationError,
    Augmenter,
    enlarged_patch_size,
    rotation_matrix,
)

OFF = dict(p_rotation=0.0, p_scale=0.0, p_mirror=0.0, p_gamma=0.0, p_noise=0.0, p_brightness=0.0,
           p_contrast=0.0)


def batch(spatial=(6, 10, 12), b=4, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, c, *spatial), generator=g)
    y = torch.randint(0, 3, (b, 1, *spatial), generator=g)
    return x, y


@pytest.mark.parametrize("dims", [2, 3])
def test_identity_when_all_probabilities_zero(dims):
    x, y = batch((10, 12) if dims == 2 else (6, 10, 12))
    xo, yo = Augmenter(dims, **OFF, seed=0)(x, y)
    assert torch.equal(xo, x) and torch.equal(yo, y)


@pytest.mark.parametrize("dims", [2, 3])
def test_deterministic_with_seed_and_shapes(dims):
    x, y = batch((16, 16) if dims == 2 else (8, 12, 12), b=6)
    strong = dict(p_rotation=0.5, p_scale=0.5, p_gamma=0.5, p_noise=0.5, p_brightness=0.5, p_contrast=0.5)
    a1, a2, a3 = (Augmenter(dims, seed=s, **strong) for s in (1, 1, 2))
    for _ in range(2):
        (x1, y1), (x2, y2), (x3, _) = a1(x, y), a2(x, y), a3(x, y)
        assert x1.shape == x.shape and y1.shape == y.shape
        assert x1.dtype == torch.float32 and y1.dtype == torch.int64
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert not torch.equal(x1, x3)
    assert not torch.equal(x1, x)  # something happened


@pytest.mark.parametrize("dims", [2, 3])
def test_labels_stay_in_label_set(dims):
    x, y = batch((16, 16) if dims == 2 else (8, 12, 12), b=4)
    y = torch.where(y == 2, torch.full_like(y, 255), y)  # e.g. an ignore label
    aug = Augmenter(dims, p_rotation=1.0, p_scale=1.0, seed=3)
    for _ in range(3):
        _, yo = aug(x, y)
        assert set(yo.unique().tolist()) <= {0, 1, 255}
        assert yo.dtype == torch.int64


def test_mirror_is_exact_flip():
    x, y = batch()
    xo, yo = Augmenter(3, **{**OFF, "p_mirror": 1.0}, mirror_axes=(1,), seed=0)(x, y)
    assert torch.equal(xo, torch.flip(x, [3])) and torch.equal(yo, torch.flip(y, [3]))
    xo, yo = Augmenter(3, **{**OFF, "p_mirror": 1.0}, seed=0)(x, y)
    assert torch.equal(xo, torch.flip(x, [2, 3, 4])) and torch.equal(yo, torch.flip(y, [2, 3, 4]))


def test_rotation_by_90_degrees_is_exact_rot90():
    x, y = batch((9, 9), b=2, c=1)
    aug = Augmenter(2, **{**OFF, "p_rotation": 1.0}, rotation_deg=(90, 90), seed=0)
    xo, yo = aug(x, y)
    rot_x, rot_y = torch.rot90(x, -1, (2, 3)), torch.rot90(y, -1, (2, 3))
    torch.testing.assert_close(xo, rot_x, atol=1e-5, rtol=0)
    assert torch.equal(yo, rot_y)


def test_3d_rotation_by_90_degrees_is_a_voxel_permutation():
    x, y = batch((5, 5, 5), b=1, c=1)
    xo, yo = Augmenter(3, **{**OFF, "p_rotation": 1.0}, rotation_deg=(90, 90), seed=0)(x, y)
    # the rotation (about all three axes by 90 degrees) maps output voxel offsets to input offsets
    rot = np.rint(rotation_matrix([np.pi / 2] * 3, 3)).astype(int)
    out = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    src = (out - 2) @ rot.T + 2
    expected_x = x[0, 0].numpy()[tuple(src.T)].reshape(5, 5, 5)
    expected_y = y[0, 0].numpy()[tuple(src.T)].reshape(5, 5, 5)
    np.testing.assert_allclose(xo[0, 0].numpy(), expected_x, atol=1e-5)
    np.testing.assert_array_equal(yo[0, 0].numpy(), expected_y)


def test_scale_zoom_out_pads_with_zero_and_background():
    x = torch.ones(1, 1, 12, 12)
    y = torch.ones(1, 1, 12, 12, dtype=torch.int64)
    aug = Augmenter(2, **{**OFF, "p_scale": 1.0}, scale_range=(2.0, 2.0), seed=0)
    xo, yo = aug(x, y)
    assert xo[0, 0, 0, 0] == 0 and yo[0, 0, 0, 0] == 0  # corners come from outside the patch
    assert xo[0, 0, 6, 6] == pytest.approx(1.0) and yo[0, 0, 6, 6] == 1  # the centre stays


def test_centre_crop_output_size():
    x, y = batch((10, 14, 14))
    xo, yo = Augmenter(3, **OFF, patch_size=(6, 8, 8), seed=0)(x, y)
    assert torch.equal(xo, x[:, :, 2:8, 3:11, 3:11]) and torch.equal(yo, y[:, :, 2:8, 3:11, 3:11])
    xo, yo = Augmenter(3, patch_size=(6, 8, 8), p_rotation=1.0, seed=0)(x, y)
    assert xo.shape == (4, 2, 6, 8, 8) and yo.shape == (4, 1, 6, 8, 8)


def test_intensity_transforms():
    x, y = batch((8, 8, 8), b=2, c=1)
    xo, _ = Augmenter(3, **{**OFF, "p_brightness": 1.0}, brightness_range=(2.0, 2.0), seed=0)(x, y)
    torch.testing.assert_close(xo, 2 * x)
    xo, _ = Augmenter(3, **{**OFF, "p_gamma": 1.0}, gamma_range=(1.5, 1.5), seed=0)(x, y)
    assert not torch.allclose(xo, x)  # changed, but mean and std are retained
    torch.testing.assert_close(xo.mean((2, 3, 4)), x.mean((2, 3, 4)), atol=1e-4, rtol=0)
    torch.testing.assert_close(xo.std((2, 3, 4)), x.std((2, 3, 4)), atol=1e-4, rtol=1e-4)
    xo, _ = Augmenter(3, **{**OFF, "p_contrast": 1.0}, contrast_range=(0.5, 0.5), seed=0)(x, y)
    assert xo.std() < x.std() and xo.min() >= x.min() and xo.max() <= x.max()
    xo, _ = Augmenter(3, **{**OFF, "p_noise": 1.0}, noise_var=(0.04, 0.04), seed=0)(x, y)
    assert abs(float((xo - x).std()) - 0.2) < 0.03


def test_half_precision_input_keeps_dtype():
    x, y = batch((8, 8))
    xo, yo = Augmenter(2, p_rotation=1.0, p_gamma=1.0, seed=0)(x.to(torch.bfloat16), y)
    assert xo.dtype == torch.bfloat16 and xo.shape == x.shape


def test_input_not_modified():
    x, y = batch()
    x0, y0 = x.clone(), y.clone()
    Augmenter(3, p_rotation=1, p_mirror=1, p_gamma=1, p_noise=1, p_brightness=1, p_contrast=1, seed=0)(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_errors():
    with pytest.raises(AugmentationError):
        Augmenter(4)
    with pytest.raises(AugmentationError):
        Augmenter(3, p_gamma=1.5)
    with pytest.raises(AugmentationError):
        Augmenter(3, seed=0)(torch.zeros(1, 1, 4, 4), None)
    with pytest.raises(AugmentationError):
        Augmenter(2, seed=0)(torch.zeros(1, 1, 4, 4, dtype=torch.int64), None)


def test_enlarged_patch_size():
    assert enlarged_patch_size((64, 64), rotation_deg=0, scale_range=(1, 1)) == (64, 64)
    big = enlarged_patch_size((64, 64), rotation_deg=180, scale_range=(1, 1))
    assert big == (91, 91)  # 64 * sqrt(2), rounded up
    assert all(b >= p for b, p in zip(enlarged_patch_size((40, 56, 40)), (40, 56, 40)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda_and_matches_shapes():
    x, y = batch()
    xo, yo = Augmenter(3, p_rotation=1, p_noise=1, seed=0)(x.cuda(), y.cuda())
    assert xo.is_cuda and yo.is_cuda and xo.shape == x.shape
    assert set(yo.unique().tolist()) <= {0, 1, 2}
