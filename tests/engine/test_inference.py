"""Sliding-window inference, TTA, ensembling, postprocessing, and predict() with real models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_medseg.engine.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from napari_medseg.engine.inference import (
    InferenceError,
    Inferer,
    InputStage,
    PredictConfig,
    PredictionResult,
    SlidingWindowInferer,
    argmax_labels,
    argmax_relative,
    axis_weights,
    compute_tile_starts,
    count_tiles,
    gaussian_importance,
    input_stage_for,
    keep_largest_component,
    list_inferers,
    normalise_by_coverage,
    optimize_predictor,
    outer_product,
    predict,
    predict_file,
    register_inferer,
    register_input_stage,
    select_inferer,
    sliding_window,
    softmax_inplace,
    unregister_inferer,
    unregister_input_stage,
)
from napari_medseg.engine.jobs import Progress, collect
from napari_medseg.engine.planning import Plan
from napari_medseg.io.phantom import make_phantom

pytestmark = pytest.mark.usefixtures("one_thread")


def repeat_k(k):
    return lambda x: x.repeat(1, k, *([1] * (x.ndim - 2)))


# ------------------------------------------------------------------------------ building blocks
@pytest.mark.parametrize("patch", [(8, 8), (7, 10), (4, 6, 5), (16, 16, 16)])
def test_gaussian_max_one_symmetric_positive(patch):
    w = gaussian_importance(patch)
    assert w.shape == patch and w.dtype == torch.float32
    assert w.max().item() == pytest.approx(1.0)
    assert w.min().item() > 0
    for d in range(len(patch)):
        assert torch.allclose(w, w.flip(d))
    # centre is the maximum, corners the minimum
    assert w.min() == w[(0,) * len(patch)]


def test_gaussian_zeros_replaced():
    w = gaussian_importance((64, 64), sigma_scale=0.005)
    assert w.min().item() > 0 and w.max().item() == 1.0


def test_tile_starts_nnunet_rule():
    assert compute_tile_starts((100,), (40,), 0.5) == [[0, 20, 40, 60]]
    assert compute_tile_starts((50,), (40,), 0.5) == [[0, 10]]
    assert compute_tile_starts((40, 30), (40, 40), 0.5) == [[0], [0]]
    assert compute_tile_starts((81,), (40,), 1.0) == [[0, 20, 41]]
    for size in range(40, 130, 7):
        (starts,) = compute_tile_starts((size,), (40,), 0.5)
        assert starts[0] == 0 and starts[-1] == size - 40
        assert len(starts) == math.ceil((size - 40) / 20) + 1
        assert all(b - a <= 20 for a, b in zip(starts, starts[1:]))
    with pytest.raises(InferenceError):
        compute_tile_starts((10,), (4,), 0)


# ------------------------------------------------------------------------------ sliding window
@pytest.mark.parametrize(
    "shape,patch",
    [((37, 29), (16, 16)), ((10, 7), (16, 16)), ((20, 23, 17), (8, 12, 8)), ((5, 30, 9), (8, 8, 8))],
)
@pytest.mark.parametrize("step", [0.5, 1.0])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_reconstruction(shape, patch, step, batch_size):
    image = torch.randn(1, *shape)
    events, out = collect(sliding_window(repeat_k(3), image, patch, 3, step=step, batch_size=batch_size))
    assert out.shape == (3, *shape) and out.dtype == torch.float32
    assert torch.allclose(out, image.expand(3, *shape), atol=1e-5)
    n = count_tiles(shape, patch, step)
    assert n == math.prod(len(s) for s in compute_tile_starts([max(a, b) for a, b in zip(shape, patch)], patch, step))
    assert len(events) == math.ceil(n / batch_size)
    assert all(isinstance(e, Progress) and e.stage == "tiles" and e.total == n for e in events)
    assert [e.current for e in events] == sorted(e.current for e in events) and events[-1].current == n


@pytest.mark.parametrize("batch_size", [1, 4])
def test_slicewise_2d_patch_on_volume(batch_size):
    image = torch.randn(2, 9, 21, 18)
    calls = []

    def predictor(x):
        calls.append(tuple(x.shape))
        return torch.cat([x, x[:, :1] * 2], 1)

    events, out = collect(sliding_window(predictor, image, (16, 16), 3, batch_size=batch_size))
    assert all(len(s) == 4 and s[2:] == (16, 16) for s in calls)  # 2D tiles
    assert torch.allclose(out[:2], image, atol=1e-5) and torch.allclose(out[2], 2 * image[0], atol=1e-5)
    n = 9 * 2 * 2
    assert count_tiles((9, 21, 18), (16, 16)) == n
    assert len(events) == math.ceil(n / batch_size) and events[-1].current == events[-1].total == n


def test_mirroring_equivariant_equals_plain_and_non_equivariant_differs():
    image = torch.randn(1, 12, 20, 17)

    def equivariant(x):  # point-wise: commutes with flips
        return torch.cat([x, -2 * x], 1)

    _, plain = collect(sliding_window(equivariant, image, (8, 8, 8), 2))
    events, tta = collect(sliding_window(equivariant, image, (8, 8, 8), 2, mirror_axes=(0, 1, 2)))
    assert torch.allclose(plain, tta, atol=1e-5)
    assert events[-1].total == count_tiles((12, 20, 17), (8, 8, 8)) * 8 == len(events)

    ramp = torch.arange(8.0).reshape(1, 1, 1, 1, 8)

    def biased(x):  # adds a ramp along the last axis: not flip-equivariant
        return torch.cat([x + ramp, x], 1)

    _, plain = collect(sliding_window(biased, image, (8, 8, 8), 2))
    _, tta = collect(sliding_window(biased, image, (8, 8, 8), 2, mirror_axes=(2,)))
    assert not torch.allclose(plain, tta, atol=1e-3)
    # flipping the ramp back and averaging gives the constant 3.5 everywhere
    assert torch.allclose(tta[0], image[0] + 3.5, atol=1e-5)
    _, tta_other = collect(sliding_window(biased, image, (8, 8, 8), 2, mirror_axes=(0,)))
    assert torch.allclose(tta_other, plain, atol=1e-5)  # the ramp is symmetric under axis-0 flips


def test_cancellation_stops_between_tiles():
    calls = []

    def predictor(x):
        calls.append(1)
        return x

    gen = sliding_window(predictor, torch.randn(1, 40, 40), (8, 8), 1)
    assert count_tiles((40, 40), (8, 8)) == 81
    next(gen)
    next(gen)
    gen.close()
    assert len(calls) == 2
    with pytest.raises(StopIteration):
        next(gen)
    assert len(calls) == 2


def test_predictor_list_deep_supervision_and_bad_output():
    image = torch.randn(1, 10, 10)
    _, out = collect(sliding_window([lambda x: 2 * x, lambda x: 4 * x], image, (8, 8), 1))
    assert torch.allclose(out, 3 * image, atol=1e-5)
    _, out = collect(sliding_window(lambda x: [x, x[..., ::2, ::2]], image, (8, 8), 1))
    assert torch.allclose(out, image, atol=1e-5)
    with pytest.raises(InferenceError, match="expected"):
        collect(sliding_window(lambda x: x, image, (8, 8), 2))
    with pytest.raises(InferenceError):
        collect(sliding_window(lambda x: x, image, (8, 8, 8), 1))


def test_uniform_weights_and_devices():
    image = torch.randn(1, 19, 13)
    _, out = collect(sliding_window(repeat_k(2), image, (8, 8), 2, gaussian=False, device="cpu",
                                accumulate_device="cpu", batch_size=5))
    assert torch.allclose(out, image.expand(2, 19, 13), atol=1e-5)


# ------------------------------------------------------------------------------ postprocessing
def test_largest_component_removes_island():
    labels = np.zeros((10, 20, 20), np.uint8)
    labels[2:8, 2:10, 2:10] = 1   # big
    labels[5, 15, 15] = 1         # island of class 1
    labels[1:3, 15:18, 2:4] = 2   # class 2, one component
    out = keep_largest_component(labels)
    assert out[5, 15, 15] == 0
    assert (out[2:8, 2:10, 2:10] == 1).all() and (out == 2).sum() == (labels == 2).sum()
    assert out.dtype == labels.dtype and labels[5, 15, 15] == 1  # input untouched
    only2 = keep_largest_component(labels, classes=[2])
    assert only2[5, 15, 15] == 1
    with pytest.raises(ValueError):
        keep_largest_component(labels.astype(float))


# ------------------------------------------------------------------------------ predict
KW3 = {"pool_kernels": [[1, 2, 2], [2, 2, 2]], "conv_kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
       "base_width": 4}
KW2 = {"pool_kernels": [[2, 2], [2, 2]], "conv_kernels": [[3, 3], [3, 3], [3, 3]], "base_width": 4}


def _plan(config="3d_fullres", spacing=(2.0, 1.0, 1.0), patch=(8, 16, 16), channels=1, classes=2):
    kw = KW3 if len(patch) == 3 else KW2
    return Plan(configuration=config, spacing=spacing, patch_size=patch, batch_size=2,
                pool_kernels=kw["pool_kernels"], conv_kernels=kw["conv_kernels"],
                normalization=["zscore"] * channels, num_channels=channels, num_classes=classes,
                use_mask_for_norm=[False] * channels)


def _ckpt(tmp_path, name, plan, seed=0, channels=1, classes=2, label_names=None):
    from napari_medseg.models import create_model

    model_name = "unet-3d-fullres" if plan.spatial_dims == 3 else "unet-2d"
    kw = KW3 if plan.spatial_dims == 3 else KW2
    torch.manual_seed(seed)
    model = create_model(model_name, channels, classes, plan.spatial_dims, **kw)
    return save_checkpoint(tmp_path / name, model, model_name=model_name, model_kwargs=kw,
                           in_channels=channels, num_classes=classes, spatial_dims=plan.spatial_dims,
                           plan=plan, label_names=label_names or {0: "background", 1: "ellipsoid"})


@pytest.fixture(scope="module")
def phantom():
    image, labels = make_phantom((12, 26, 21), num_classes=2, seed=3)
    return image, labels


def test_predict_3d_source_shape_any_spacing(tmp_path, phantom):
    image, _ = phantom
    path = _ckpt(tmp_path, "a.pt", _plan())
    events, res = collect(predict(image, (2.0, 1.0, 1.0), [path], device="cpu", mirror=True,
                              return_probabilities=True, return_uncertainty=True))
    assert isinstance(res, PredictionResult)
    assert res.labels.shape == image.shape and res.labels.dtype == np.uint8
    assert res.probabilities.shape == (2, *image.shape) and res.probabilities.dtype == np.float32
    assert np.allclose(res.probabilities.sum(0), 1, atol=1e-4)
    assert np.array_equal(res.labels, res.probabilities.argmax(0))
    assert res.uncertainty.shape == image.shape
    assert res.uncertainty.min() >= 0 and res.uncertainty.max() <= 1
    assert res.label_names == {0: "background", 1: "ellipsoid"}
    stages = [e.stage for e in events]
    assert stages[0] == "preprocess" and stages[-1] == "postprocess" and "tiles" in stages
    tiles = [e for e in events if e.stage == "tiles"]
    assert len({e.total for e in tiles}) == 1 and tiles[-1].current == tiles[-1].total
    assert tiles[-1].total % 8 == 0  # 8 mirror combinations per tile

    _, res2 = collect(predict(image, (3.0, 0.8, 0.7), [path], device="cpu", mirror=False))
    assert res2.labels.shape == image.shape
    assert res2.probabilities is None and res2.uncertainty is None


def test_predict_ensemble_averages_softmax(tmp_path, phantom):
    image, _ = phantom
    a = _ckpt(tmp_path, "a.pt", _plan(), seed=0)
    b = _ckpt(tmp_path, "b.pt", _plan(spacing=(2.5, 1.3, 1.2)), seed=1)
    kw = dict(device="cpu", mirror=False, return_probabilities=True, return_uncertainty=True)
    _, ra = collect(predict(image, (2.0, 1.0, 1.0), [a], **kw))
    _, rb = collect(predict(image, (2.0, 1.0, 1.0), [b], **kw))
    events, rab = collect(predict(image, (2.0, 1.0, 1.0), [a, b], **kw))
    manual = (ra.probabilities + rb.probabilities) / 2
    assert np.allclose(rab.probabilities, manual, atol=1e-5)
    assert not np.allclose(ra.probabilities, rb.probabilities, atol=1e-3)
    assert np.array_equal(rab.labels, manual.argmax(0))
    entropy = -(manual * np.log(np.clip(manual, 1e-12, 1))).sum(0) / math.log(2)
    assert np.allclose(rab.uncertainty, entropy, atol=1e-4)
    tiles = [e for e in events if e.stage == "tiles"]
    assert tiles[-1].current == tiles[-1].total == sum(
        e.total for e in [[x for x in collect(predict(image, (2.0, 1.0, 1.0), [c], **kw))[0]
                           if x.stage == "tiles"][-1] for c in (a, b)])


def test_ensemble_sharing_a_plan_preprocesses_once(tmp_path, phantom, monkeypatch):
    image, _ = phantom
    plan = _plan()
    paths = [_ckpt(tmp_path, f"f{i}.pt", plan, seed=i) for i in range(2)]
    calls = []
    real = InputStage.prepare  # the default input stage: preprocessing

    def spy(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(InputStage, "prepare", spy)
    _, res = collect(predict(image, (2.0, 1.0, 1.0), paths, device="cpu", mirror=False))
    assert len(calls) == 1 and res.labels.shape == image.shape


def test_predict_2d_model_on_volume_and_on_2d_image(tmp_path, phantom):
    image, _ = phantom
    path = _ckpt(tmp_path, "2d.pt", _plan("2d", patch=(16, 16)))
    events, res = collect(predict(image, (2.0, 1.0, 1.0), [path], device="cpu", mirror=True, batch_size=4))
    assert res.labels.shape == image.shape
    tiles = [e for e in events if e.stage == "tiles"]
    assert tiles[-1].current == tiles[-1].total and tiles[-1].total % 4 == 0  # 4 flips in 2D
    _, res2 = collect(predict(image[7], (1.0, 1.0), [path], device="cpu", mirror=False))
    assert res2.labels.shape == image.shape[1:]


def test_largest_component_in_predict(tmp_path, phantom):
    image, _ = phantom
    path = _ckpt(tmp_path, "a.pt", _plan())
    _, res = collect(predict(image, (2.0, 1.0, 1.0), [path], device="cpu", mirror=False,
                         largest_component=True))
    from scipy import ndimage

    for c in (1,):
        assert ndimage.label(res.labels == c)[1] <= 1


def test_mismatch_is_caught_before_compute(tmp_path, phantom, monkeypatch):
    image, _ = phantom
    path = _ckpt(tmp_path, "a.pt", _plan())
    monkeypatch.setattr(InputStage, "prepare", lambda *a, **k: pytest.fail("preprocessing ran before the check"))
    two_channels = np.stack([image, image])
    with pytest.raises(CheckpointError, match=r"expects 1 input channel\(s\); the image has 2"):
        next(predict(two_channels, (2.0, 1.0, 1.0), [path], device="cpu"))
    with pytest.raises(CheckpointError, match="3D model; the image is 2D"):
        next(predict(image[0], (1.0, 1.0), [path], device="cpu"))
    with pytest.raises(InferenceError, match="spatial axes"):
        next(predict(image[None, None], (2.0, 1.0, 1.0), [path], device="cpu"))
    with pytest.raises(InferenceError, match="No checkpoint"):
        next(predict(image, (2.0, 1.0, 1.0), [], device="cpu"))
    other = _ckpt(tmp_path, "b.pt", _plan(classes=3), classes=3)
    with pytest.raises(CheckpointError, match="same classes"):
        next(predict(image, (2.0, 1.0, 1.0), [path, other], device="cpu"))


def test_predict_cancellation(tmp_path, phantom):
    image, _ = phantom
    path = _ckpt(tmp_path, "a.pt", _plan())
    gen = predict(image, (2.0, 1.0, 1.0), [path], device="cpu", mirror=True)
    seen = []
    for event in gen:
        seen.append(event)
        if event.stage == "tiles" and event.current == 3:
            break
    gen.close()
    assert seen[-1].current == 3 and seen[-1].total > 3
    with pytest.raises(StopIteration):
        next(gen)


def test_predict_file_writes_labels_in_source_geometry(tmp_path, phantom):
    from napari_medseg.io import read_nifti, write_nifti

    image, _ = phantom
    src = write_nifti(tmp_path / "case_0000.nii.gz", image, spacing=(2.0, 1.0, 1.0),
                      translate=(-5.0, 3.0, 10.0))
    path = _ckpt(tmp_path, "a.pt", _plan())
    out = tmp_path / "out" / "case.nii.gz"
    events, res = collect(predict_file(src, out, [path], device="cpu", mirror=False))
    assert events[-1].stage == "postprocess"
    written, source = read_nifti(out), read_nifti(src)
    assert written.data.shape == image.shape and np.array_equal(written.data, res.labels)
    assert np.allclose(written.affine, source.affine) and written.spacing == source.spacing

    # nnU-Net style: one file per channel
    src2 = write_nifti(tmp_path / "case_0001.nii.gz", image * 2, geometry=source)
    two = _ckpt(tmp_path, "two.pt", _plan(channels=2), channels=2)
    _, res2 = collect(predict_file([src, src2], tmp_path / "two.nii.gz", [two], device="cpu", mirror=False,
                               save_probabilities=True))
    assert res2.labels.shape == image.shape
    with np.load(tmp_path / "two.npz") as npz:
        assert np.array_equal(npz["probabilities"], res2.probabilities)
        assert npz["probabilities"].shape == (2, *image.shape)
    assert sorted(p.name for p in tmp_path.glob("two*")) == ["two.nii.gz", "two.npz", "two.pt"]
    with pytest.raises(CheckpointError, match="the image has 2"):
        collect(predict_file([src, src2], tmp_path / "x.nii.gz", [path], device="cpu"))
    with pytest.raises(InferenceError, match="must end with"):
        next(predict_file(src, tmp_path / "x.png", [path], device="cpu"))


def test_predict_file_reads_and_writes_other_formats(tmp_path, phantom):
    pytest.importorskip("nrrd")
    pytest.importorskip("SimpleITK")
    from napari_medseg.io import read_volume, write_volume

    image, _ = phantom
    src = write_volume(tmp_path / "case.nrrd", image, None, spacing=(2.0, 1.0, 1.0), translate=(-5.0, 3.0, 10.0))
    path = _ckpt(tmp_path, "a.pt", _plan())
    out = tmp_path / "out" / "case.mha"
    _, res = collect(predict_file(src, out, [path], device="cpu", mirror=False, save_probabilities=True))
    written, source = read_volume(out), read_volume(src)
    assert written.data.shape == image.shape and np.array_equal(written.data, res.labels)
    assert np.allclose(written.affine, source.affine)
    with np.load(tmp_path / "out" / "case.npz") as npz:
        assert np.array_equal(npz["probabilities"], res.probabilities)
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.mha", "case.npz"]  # no temporary left
    with pytest.raises(InferenceError, match="DICOM input"):
        next(predict_file(src, tmp_path / "x.dcm", [path], device="cpu"))


# ------------------------------------------------------------------------------ settings, inferers, input stages
def test_predict_takes_a_config_and_overrides(tmp_path, phantom):
    image, _ = phantom
    path = _ckpt(tmp_path, "a.pt", _plan())
    _, by_kwargs = collect(predict(image, (2.0, 1.0, 1.0), [path], device="cpu", mirror=False,
                                   return_probabilities=True))
    cfg = PredictConfig(device="cpu", mirror=True, return_probabilities=True)
    _, by_config = collect(predict(image, (2.0, 1.0, 1.0), [path], cfg, mirror=False))
    assert np.array_equal(by_config.labels, by_kwargs.labels)
    assert np.allclose(by_config.probabilities, by_kwargs.probabilities, atol=1e-6)
    with pytest.raises(InferenceError, match="Unknown prediction setting"):
        next(predict(image, (2.0, 1.0, 1.0), [path], colour="red"))
    with pytest.raises(InferenceError, match="step"):
        next(predict(image, (2.0, 1.0, 1.0), [path], step=0))


def test_registered_inferer_serves_the_checkpoints_it_claims(tmp_path, phantom):
    image, _ = phantom

    class Constant(Inferer):
        name = "test-constant"

        def claims(self, ckpt):
            return ckpt.label_names.get(1) == "constant"

        def run(self, image, spacing, ckpts, config):
            yield Progress("tiles", 1, 1)
            return PredictionResult(labels=np.full(image.shape[1:], config.batch_size, np.uint8))

    claimed = load_checkpoint(_ckpt(tmp_path, "c.pt", _plan(), label_names={0: "background", 1: "constant"}))
    plain = load_checkpoint(_ckpt(tmp_path, "p.pt", _plan()))
    assert isinstance(select_inferer([plain]), SlidingWindowInferer)
    assert {"sliding_window", "patch_free"} <= set(list_inferers())
    assert register_inferer(Constant) is Constant
    try:
        assert select_inferer([claimed]).name == select_inferer([plain, claimed]).name == "test-constant"
        assert isinstance(select_inferer([plain]), SlidingWindowInferer)
        with pytest.raises(ValueError, match="already registered"):
            register_inferer(Constant())
        events, res = collect(predict(image, (2.0, 1.0, 1.0), [claimed], device="cpu", batch_size=3))
        assert [e.stage for e in events] == ["tiles"] and (res.labels == 3).all()
    finally:
        unregister_inferer("test-constant")
    assert "test-constant" not in list_inferers()
    assert isinstance(select_inferer([claimed]), SlidingWindowInferer)


def test_input_stage_registry_and_group_keys(tmp_path):
    plan = _plan()
    ck = [load_checkpoint(_ckpt(tmp_path, f"{i}.pt", plan, seed=i)) for i in range(2)]
    default = input_stage_for(plan)
    assert type(default) is InputStage
    assert default.group_key(plan, ck[0], 0) == default.group_key(plan, ck[1], 1)  # folds share the input

    class Marked(InputStage):
        name = "test-marked"

        def applies(self, plan):
            return plan.extras.get("test_marked", False)

    marked_plan = _plan()
    marked_plan.extras["test_marked"] = True
    stage = register_input_stage(Marked())
    try:
        assert input_stage_for(marked_plan) is stage and input_stage_for(plan) is default
    finally:
        unregister_input_stage(stage)
    assert input_stage_for(marked_plan) is default


# ------------------------------------------------------------------------------ speed / memory levers
def _naive_window(predictor, image, patch, k, step=0.5):
    """Reference blend: explicit weight-sum volume, one tile at a time (what the window must equal)."""
    starts = compute_tile_starts(image.shape[1:], patch, step)
    w = gaussian_importance(patch)
    acc = torch.zeros(k, *image.shape[1:], dtype=torch.float64)
    cov = torch.zeros(image.shape[1:], dtype=torch.float64)
    import itertools

    for pos in itertools.product(*starts):
        region = tuple(slice(s, s + p) for s, p in zip(pos, patch))
        out = predictor(image[(slice(None), *region)][None])[0]
        acc[(slice(None), *region)] += out.double() * w
        cov[region] += w
    return (acc / cov).float()


@pytest.mark.parametrize("shape,patch", [((23, 30, 19), (8, 12, 8)), ((37, 29), (16, 16))])
def test_window_equals_naive_blend_with_tile_dependent_predictor(shape, patch):
    image = torch.randn(1, *shape)

    def predictor(x):  # depends on the whole tile, so a wrong weight or coverage shows
        return torch.cat([x * x.mean(dim=tuple(range(1, x.ndim)), keepdim=True), torch.tanh(x)], 1)

    _, out = collect(sliding_window(predictor, image, patch, 2, batch_size=2))
    assert torch.allclose(out, _naive_window(predictor, image, patch, 2), atol=1e-5)


def test_coverage_separable_equals_explicit_map():
    padded, patch = (21, 17, 30), (8, 8, 12)
    starts = compute_tile_starts(padded, patch, 0.5)
    import itertools

    regions = [tuple(slice(s, s + p) for s, p in zip(pos, patch)) for pos in itertools.product(*starts)]
    factors = axis_weights(patch, True)
    weight = outer_product(factors).float()
    assert torch.allclose(weight, gaussian_importance(patch))
    logits = torch.rand(3, *padded) + 0.5
    a, b = logits.clone(), logits.clone()
    normalise_by_coverage(a, weight, factors, starts, regions, separable=True, slab_voxels=100)  # many slabs
    normalise_by_coverage(b, weight, factors, starts, regions, separable=False)
    assert torch.allclose(a, b, rtol=1e-5)


def test_channels_last_gives_the_same_logits():
    from napari_medseg.models import create_model

    torch.manual_seed(0)
    model = create_model("unet-3d-fullres", 1, 3, 3, **KW3).eval()
    image = torch.randn(1, 9, 20, 18)
    _, ref = collect(sliding_window(model, image, (8, 16, 16), 3, batch_size=2))
    import copy

    cl = optimize_predictor(copy.deepcopy(model), channels_last=True)
    assert next(p for p in cl.parameters() if p.ndim == 5).is_contiguous(memory_format=torch.channels_last_3d)
    _, out = collect(sliding_window(cl, image, (8, 16, 16), 3, batch_size=2, channels_last=True))
    assert torch.allclose(out, ref, atol=1e-4)


@pytest.mark.slow
def test_compiled_predictor_gives_the_same_logits():
    """torch.compile through optimize_predictor (the "eager" backend: dynamo's tracing without the
    C++ build; starting dynamo alone takes seconds, hence a small network)."""

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.LeakyReLU(0.01)).eval()
    image = torch.randn(1, 9, 20, 18)
    _, ref = collect(sliding_window(model, image, (8, 16, 16), 3, batch_size=2))
    compiled = optimize_predictor(model, compile=True, compile_backend="eager")
    assert compiled is not model and callable(compiled)
    _, out = collect(sliding_window(compiled, image, (8, 16, 16), 3, batch_size=2))
    assert torch.allclose(out, ref, atol=1e-5)


def test_accumulate_dtype_and_amp_flag():
    image = torch.randn(1, 19, 13)
    _, ref = collect(sliding_window(repeat_k(2), image, (8, 8), 2))
    _, half = collect(sliding_window(repeat_k(2), image, (8, 8), 2, accumulate_dtype=torch.float16))
    assert half.dtype == torch.float16 and torch.allclose(half.float(), ref, atol=1e-2)
    big = torch.randn(1, 40, 37, 45)  # 3D corners: float32 weights ~1e-10 there, 0 in float16
    _, ref3 = collect(sliding_window(repeat_k(2), big, (16, 16, 16), 2))
    _, half3 = collect(sliding_window(repeat_k(2), big, (16, 16, 16), 2, accumulate_dtype=torch.float16))
    assert torch.isfinite(half3).all() and torch.allclose(half3.float(), ref3, atol=1e-2)
    _, off = collect(sliding_window(repeat_k(2), image, (8, 8), 2, amp=False))
    assert torch.equal(off, ref)  # on the CPU the default is no autocast
    with pytest.raises(InferenceError, match="accumulate_dtype"):
        collect(sliding_window(repeat_k(2), image, (8, 8), 2, accumulate_dtype=torch.int32))


def test_mirroring_does_not_modify_an_aliased_output():
    image = torch.randn(1, 12, 10)
    _, out = collect(sliding_window(lambda x: x, image, (8, 8), 1, mirror_axes=(0, 1)))
    assert torch.allclose(out, image, atol=1e-5)  # identity is flip-equivariant: TTA changes nothing


def test_inplace_softmax_and_slab_argmax_match_the_plain_ones():
    x = torch.randn(4, 7, 5, 6)
    ref = torch.softmax(x, dim=0)
    out = softmax_inplace(x.clone(), slab_voxels=40)  # several slabs
    assert torch.allclose(out, ref, atol=1e-7)
    probs = np.random.default_rng(0).random((5, 7, 5, 6)).astype(np.float32)
    probs[:, 0, 0, 0] = 0.5  # a tie: the first maximum wins, as np.argmax
    labels = argmax_labels(probs, slab_voxels=40)
    assert labels.dtype == np.uint8 and np.array_equal(labels, np.argmax(probs, axis=0))
    assert argmax_labels(np.zeros((300, 2, 3), np.float32)).dtype == np.uint16


def test_restore_probabilities_overwrite_input_skips_the_copy():
    from napari_medseg.engine.preprocessing import preprocess_case, restore_probabilities

    image = np.random.default_rng(1).random((6, 10, 9)).astype(np.float32) + 1  # no zeros: no crop
    plan = _plan(spacing=(2.0, 1.0, 1.0))
    pre, _, props = preprocess_case(image, (2.0, 1.0, 1.0), plan)
    assert pre.shape[1:] == image.shape  # same spacing: nothing resampled
    probs = np.random.default_rng(2).random((2, *pre.shape[1:])).astype(np.float32)
    copied = restore_probabilities(probs, props, plan)
    shared = restore_probabilities(probs, props, plan, overwrite_input=True)
    assert np.array_equal(copied, probs) and np.array_equal(shared, probs)
    assert not np.shares_memory(copied, probs) and np.shares_memory(shared, probs)
    cropped = image.copy()
    cropped[:, :2] = 0  # a crop box: padded back, background 1 outside
    pre, _, props = preprocess_case(cropped, (2.0, 1.0, 1.0), plan)
    p = np.random.default_rng(3).random((2, *pre.shape[1:])).astype(np.float32)
    out = restore_probabilities(p, props, plan, overwrite_input=True)
    assert out.shape == (2, *image.shape) and (out[0, :, :2] == 1).all() and (out[1, :, :2] == 0).all()


# ------------------------------------------- labels only: logits relative to class 0 (K - 1 volumes)
@pytest.mark.parametrize("mirror_axes, batch_size", [((), 1), ((0, 2), 2)])
def test_relative_window_is_the_shifted_full_window(mirror_axes, batch_size):
    image = torch.randn(1, 21, 30, 18)

    def predictor(x):  # 3 classes, tile-dependent
        m = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        return torch.cat([x * m, torch.tanh(x), x.flip(-1) - 0.3], 1)

    _, full = collect(sliding_window(predictor, image, (8, 12, 8), 3, mirror_axes=mirror_axes, batch_size=batch_size))
    _, rel = collect(sliding_window(predictor, image, (8, 12, 8), 3, mirror_axes=mirror_axes, batch_size=batch_size,
                                    relative=True))
    assert rel.shape == (2, 21, 30, 18)
    assert torch.allclose(rel, full[1:] - full[:1], atol=1e-5)
    assert np.array_equal(argmax_relative(rel), full.argmax(0).numpy().astype(np.uint8))


def test_argmax_relative_ties_pick_the_first_class():
    rel = torch.tensor([[0.0, 1.0, -1.0, 2.0], [0.0, 1.0, 0.0, -5.0]]).reshape(2, 1, 1, 4)
    # columns: all tie at 0 -> 0; classes 1, 2 tie at 1 -> 1; class 2 ties class 0 at 0 -> 0; class 1 -> 1
    assert argmax_relative(rel).ravel().tolist() == [0, 1, 0, 1]
    with pytest.raises(InferenceError, match="2 classes"):
        collect(sliding_window(lambda x: x, torch.randn(1, 8, 8, 8), (8, 8, 8), 1, relative=True))


@pytest.mark.parametrize("classes", [2, 3])
def test_predict_labels_only_route_gives_the_probabilities_routes_labels(tmp_path, phantom, classes, monkeypatch):
    """Labels-only prediction (relative logits, argmax on the plan grid, labels restored) equals
    the argmax of the restored probabilities, with a crop and a transpose to undo."""
    image, _ = phantom
    padded = np.pad(image - image.min() + 1.0, ((1, 2), (3, 0), (0, 2)))  # crop box to restore
    plan = _plan(classes=classes)
    plan.transpose_forward, plan.transpose_backward = [1, 0, 2], [1, 0, 2]
    plan.spacing = (1.0, 2.0, 1.0)  # the transposed spacing: no resampling
    path = _ckpt(tmp_path, "t.pt", plan, classes=classes)
    calls = []
    real = SlidingWindowInferer.window

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("relative", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SlidingWindowInferer, "window", spy)
    _, labels_only = collect(predict(padded, (2.0, 1.0, 1.0), [path], device="cpu", mirror=True))
    _, with_probs = collect(predict(padded, (2.0, 1.0, 1.0), [path], device="cpu", mirror=True,
                                    return_probabilities=True))
    assert calls == [True, False]
    assert labels_only.probabilities is None and labels_only.labels.dtype == np.uint8
    assert labels_only.label_names == with_probs.label_names
    agree = (labels_only.labels == with_probs.labels).mean()
    assert agree > 0.999, agree  # float rounding may flip an exact near-tie, nothing more
    assert np.array_equal(labels_only.labels, with_probs.probabilities.argmax(0)) or agree > 0.999
    assert (labels_only.labels[:1] == 0).all()  # outside the crop box: background

    calls.clear()  # resampling back, or an ensemble: the probabilities route
    collect(predict(padded, (3.0, 1.0, 1.0), [path], device="cpu", mirror=False))
    collect(predict(padded, (2.0, 1.0, 1.0), [path, path], device="cpu", mirror=False))
    assert calls == [False, False, False]
