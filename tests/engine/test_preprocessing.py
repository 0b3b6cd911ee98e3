"""Preprocessing (crop, transpose, resample, normalise) and its inverse."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from napari_medseg.engine.planning import Plan
from napari_medseg.engine.preprocessing import (
    CaseProperties,
    PreprocessingError,
    compute_new_shape,
    normalize,
    preprocess_case,
    resample_image,
    restore_labels,
    restore_probabilities,
    separate_z_axis,
)
from napari_medseg.io.phantom import make_phantom


def make_plan(spacing, transpose=(0, 1, 2), normalization=("zscore",), dims=3, **kw) -> Plan:
    tf = list(transpose)
    tb = [tf.index(i) for i in range(3)]
    return Plan(
        configuration="3d_fullres" if dims == 3 else "2d",
        spacing=tuple(spacing),
        patch_size=(8, 16, 16) if dims == 3 else (16, 16),
        batch_size=2,
        pool_kernels=[],
        conv_kernels=[],
        normalization=list(normalization),
        transpose_forward=tf,
        transpose_backward=tb,
        num_classes=kw.pop("num_classes", 3),
        num_channels=kw.pop("num_channels", 1),
        **kw,
    )


@pytest.fixture
def anisotropic_case():
    """A 3-class phantom, zero-padded (so cropping matters), spacing coarse along axis 1."""
    img, lab = make_phantom((14, 30, 26), num_classes=3, seed=3)
    img = img - img.min() + 1.0  # strictly positive inside: crop box = the unpadded region
    pad = ((2, 3), (4, 1), (0, 5))
    return np.pad(img, pad), np.pad(lab, pad), (1.0, 4.0, 0.8)


def onehot(lab, k):
    return np.stack([lab == c for c in range(k)]).astype(np.float32)


def near_boundary(lab, width=1):
    """Voxels within ``width`` voxels of a change of label."""
    edge = np.zeros(lab.shape, bool)
    for c in np.unique(lab):
        m = lab == c
        edge |= m ^ ndimage.binary_erosion(m, iterations=width, border_value=1)
    return ndimage.binary_dilation(edge, iterations=width)


def test_roundtrip_exact_when_spacing_unchanged(anisotropic_case):
    img, lab, spacing = anisotropic_case
    tf = [1, 0, 2]  # coarse axis first
    plan = make_plan([spacing[a] for a in tf], transpose=tf)
    x, y, props = preprocess_case(img, spacing, plan, lab)
    assert props.bbox == [[2, 16], [4, 34], [0, 26]]
    assert props.shape_after_crop == (14, 30, 26)
    assert props.shape_after_resample == (30, 14, 26) == x.shape[1:] == y.shape
    assert y.dtype == np.int16 and x.dtype == np.float32
    restored = restore_probabilities(onehot(y, 3), props, plan)
    assert restored.shape == (3, *img.shape)
    np.testing.assert_allclose(restored.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(restored.argmax(0), lab)
    np.testing.assert_array_equal(restore_labels(y, props, plan), lab)


def test_roundtrip_with_resampling_and_transpose(anisotropic_case):
    img, lab, spacing = anisotropic_case
    tf = [1, 0, 2]
    plan = make_plan((4.0, 0.7, 1.1), transpose=tf)  # in-plane resampling + separate coarse axis
    x, y, props = preprocess_case(img, spacing, plan, lab)
    expected = compute_new_shape((30, 14, 26), (4.0, 1.0, 0.8), (4.0, 0.7, 1.1))
    assert props.shape_after_resample == expected == y.shape
    assert set(np.unique(y)) <= {0, 1, 2}
    back = restore_probabilities(onehot(y, 3), props, plan).argmax(0)
    wrong = back != lab
    assert wrong.sum() < 0.02 * lab.size
    assert not (wrong & ~near_boundary(lab)).any(), "mismatches away from label boundaries"
    assert (restore_labels(y, props, plan) != lab).sum() < 0.02 * lab.size


def test_isotropic_resampling_roundtrip():
    img, lab = make_phantom((20, 24, 24), num_classes=2, seed=1)
    plan = make_plan((1.5, 1.5, 1.5))
    x, y, props = preprocess_case(img, (1.0, 1.0, 1.0), plan, lab)
    assert y.shape == (13, 16, 16)
    back = restore_probabilities(onehot(y, 2), props, plan).argmax(0)
    wrong = back != lab
    assert not (wrong & ~near_boundary(lab)).any()


def test_image_resampling_separate_axis_is_nearest():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(1, 5, 12, 12)).astype(np.float32)
    assert separate_z_axis((4.0, 1.0, 1.0), (2.0, 1.0, 1.0)) == 0
    out = resample_image(arr, (4.0, 1.0, 1.0), (2.0, 1.0, 1.0))
    assert out.shape == (1, 10, 12, 12)
    for z in range(10):  # every output slice is a copy of an input slice
        assert any(np.allclose(out[0, z], arr[0, k], atol=1e-5) for k in range(5))
    # isotropic: cubic interpolation everywhere, new slices are not copies
    out = resample_image(arr, (1.0, 1.0, 1.0), (0.5, 1.0, 1.0))
    assert not all(any(np.allclose(out[0, z], arr[0, k]) for k in range(5)) for z in range(10))
    assert out.min() >= arr.min() - 1e-6 and out.max() <= arr.max() + 1e-6  # clipped to input range


def test_two_coarse_axes_resample_together():
    assert separate_z_axis((0.24, 1.25, 1.25), (1.0, 1.0, 1.0)) is None


def test_label_resampling_keeps_label_set():
    lab = np.zeros((1, 9, 9, 9), np.int16)
    lab[0, 2:7, 2:7, 2:7] = 1
    lab[0, 4:6, 4:6, 4:6] = 5
    out = resample_image(lab, (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), is_seg=True)
    assert out.dtype == np.int16 and out.shape == (1, 18, 18, 18)
    assert set(np.unique(out)) == {0, 1, 5}


def test_2d_configuration_keeps_first_axis():
    img, lab = make_phantom((6, 20, 20), seed=0)
    plan = make_plan((9.0, 0.5, 0.5), dims=2)
    x, y, props = preprocess_case(img, (3.0, 1.0, 1.0), plan, lab)
    assert x.shape == (1, 6, 40, 40)
    assert props.spacing_after_resample == (3.0, 0.5, 0.5)


def test_2d_image_roundtrip():
    img, lab = make_phantom((30, 26), num_classes=3, seed=2)
    img = np.pad(img - img.min() + 1, 3)
    lab = np.pad(lab, 3)
    plan = make_plan((1.0, 1.0, 1.0), dims=2)
    x, y, props = preprocess_case(img, (1.0, 1.0), plan, lab)
    assert x.shape == (1, 1, 30, 26)
    assert props.original_shape == (36, 32) and props.bbox == [[3, 33], [3, 29]]
    back = restore_probabilities(onehot(y, 3), props, plan)
    assert back.shape == (3, 36, 32)
    np.testing.assert_array_equal(back.argmax(0), lab)
    np.testing.assert_array_equal(restore_labels(y, props, plan), lab)


def test_multichannel_crop_uses_any_channel():
    img = np.zeros((2, 10, 10, 10), np.float32)
    img[0, 2:4, 3:5, 4:6] = 1
    img[1, 6:8, 6:9, 1:3] = 2
    plan = make_plan((1, 1, 1), normalization=["none", "none"], num_channels=2,
                     use_mask_for_norm=[False, False])
    x, _, props = preprocess_case(img, (1, 1, 1), plan)
    assert props.bbox == [[2, 8], [3, 9], [1, 6]]
    assert x.shape == (2, 6, 6, 5)
    np.testing.assert_array_equal(x[0], img[0, 2:8, 3:9, 1:6])


def test_normalization_schemes():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 20, size=(2, 8, 8, 8)).astype(np.float32)
    stats = {"mean": 90.0, "std": 10.0, "percentile_00_5": 60.0, "percentile_99_5": 140.0}
    plan = make_plan((1, 1, 1), normalization=["ct", "zscore"], num_channels=2,
                     intensity_stats=[stats, {}], use_mask_for_norm=[False, False])
    out = normalize(img, plan)
    np.testing.assert_allclose(out[0], (np.clip(img[0], 60, 140) - 90) / 10, rtol=1e-5, atol=1e-5)
    assert abs(out[1].mean()) < 1e-4 and abs(out[1].std() - 1) < 1e-3
    with pytest.raises(PreprocessingError, match="intensity_stats"):
        normalize(img, make_plan((1, 1, 1), normalization=["ct", "ct"], num_channels=2))
    with pytest.raises(PreprocessingError, match="Unknown normalization"):
        normalize(img, make_plan((1, 1, 1), normalization=["fancy", "none"], num_channels=2))


def test_zscore_with_mask():
    img = np.zeros((1, 12, 12, 12), np.float32)
    rng = np.random.default_rng(1)
    img[0, 2:10, 2:10, 2:10] = rng.normal(50, 5, (8, 8, 8))
    img[0, 0, 0, 0], img[0, 11, 11, 11] = 3.0, 4.0  # crop box = whole image; the rest stays 0
    plan = make_plan((1, 1, 1), use_mask_for_norm=[True])
    x, _, _ = preprocess_case(img, (1, 1, 1), plan)
    mask = img[0] != 0
    assert abs(x[0][mask].mean()) < 1e-4 and abs(x[0][mask].std() - 1) < 1e-3
    vals = img[0][mask]
    np.testing.assert_allclose(x[0, 2:10, 2:10, 2:10], (img[0, 2:10, 2:10, 2:10] - vals.mean()) / vals.std(),
                               rtol=1e-4, atol=1e-4)
    assert x[0, 0, 5, 5] == 0 and not (x[0][~mask]).any()


def test_properties_plain_roundtrip(anisotropic_case):
    img, lab, spacing = anisotropic_case
    _, _, props = preprocess_case(img, spacing, make_plan((2.0, 2.0, 2.0)), lab)
    again = CaseProperties.from_dict(json.loads(json.dumps(props.to_dict())))
    assert again == props


def test_errors():
    img = np.ones((4, 5, 6), np.float32)
    plan = make_plan((1, 1, 1))
    with pytest.raises(PreprocessingError, match="Label shape"):
        preprocess_case(img, (1, 1, 1), plan, np.zeros((4, 5, 5), np.uint8))
    with pytest.raises(PreprocessingError, match="channel"):
        preprocess_case(np.ones((2, 4, 5, 6)), (1, 1, 1), plan)
    with pytest.raises(PreprocessingError):
        preprocess_case(img, (1, 1), plan)
    _, y, props = preprocess_case(img, (1, 1, 1), plan)
    with pytest.raises(PreprocessingError, match="plan grid"):
        restore_probabilities(np.ones((2, 3, 3, 3)), props, plan)


@pytest.mark.parametrize(
    "dtype, normalization, use_mask, transpose",
    [
        (np.float32, ("zscore",), [False], (0, 1, 2)),
        (np.float32, ("zscore",), [True], (1, 0, 2)),
        (np.int16, ("ct",), [False], (0, 1, 2)),
        (np.float64, ("none",), [False], (2, 0, 1)),
    ],
)
def test_lazy_image_equals_the_eager_preprocessing(anisotropic_case, dtype, normalization, use_mask, transpose):
    """Without resampling, predict reads tiles from a LazyNormalizedImage: same values, no copy."""
    from napari_medseg.engine.preprocessing import LazyNormalizedImage

    img, _, spacing = anisotropic_case
    img = (img * 40).astype(dtype)
    stats = [{"mean": 90.0, "std": 30.0, "percentile_00_5": 20.0, "percentile_99_5": 200.0}]
    plan = make_plan(tuple(spacing[a] for a in transpose), transpose=transpose, normalization=normalization,
                     use_mask_for_norm=use_mask, intensity_stats=stats)
    eager, _, props = preprocess_case(img, spacing, plan)
    lazy, _, lazy_props = preprocess_case(img, spacing, plan, lazy=True)
    assert isinstance(lazy, LazyNormalizedImage) and lazy_props == props
    assert lazy.shape == eager.shape
    assert np.shares_memory(lazy.raw, img)  # views of the caller's array, no float32 volume
    np.testing.assert_array_equal(lazy.materialize(), eager)
    tile = (slice(None), slice(1, 7), slice(3, 12), slice(0, 5))
    got = lazy[tile]
    assert got.dtype.is_floating_point and tuple(got.shape) == eager[tile].shape
    np.testing.assert_array_equal(got.numpy(), eager[tile])


def test_lazy_only_without_resampling_or_label(anisotropic_case):
    img, lab, spacing = anisotropic_case
    resampled, _, _ = preprocess_case(img, spacing, make_plan((1.0, 1.0, 1.0)), lazy=True)
    assert isinstance(resampled, np.ndarray)  # a resampled image is stored
    with_label, _, _ = preprocess_case(img, spacing, make_plan(spacing), lab, lazy=True)
    assert isinstance(with_label, np.ndarray)


def test_lazy_image_through_the_sliding_window():
    """The sliding window reads a LazyNormalizedImage tile by tile; padding materialises it."""
    import torch

    from napari_medseg.engine.inference import sliding_window
    from napari_medseg.engine.jobs import collect

    rng = np.random.default_rng(2)
    img = rng.normal(100, 20, (1, 20, 24, 12)).astype(np.float32)  # axis 2 smaller than the patch
    plan = make_plan((1, 1, 1))
    eager, _, _ = preprocess_case(img, (1, 1, 1), plan)
    lazy, _, _ = preprocess_case(img, (1, 1, 1), plan, lazy=True)

    def predictor(t):  # a fixed, position-independent map of the tile
        return torch.cat([t, -t, t * t], dim=1)

    for patch in ((8, 16, 16), (8, 8, 8)):
        a = collect(sliding_window(predictor, torch.from_numpy(eager), patch, 3))[1]
        b = collect(sliding_window(predictor, lazy, patch, 3))[1]
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_predict_keeps_an_integer_image_uncast(tmp_path, monkeypatch):
    """An int16 image reaches the lazy preprocessing as int16 (no float32 volume is made)."""
    import torch

    from napari_medseg.engine.checkpoints import save_checkpoint
    from napari_medseg.engine.inference import SlidingWindowInferer, predict
    from napari_medseg.engine.jobs import collect
    from napari_medseg.engine.preprocessing import LazyNormalizedImage
    from napari_medseg.models import create_model

    kw = {"pool_kernels": [[2, 2, 2]], "conv_kernels": [[3, 3, 3]] * 2, "base_width": 4}
    plan = make_plan((1.0, 1.0, 1.0), num_classes=2)
    plan.patch_size, plan.pool_kernels, plan.conv_kernels = (8, 8, 8), kw["pool_kernels"], kw["conv_kernels"]
    torch.manual_seed(0)
    model = create_model("unet-3d-fullres", 1, 2, 3, **kw)
    path = save_checkpoint(tmp_path / "c.pt", model, model_name="unet-3d-fullres", model_kwargs=kw,
                           in_channels=1, num_classes=2, spatial_dims=3, plan=plan,
                           label_names={0: "background", 1: "fg"})
    seen = []
    real = SlidingWindowInferer.window

    def spy(self, predictor, image, *args, **kwargs):
        seen.append(image)
        return real(self, predictor, image, *args, **kwargs)

    monkeypatch.setattr(SlidingWindowInferer, "window", spy)
    img = (np.random.default_rng(0).normal(0, 300, (12, 16, 10))).astype(np.int16)
    _, res = collect(predict(img, (1.0, 1.0, 1.0), [path], device="cpu", mirror=False))
    assert isinstance(seen[0], LazyNormalizedImage) and seen[0].raw.dtype == np.int16
    _, ref = collect(predict(img.astype(np.float32), (1.0, 1.0, 1.0), [path], device="cpu", mirror=False))
    assert np.array_equal(res.labels, ref.labels)


def test_unpainted_voxels_outside_the_image_are_not_called_lost_labels(caplog):
    """The crop-to-nonzero warning counts class voxels, not the ignore label of a partly painted map."""
    from napari_medseg.engine.preprocessing import preprocess_case

    image = np.zeros((12, 14, 16), np.float32)
    image[2:10, 3:11, 4:12] = 100.0 + np.arange(8)[:, None, None]
    label = np.full(image.shape, 3, np.int16)  # ignore everywhere (3 = num_classes)
    label[5, 3:11, 4:12] = 1
    plan = make_plan((1.0, 1.0, 1.0), num_classes=3)
    with caplog.at_level("WARNING"):
        preprocess_case(image, (1.0, 1.0, 1.0), plan, label)
    assert "lie outside the nonzero image region" not in caplog.text
    label[0, 0, 0] = 2  # a painted voxel in the air is cropped away: said
    with caplog.at_level("WARNING"):
        preprocess_case(image, (1.0, 1.0, 1.0), plan, label)
    assert "1 labelled voxels lie outside" in caplog.text
