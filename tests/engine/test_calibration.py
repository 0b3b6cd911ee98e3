"""Class-prior calibration: fitting the factors, and prediction applying a checkpoint's factors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint
from napari_medseg.engine.evaluation import EvaluationError, class_volumes, fit_class_weights
from napari_medseg.engine.inference import (
    InferenceError,
    InputStage,
    argmax_labels,
    argmax_relative,
    predict,
)
from napari_medseg.engine.inference.inferers import CLASS_WEIGHTS, class_weights_of
from napari_medseg.engine.jobs import collect
from napari_medseg.engine.planning import Plan
from napari_medseg.io.phantom import make_phantom

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(0, keepdims=True))
    return (e / e.sum(0, keepdims=True)).astype(np.float32)


def _biased_case(shape=(6, 10, 60), seed=0):
    """Three classes along the last axis (background, class 1 on 20..35, class 2 on 35..60) and a
    softmax whose class 1 reaches 5 voxels too far on both sides, with noise."""
    rng = np.random.default_rng(seed)
    x = np.arange(shape[-1], dtype=np.float32)
    ref = np.zeros(shape, np.uint8)
    ref[..., 20:35] = 1
    ref[..., 35:] = 2
    logits = np.zeros((3, *shape), np.float32)
    logits[1] = np.minimum(x - 15, 40 - x) * 0.4  # positive on 15..40: 10 voxels too many
    logits[2] = (x - 40) * 0.4
    logits += rng.normal(0, 0.3, logits.shape).astype(np.float32)
    return _softmax(logits), ref


def test_fit_matches_volumes_and_moves_the_biased_class_only():
    probs, ref = _biased_case()
    before = class_volumes(argmax_labels(probs), 3)
    assert before[1] > 1.4 * class_volumes(ref, 3)[1]  # the premise: class 1 over-predicted
    weights, history = fit_class_weights([probs], [ref], iterations=20)
    assert weights[0] == 1.0 and weights[1] < 0.5
    after = class_volumes(argmax_labels(probs, weights=weights), 3)
    ratio = after[1:] / class_volumes(ref, 3)[1:]
    assert np.all(np.abs(ratio - 1) <= 0.01), ratio
    assert history[0][1] == pytest.approx(before[1] / class_volumes(ref, 3)[1])
    assert abs(history[-1][1] - 1) <= 0.01
    # Overlap with the reference improves with the volumes.
    dice = lambda lab: 2 * ((lab == 1) & (ref == 1)).sum() / ((lab == 1).sum() + (ref == 1).sum())  # noqa: E731
    assert dice(argmax_labels(probs, weights=weights)) > dice(argmax_labels(probs)) + 0.1


def test_fit_counts_what_clean_leaves_and_sums_cases():
    probs, ref = _biased_case()
    probs2, ref2 = _biased_case(seed=1)

    def clean(labels):  # a post-processing that removes every class-1 voxel of the first row
        out = labels.copy()
        out[0][out[0] == 1] = 0
        return out

    weights, _ = fit_class_weights([probs, probs2], [ref, ref2], clean=clean, iterations=20)
    got = sum(class_volumes(clean(argmax_labels(p, weights=weights)), 3) for p in (probs, probs2))
    want = class_volumes(ref, 3) + class_volumes(ref2, 3)
    assert np.all(np.abs(got[1:] / want[1:] - 1) <= 0.01)
    plain, _ = fit_class_weights([probs, probs2], [ref, ref2], iterations=20)
    assert weights[1] > plain[1]  # clean takes some class 1 away: a smaller correction is needed


def test_fit_leaves_a_class_absent_from_the_references_alone_and_rejects_bad_input():
    probs, ref = _biased_case()
    ref = np.where(ref == 2, 0, ref).astype(np.uint8)  # no class 2 in the reference
    weights, history = fit_class_weights([probs], [ref], iterations=3)
    assert weights[2] == 1.0 and np.isnan(history[0][2])
    with pytest.raises(EvaluationError, match="one reference"):
        fit_class_weights([probs], [])
    with pytest.raises(EvaluationError, match="do not fit"):
        fit_class_weights([probs], [ref[..., :10]])


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, 0.3, 2.0], [2.0, 1.0, 0.5]])
def test_weighted_relative_argmax_equals_weighted_softmax_argmax(weights):
    logits = torch.randn(3, 5, 7, 9) * 2
    probs = torch.softmax(logits, 0).numpy()
    relative = logits[1:] - logits[:1]
    assert np.array_equal(argmax_relative(relative, weights=np.array(weights)),
                          argmax_labels(probs, weights=np.array(weights)))
    if weights == [1.0, 1.0, 1.0]:
        assert np.array_equal(argmax_labels(probs, weights=np.array(weights)), probs.argmax(0))


# ------------------------------------------------------------------------ prediction reads the checkpoint
KW3 = {"pool_kernels": [[1, 2, 2], [2, 2, 2]], "conv_kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
       "base_width": 4}


def _ckpt(path, extra=None):
    from napari_medseg.models import create_model

    plan = Plan(configuration="3d_fullres", spacing=(2.0, 1.0, 1.0), patch_size=(8, 16, 16), batch_size=2,
                pool_kernels=KW3["pool_kernels"], conv_kernels=KW3["conv_kernels"], normalization=["zscore"],
                num_channels=1, num_classes=2, use_mask_for_norm=[False])
    torch.manual_seed(0)
    model = create_model("unet-3d-fullres", 1, 2, 3, **KW3)
    return save_checkpoint(path, model, model_name="unet-3d-fullres", model_kwargs=KW3, in_channels=1,
                           num_classes=2, spatial_dims=3, plan=plan, label_names={0: "background", 1: "ellipsoid"},
                           extra=extra or {})


@pytest.fixture(scope="module")
def image():
    return make_phantom((12, 26, 21), num_classes=2, seed=3)[0]


@pytest.mark.parametrize("spacing", [(2.0, 1.0, 1.0), (2.4, 1.3, 0.9)])  # the labels-only path; resampled
def test_predict_applies_the_checkpoints_class_weights(tmp_path, image, spacing):
    plain = _ckpt(tmp_path / "plain.pt")
    _, ref = collect(predict(image, spacing, [plain], device="cpu", mirror=False, return_probabilities=True))
    p1 = ref.probabilities[1]
    threshold = float(np.quantile(p1, 0.5))  # a factor that moves the boundary to the median voxel
    w1 = (1 - threshold) / threshold
    weighted = _ckpt(tmp_path / "weighted.pt", {CLASS_WEIGHTS: [1.0, w1]})
    assert load_checkpoint(weighted).extra[CLASS_WEIGHTS] == [1.0, w1]
    _, labels_only = collect(predict(image, spacing, [weighted], device="cpu", mirror=False))
    _, with_probs = collect(predict(image, spacing, [weighted], device="cpu", mirror=False,
                                    return_probabilities=True))
    want = (p1 * w1 > (1 - p1)).astype(np.uint8)
    decided = np.abs(p1 * w1 - (1 - p1)) > 1e-4  # voxels not on the boundary within float error
    assert np.array_equal(labels_only.labels[decided], want[decided])
    assert np.array_equal(with_probs.labels[decided], want[decided])
    assert np.allclose(with_probs.probabilities, ref.probabilities)  # the model's own softmax is returned
    assert abs(want.mean() - 0.5) < 0.05 and not np.array_equal(want, ref.labels)


def test_old_checkpoints_have_no_weights_and_bad_weights_fail_before_compute(tmp_path, image, monkeypatch):
    assert class_weights_of(load_checkpoint(_ckpt(tmp_path / "old.pt"))) is None
    monkeypatch.setattr(InputStage, "prepare", lambda *a, **k: pytest.fail("preprocessing ran before the check"))
    for bad in ([1.0], [1.0, 0.0], [1.0, float("nan")], "x"):
        path = _ckpt(tmp_path / "bad.pt", {CLASS_WEIGHTS: bad})
        with pytest.raises(InferenceError, match="positive numbers"):
            next(predict(image, (2.0, 1.0, 1.0), [path], device="cpu"))
