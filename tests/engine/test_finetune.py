"""Fine-tuning on few painted slices: re-planning for new data, time budget, honest validation."""

from __future__ import annotations

import numpy as np
import pytest
from medseg_testing import make_tiny_checkpoint

from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint
from napari_medseg.engine.jobs import EpochEnd, Message, collect
from napari_medseg.engine.training import TrainConfig, train
from napari_medseg.engine.training.replan import fit_patch

IGNORE = 3


def _ct_like(shape=(24, 40, 40), painted=(4, 9, 14, 19)):
    """A 'CT' in HU with two organs, painted on a few axial slices (ignore label elsewhere)."""
    rng = np.random.default_rng(0)
    truth = np.zeros(shape, np.int16)
    truth[3:21, 8:24, 6:20] = 1
    truth[5:18, 26:34, 22:34] = 2
    image = np.where(truth == 1, 60.0, np.where(truth == 2, 45.0, -1000.0)) + rng.normal(0, 8, shape)
    label = np.full(shape, IGNORE, np.int16)
    label[list(painted)] = truth[list(painted)]
    return image.astype(np.float32), label, truth


def _parent(tmp_path, mirror_axes=(2,)):
    path = make_tiny_checkpoint(tmp_path / "parent.pt", num_classes=4, spacing=(1.0, 1.0, 1.0),
                                label_names={0: "background", 1: "caudate", 2: "putamen", 3: "thalamus"})
    ckpt = load_checkpoint(path)
    save_checkpoint(path, ckpt.state_dict, model_name=ckpt.model_name, model_kwargs=ckpt.model_kwargs,
                    in_channels=1, num_classes=4, spatial_dims=3, plan=ckpt.plan, label_names=ckpt.label_names,
                    train_config={"mirror_axes": list(mirror_axes)})
    return str(path)


def _run(tmp_path, **kw):
    image, label, truth = _ct_like()
    names = {0: "background", 1: "liver", 2: "spleen"}
    config = TrainConfig(output_dir=str(tmp_path / "run"), device="cpu", ignore_label=IGNORE, label_names=names,
                         batch_size=2, val_batches=1, seed=0, **kw)
    events, path = collect(train(config, [(image, label, (3.0, 2.0, 2.0))]))
    return events, path


def test_finetune_on_another_domain_replans_and_keeps_what_fits(tmp_path):
    parent = _parent(tmp_path)
    events, path = _run(tmp_path, init_checkpoint=parent, epochs=1, iterations_per_epoch=2)
    texts = [e.text for e in events if isinstance(e, Message)]
    assert any(t.startswith("Re-planned for this data") for t in texts), texts
    ckpt = load_checkpoint(path)
    assert tuple(ckpt.plan["spacing"]) != (1.0, 1.0, 1.0)
    assert ckpt.num_classes == 3  # the user's classes: a new head
    assert ckpt.label_names == {0: "background", 1: "liver", 2: "spleen"}
    assert ckpt.plan["pool_kernels"] == load_checkpoint(parent).plan["pool_kernels"]  # same architecture
    assert list(ckpt.train_config["mirror_axes"]) == [2]  # inherited: TTA stays as cheap as the parent's


def test_time_budget_ends_the_run_and_reports_held_out_slices(tmp_path):
    events, path = _run(tmp_path, model="unet-3d-fullres", model_kwargs={"base_width": 4, "max_width": 16},
                        patch_size=(16, 16, 16), minutes=0.05, epochs=10**6, iterations_per_epoch=2)
    ends = [e for e in events if isinstance(e, EpochEnd)]
    texts = [e.text for e in events if isinstance(e, Message)]
    assert ends and any("Time budget of 0.05 min spent" in t for t in texts), texts
    assert all(e.validation == "held-out slices" for e in ends)
    assert any("held-out painted slice" in t for t in texts)
    assert ends[-1].lr < ends[0].lr or len(ends) == 1  # the rate decays over the budget
    assert load_checkpoint(path).epoch == ends[-1].epoch
    ckpt = load_checkpoint(path)
    assert ckpt.plan["normalization"] == ["ct"]  # arrays in HU are a CT, not z-scored MRI
    stats = ckpt.plan["intensity_stats"][0] if "intensity_stats" in ckpt.plan else None
    if stats:  # the organs' range (painted foreground), not the ignore label's whole body
        assert stats["percentile_00_5"] > -200


def test_too_few_painted_slices_means_no_validation(tmp_path):
    image, label, _ = _ct_like(painted=(6, 15))
    config = TrainConfig(output_dir=str(tmp_path / "run"), device="cpu", ignore_label=IGNORE,
                         model_kwargs={"base_width": 4, "max_width": 16}, patch_size=(16, 16, 16),
                         batch_size=2, epochs=1, iterations_per_epoch=1, val_batches=1,
                         label_names={0: "background", 1: "liver", 2: "spleen"})
    events, _ = collect(train(config, [(image, label, (3.0, 2.0, 2.0))]))
    ends = [e for e in events if isinstance(e, EpochEnd)]
    assert ends[0].validation == "none" and ends[0].val_dice == {}
    assert any(isinstance(e, Message) and e.text.startswith("No validation") for e in events)


@pytest.mark.parametrize(("patch", "pools", "expected"), [
    ((20, 40, 40), [[1, 2, 2], [2, 2, 2]], (20, 40, 40)),
    ((21, 37, 40), [[2, 2, 2], [2, 2, 2]], (24, 40, 40)),
    ((3, 5), [[2, 2], [2, 2]], (4, 8)),
])
def test_fit_patch_rounds_to_the_pooling(patch, pools, expected):
    assert fit_patch(patch, pools) == expected


def test_sided_classes_are_never_mirrored_left_right(tmp_path):
    """kidney_left mirrored is a right kidney labelled left: the left-right axis is not mirrored."""
    parent = _parent(tmp_path, mirror_axes=(0, 1, 2))
    image, label, _ = _ct_like()
    names = {0: "background", 1: "kidney_left", 2: "kidney_right"}
    config = TrainConfig(output_dir=str(tmp_path / "run"), device="cpu", ignore_label=IGNORE, label_names=names,
                         batch_size=2, val_batches=1, epochs=1, iterations_per_epoch=1, init_checkpoint=parent)
    events, path = collect(train(config, [(image, label, (3.0, 2.0, 2.0))]))
    assert list(load_checkpoint(path).train_config["mirror_axes"]) == [0, 1]  # arrays: x (axis 2) is left-right
    assert any(isinstance(e, Message) and "no mirroring along the left-right axis" in e.text for e in events)
    # unsided names keep the parent's axes
    events, path = _run(tmp_path / "b", init_checkpoint=parent, epochs=1, iterations_per_epoch=1)
    assert list(load_checkpoint(path).train_config["mirror_axes"]) == [0, 1, 2]


@pytest.mark.parametrize(("orientation", "dims", "axis"), [
    ("SAR", 3, 2), ("RAS", 3, 0), ("LPS", 2, None), ("ASL", 2, 1), (None, 3, 2), (None, 2, 1)])
def test_left_right_patch_axis(orientation, dims, axis):
    from napari_medseg.engine.training.state import left_right_patch_axis, sided_classes

    assert left_right_patch_axis(orientation, dims) == axis
    assert sided_classes({1: "kidney_left", 2: "Left-Putamen", 3: "lung R", 4: "liver", 5: "lr_sum"}) == [
        "kidney_left", "Left-Putamen", "lung R"]


def test_guess_modality_tells_hounsfield_units_from_mr():
    from napari_medseg.engine.preprocessing import guess_modality

    image, _, _ = _ct_like()
    assert guess_modality(image) == "CT"
    rng = np.random.default_rng(0)
    assert guess_modality(rng.gamma(2.0, 200.0, (20, 30, 30))) == "MRI"  # T1 in scanner units
    assert guess_modality(rng.normal(0, 1, (20, 30, 30))) == "MRI"  # z-scored
    assert guess_modality(np.full((4, 4, 4), -5000.0)) == "MRI"  # not a scanner's HU


def test_fingerprint_foreground_leaves_out_the_ignore_label():
    from napari_medseg.engine.planning.fingerprint import compute_fingerprint

    image, label, _ = _ct_like()
    with_ignore = compute_fingerprint([(image, (3.0, 2.0, 2.0), label)])
    without = compute_fingerprint([(image, (3.0, 2.0, 2.0), label)], ignore_label=IGNORE)
    assert with_ignore["intensity_stats"][0]["percentile_00_5"] < -900  # the body's air counted as organ
    assert without["intensity_stats"][0]["percentile_00_5"] > 0  # organs only (40-60 HU)


@pytest.mark.parametrize(("patch", "pools", "cap", "expected"), [
    ((112, 112, 128), [[2, 2, 2]] * 5, 64**3, (64, 64, 64)),
    ((112, 128), [[2, 2]] * 4, 64**3, (112, 128)),
    ((40, 40, 40), [[2, 2, 2]] * 5, 10, (32, 32, 32)),  # never below the pooling's stride
])
def test_cap_patch_halves_the_largest_axes(patch, pools, cap, expected):
    from napari_medseg.engine.training.replan import cap_patch

    assert cap_patch(patch, pools, cap) == expected


def test_a_time_budget_takes_adam_unless_told_otherwise():
    from napari_medseg.engine.training.config import BUDGET_RECIPE, resolve_recipe

    budget = resolve_recipe(TrainConfig(minutes=5))
    assert (budget.optimizer, budget.lr) == (BUDGET_RECIPE["optimizer"], BUDGET_RECIPE["lr"])
    assert resolve_recipe(TrainConfig()).optimizer == "sgd"  # epochs x iterations: nnU-Net's recipe
    assert resolve_recipe(TrainConfig(minutes=5, optimizer="sgd")).lr == 1e-2


# ------------------------------------------------------------------ corrections of the parent's own classes
NAMES = {0: "background", 1: "caudate", 2: "putamen"}


def _mr_painted(shape=(32, 32, 32), painted=(8, 14, 20)):
    """A 'T1' (positive arbitrary units) with two structures, painted on a few slices."""
    rng = np.random.default_rng(1)
    truth = np.zeros(shape, np.int16)
    truth[6:24, 6:16, 6:26] = 1
    truth[6:24, 18:28, 6:26] = 2
    image = np.where(truth == 1, 300.0, np.where(truth == 2, 500.0, 100.0)) + rng.normal(0, 10, shape)
    label = np.full(shape, IGNORE, np.int16)
    label[list(painted)] = truth[list(painted)]
    return image.astype(np.float32), label


def _correction(tmp_path, parent_extra=None, names=NAMES, spacing=(1.0, 1.0, 1.0), **kw):
    from napari_medseg.engine.checkpoints.fields import (
        CLASS_WEIGHTS,
        LARGEST_COMPONENT,
        LARGEST_FOREGROUND,
        PAIRED_CLASSES,
    )

    extra = {PAIRED_CLASSES: [1, 2], LARGEST_COMPONENT: True, LARGEST_FOREGROUND: True,
             CLASS_WEIGHTS: [1.0, 0.5, 0.7]} if parent_extra is None else parent_extra
    parent = make_tiny_checkpoint(tmp_path / "parent.pt", num_classes=3, spacing=(2.0, 2.0, 2.0),
                                  label_names=dict(NAMES), extra=extra)
    image, label = _mr_painted()
    config = TrainConfig(output_dir=str(tmp_path / "run"), device="cpu", ignore_label=IGNORE, label_names=names,
                         init_checkpoint=parent, batch_size=2, val_batches=1, seed=0, patch_size=(16, 16, 16),
                         epochs=1, iterations_per_epoch=1, **kw)
    events, path = collect(train(config, [(image, label, spacing)]))
    return [e.text for e in events if isinstance(e, Message)], load_checkpoint(path)


def test_finer_data_keep_the_parents_grid(tmp_path):
    """1 mm data into a 2 mm parent: resampled onto its grid (as prediction does), not re-planned."""
    texts, ckpt = _correction(tmp_path)
    assert not any(t.startswith("Re-planned") for t in texts), texts
    assert tuple(ckpt.plan["spacing"]) == (2.0, 2.0, 2.0)
    # coarser data still re-plan (the parent's grid would upsample them)
    texts, ckpt = _correction(tmp_path / "coarse", spacing=(4.0, 4.0, 4.0))
    assert any(t.startswith("Re-planned") for t in texts), texts
    assert tuple(ckpt.plan["spacing"]) != (2.0, 2.0, 2.0)


def test_a_correction_keeps_the_parents_postprocessing_but_not_its_class_weights(tmp_path):
    from napari_medseg.engine.checkpoints.fields import CLASS_WEIGHTS, POSTPROCESSING

    texts, ckpt = _correction(tmp_path)
    assert {k: ckpt.extra.get(k) for k in POSTPROCESSING} == {
        "paired_classes": [1, 2], "largest_component": True, "largest_foreground_component": True}
    assert CLASS_WEIGHTS not in ckpt.extra and "best_dice" in ckpt.extra
    assert any(t.startswith("Kept the parent's post-processing") and "not its class weights" in t for t in texts)
    # resuming the fine-tuned run keeps them too
    config = TrainConfig(output_dir=str(tmp_path / "run"), device="cpu", ignore_label=IGNORE, label_names=NAMES,
                         resume=str(tmp_path / "run" / "checkpoint_latest.pt"), batch_size=2, val_batches=1,
                         patch_size=(16, 16, 16), epochs=2, iterations_per_epoch=1)
    image, label = _mr_painted()
    _, path = collect(train(config, [(image, label, (1.0, 1.0, 1.0))]))
    assert load_checkpoint(path).extra["paired_classes"] == [1, 2]


def test_another_task_keeps_none_of_the_parents_recommendations(tmp_path):
    texts, ckpt = _correction(tmp_path, names={0: "background", 1: "liver", 2: "spleen"})
    assert set(ckpt.extra) == {"best_dice"}
    assert not any(t.startswith("Kept the parent's") for t in texts)


@pytest.mark.parametrize(("names", "kw", "lr"), [
    (NAMES, {}, "correction"),  # a budgeted correction: the gentle rate
    ({0: "background", 1: "liver", 2: "spleen"}, {}, 1e-3),  # another task: the budget's rate
    (NAMES, {"lr": 2e-4}, 2e-4),  # the user's rate wins
])
def test_a_budgeted_correction_trains_gently(tmp_path, names, kw, lr):
    from napari_medseg.engine.training.correction import CORRECTION_LR

    texts, ckpt = _correction(tmp_path, names=names, minutes=0.02, **kw)
    expected = CORRECTION_LR if lr == "correction" else lr
    assert ckpt.train_config["lr"] == pytest.approx(expected)
    assert any(t.startswith("A correction of the parent's own classes") for t in texts) == (lr == "correction")


def test_a_resumed_correction_keeps_its_rate(tmp_path):
    """Stop and Resume in the Train widget resend the run's config with ``resume`` set: the run goes
    on at the correction's rate, not the budget's 1e-3."""
    from napari_medseg.engine.training.correction import CORRECTION_LR

    texts, ckpt = _correction(tmp_path, minutes=0.02)
    assert ckpt.train_config["lr"] == pytest.approx(CORRECTION_LR)
    image, label = _mr_painted()
    config = TrainConfig(output_dir=str(tmp_path / "run"), device="cpu", ignore_label=IGNORE, label_names=NAMES,
                         init_checkpoint=str(tmp_path / "parent.pt"), resume=str(tmp_path / "run" / "checkpoint_latest.pt"),
                         batch_size=2, val_batches=1, seed=0, patch_size=(16, 16, 16), minutes=0.02,
                         epochs=10**6, iterations_per_epoch=1)
    events, path = collect(train(config, [(image, label, (1.0, 1.0, 1.0))]))
    assert load_checkpoint(path).train_config["lr"] == pytest.approx(CORRECTION_LR)
    assert any(isinstance(e, Message) and e.text.startswith("Resumed at the run's learning rate") for e in events)
