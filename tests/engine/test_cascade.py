"""The nnU-Net cascade: a low-res stage, then a full-res U-Net that also sees its one-hot prediction."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from napari_medseg.engine.checkpoints import build_model, load_checkpoint
from napari_medseg.engine.inference import predict
from napari_medseg.engine.inference.variants.cascade import previous_stage_checkpoint
from napari_medseg.engine.jobs import drive
from napari_medseg.engine.training import TrainConfig, TrainingError, train, trainer_for
from napari_medseg.engine.training.variants.cascade import (
    CascadeTrainer,
    onehot_torch,
    perturb_onehot,
)
from napari_medseg.io.phantom import make_phantom

TINY = {"base_width": 4, "max_width": 16}


def _cases(n=2, shape=(16, 32, 32)):
    return [(*make_phantom(shape, num_classes=3, seed=i, noise=0.2), (1.0, 1.0, 1.0)) for i in range(n)]


def _cfg(tmp_path, name, model, configuration, **kw):
    return TrainConfig(
        output_dir=str(tmp_path / name), model=model, configuration=configuration, model_kwargs=dict(TINY),
        epochs=1, iterations_per_epoch=3, val_batches=1, patch_size=(16, 16, 16), batch_size=2, device="cpu",
        label_names={0: "background", 1: "a", 2: "b"}, **kw,
    )


def test_cascade_trains_and_predicts_through_its_previous_stage(tmp_path):
    torch.set_num_threads(1)
    low = drive(train(_cfg(tmp_path, "low", "unet-3d-lowres", "3d_fullres"), _cases()))
    cfg = _cfg(tmp_path, "casc", "unet-3d-cascade", "3d_cascade_fullres", variant_options={"previous_stage": low})
    path = drive(train(cfg, _cases()))
    ckpt = load_checkpoint(path)
    assert ckpt.plan["previous_stage"] == "3d_lowres"
    assert ckpt.train_config["variant_options"] == {"previous_stage": low}
    assert os.path.isfile(tmp_path / "casc" / "previous_stage.pt")
    assert previous_stage_checkpoint(ckpt).model_name == "unet-3d-lowres"
    # The network really sees image + (K - 1) one-hot channels.
    first_conv = next(m for m in build_model(ckpt).modules() if isinstance(m, torch.nn.Conv3d))
    assert first_conv.in_channels == 1 + 2
    image = make_phantom((16, 32, 32), num_classes=3, seed=7)[0]
    stages = set()
    gen = predict(image, (1.0, 1.0, 1.0), [ckpt], device="cpu", mirror=False)
    while True:
        try:
            stages.add(next(gen).stage)
        except StopIteration as stop:
            result = stop.value
            break
    assert "previous stage tiles" in stages and "tiles" in stages
    assert result.labels.shape == image.shape


def test_perturbation_changes_masks_but_keeps_them_binary():
    seg = torch.zeros(4, 1, 16, 16, 16, dtype=torch.long)
    seg[:, :, 4:12, 4:12, 4:12] = 1
    seg[:, :, 1:3, 1:3, 1:3] = 2
    onehot = onehot_torch(seg, 3)
    assert onehot.shape == (4, 2, 16, 16, 16)
    gen = torch.Generator().manual_seed(0)
    out = perturb_onehot(onehot, gen, p_morph=1.0, p_remove=0.0)
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    assert not torch.equal(out, onehot)
    same = perturb_onehot(onehot, gen, p_morph=0.0, p_remove=0.0)
    assert torch.equal(same, onehot)
    two = onehot.clone()
    two[:, 0, 14:16, 14:16, 14:16] = 1  # a second component of class 1
    removed = perturb_onehot(two, torch.Generator().manual_seed(1), p_morph=0.0, p_remove=1.0)
    sums = removed[:, 0].flatten(1).sum(1).numpy()
    assert np.all((sums == onehot[:, 0].flatten(1).sum(1).numpy()) | (sums == 8))


def test_cascade_needs_its_previous_stage(tmp_path):
    cfg = _cfg(tmp_path, "casc", "unet-3d-cascade", "3d_cascade_fullres")
    with pytest.raises(TrainingError, match="previous_stage"):
        drive(train(cfg, _cases()))


def test_cascade_trainer_is_chosen_by_the_plan_and_old_configs_load():
    class Plan:
        extras = {"previous_stage": "3d_lowres"}

    cfg = TrainConfig(model="unet-3d-cascade")
    assert trainer_for(cfg, Plan()) is CascadeTrainer
    Plan.extras = {}
    assert trainer_for(cfg, Plan()) is not CascadeTrainer
    # run.json / checkpoint configs written before variant_options stored it as a top-level key
    old = {**TrainConfig().to_dict(), "previous_stage": "low.pt"}
    del old["variant_options"]
    assert TrainConfig.from_dict(old).variant_options == {"previous_stage": "low.pt"}
    with pytest.raises(TrainingError, match="Unknown"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "no_such_setting": 1})
