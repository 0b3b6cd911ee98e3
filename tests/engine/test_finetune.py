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
