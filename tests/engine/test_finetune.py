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
