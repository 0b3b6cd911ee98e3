"""PFSeg's trainer variant: whole volumes, dispatch from train(), loss descent, plateau schedule."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_medseg.engine.checkpoints import build_model, load_checkpoint
from napari_medseg.engine.inference.variants.patchfree import whole_volume_grid
from napari_medseg.engine.jobs import EpochEnd, Message, collect, drive
from napari_medseg.engine.training import (
    TrainConfig,
    TrainingError,
    prepare_data,
    train,
    trainer_for,
)
from napari_medseg.engine.training.variants.pfseg import PFSegTrainer, WholeVolumeSampler, sr_target
from napari_medseg.io.phantom import make_phantom

SHAPE = (24, 30, 30)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cases(n=2, num_classes=3):
    return [(*make_phantom(SHAPE, num_classes=num_classes, seed=i, noise=0.2), (1.0, 1.0, 1.0)) for i in range(n)]


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"), model="pfseg", model_kwargs={"width": 4}, epochs=3,
        iterations_per_epoch=3, val_batches=1, device="cpu", augment=False, lr=3e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_whole_volume_grid():
    assert whole_volume_grid((24, 30, 30)) == (32, 32, 64)  # one bottleneck voxel is bumped
    assert whole_volume_grid((40, 70, 33)) == (64, 96, 64)
    assert whole_volume_grid((64, 64, 64)) == (64, 64, 64)


def test_sampler_pads_whole_cases_centrally():
    class Case:
        name = "c"
        image = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5) + 1
        label = np.ones((3, 4, 5), np.int16)

    images, labels = WholeVolumeSampler([Case()], (5, 8, 5), batch_size=2).sample()
    assert images.shape == (2, 2, 5, 8, 5) and labels.shape == (2, 1, 5, 8, 5)
    assert labels.dtype == torch.int64 and images.dtype == torch.float32
    # offsets (5-3)//2 = 1, (8-4)//2 = 2, 0: the case sits in the middle, zeros around it
    assert torch.equal(images[0, :, 1:4, 2:6, :], torch.from_numpy(Case.image))
    assert images.sum() == 2 * Case.image.sum() and labels.sum() == 2 * 60
    with pytest.raises(ValueError, match="larger"):
        WholeVolumeSampler([Case()], (2, 8, 5), 1)


def test_sr_target_is_min_max_per_sample():
    hr = torch.tensor([[-1.0, 0.0, 3.0], [2.0, 2.0, 2.0]]).view(2, 1, 1, 1, 3)
    out = sr_target(hr)
    assert torch.allclose(out[0].flatten(), torch.tensor([0.0, 0.25, 1.0]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # constant: zeros, not NaN


def test_train_dispatches_to_pfseg_and_the_loss_decreases(tmp_path):
    # registered for the pfseg model, whatever the plan
    assert trainer_for(_config(tmp_path), SimpleNamespace(extras={})) is PFSegTrainer
    events, path = collect(train(_config(tmp_path), _cases()))
    assert any(isinstance(e, Message) and "whole volumes padded to 32x32x64" in e.text for e in events)
    epochs = [e for e in events if isinstance(e, EpochEnd)]
    losses = [e.train_loss for e in epochs]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert set(epochs[0].val_dice) == {"class_1", "class_2"}
    assert all(e.lr == pytest.approx(3e-3) for e in epochs)  # the plateau schedule kept it

    ckpt = load_checkpoint(path)
    assert ckpt.model_name == "pfseg" and ckpt.num_classes == 3 and ckpt.model_kwargs == {"width": 4}
    assert tuple(ckpt.plan["patch_size"]) == (32, 32, 64)
    net = build_model(ckpt)
    trained = {k: v for k, v in ckpt.state_dict.items()}
    assert all(torch.equal(trained[k], v) for k, v in net.state_dict().items())
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        assert net(x).shape == (1, 3, 32, 32, 64)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["model"] == "pfseg"


def test_recipe_and_plateau_schedule(tmp_path):
    cfg = _config(tmp_path, lr=None)
    data = drive(prepare_data(cfg, _cases(n=1, num_classes=2)))
    trainer = PFSegTrainer(cfg, data)
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert trainer.config.lr == pytest.approx(1e-4) and trainer.plan.batch_size == 1
    assert trainer.lr_at(0) == pytest.approx(1e-4)
    # validation Dice stuck at .5: after the best epoch and 20 more without improvement, lr / 10
    for epoch in range(22):
        trainer.on_epoch_end(EpochEnd(epoch=epoch, epochs=100, train_loss=1.0, val_loss=1.0,
                                      val_dice={"class_1": 0.5}, lr=trainer.lr_at(epoch), elapsed_s=0.0))
    assert trainer.lr_at(22) == pytest.approx(1e-5)
    val_loss, dice = trainer.validate()
    assert np.isfinite(val_loss) and set(dice) == {"class_1"}


def test_ignore_label_is_refused(tmp_path):
    cfg = _config(tmp_path, ignore_label=2)
    data = drive(prepare_data(cfg, _cases(n=1, num_classes=2)))
    with pytest.raises(TrainingError, match="ignore label"):
        PFSegTrainer(cfg, data)
