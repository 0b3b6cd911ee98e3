"""The training generator on in-memory phantoms: events, cancel, fine-tune, ignore label."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from napari_medseg.engine.checkpoints import load_checkpoint
from napari_medseg.engine.jobs import EpochEnd, Progress, collect, drive
from napari_medseg.engine.training import (
    TrainConfig,
    Trainer,
    TrainingError,
    prepare_data,
    train,
)
from napari_medseg.io.phantom import make_phantom

TINY = {"base_width": 4, "max_width": 16}


def _cases(n=3, num_classes=2, shape=(16, 32, 32)):
    out = []
    for i in range(n):
        image, labels = make_phantom(shape, num_classes=num_classes, seed=i)
        out.append((image, labels, (2.0, 1.0, 1.0)))
    return out


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"), model="unet-3d-fullres", model_kwargs=dict(TINY), epochs=2,
        iterations_per_epoch=3, val_batches=1, patch_size=(16, 16, 16), batch_size=2, device="cpu",
        label_names={0: "background", 1: "ellipsoid"},
    )
    base.update(kw)
    return TrainConfig(**base)


def test_events_and_checkpoint(tmp_path):
    events, path = collect(train(_config(tmp_path), _cases()))
    epochs = [e for e in events if isinstance(e, EpochEnd)]
    assert [e.epoch for e in epochs] == [0, 1]
    assert all(np.isfinite(e.train_loss) for e in epochs)
    assert set(epochs[0].val_dice) == {"ellipsoid"}
    train_progress = [e for e in events if isinstance(e, Progress) and e.stage == "train"]
    assert len(train_progress) == 6
    ckpt = load_checkpoint(path)
    assert ckpt.model_name == "unet-3d-fullres" and ckpt.num_classes == 2 and ckpt.epoch == 1
    assert ckpt.label_names[1] == "ellipsoid"
    assert ckpt.train_config["epochs"] == 2
    assert os.path.isfile(os.path.join(tmp_path, "run", "run.json"))


def test_cancel_stops_within_one_iteration_and_saves(tmp_path):
    cfg = _config(tmp_path, epochs=100, iterations_per_epoch=50)
    gen = train(cfg, _cases())
    seen = 0
    for event in gen:
        if isinstance(event, Progress) and event.stage == "train":
            seen += 1
            if seen == 3:
                break
    gen.close()
    ckpt = load_checkpoint(os.path.join(cfg.output_dir, "checkpoint_latest.pt"))
    assert ckpt.epoch == -1  # no epoch finished; resuming re-runs epoch 0
    assert not os.path.exists(os.path.join(cfg.output_dir, "checkpoint_final.pt"))


def test_finetune_with_other_class_count_keeps_body(tmp_path):
    first = drive(train(_config(tmp_path, epochs=1), _cases()))
    cfg = _config(
        tmp_path, output_dir=str(tmp_path / "ft"), epochs=1, init_checkpoint=first, lr=1e-3,
        label_names={0: "background", 1: "a", 2: "b"},
    )
    prepared = drive(prepare_data(cfg, _cases(num_classes=3)))
    trainer = Trainer(cfg, prepared)
    old = load_checkpoint(first).state_dict
    new = trainer.model.state_dict()
    reshaped = [k for k in old if old[k].shape != new[k].shape]
    assert reshaped and all("head" in k or "seg" in k for k in reshaped), reshaped
    for k in old:  # everything that still fits is kept as trained
        if k not in reshaped:
            assert torch.equal(old[k], new[k]), k
    assert trainer.num_classes == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_ignore_label_gradients_only_from_painted_slice(tmp_path):
    image, labels = make_phantom((16, 16, 16), seed=3)
    ignore = 9
    partial = np.full_like(labels, ignore)
    partial[8] = labels[8]  # only slice 8 was painted
    cfg = _config(tmp_path, ignore_label=ignore, augment=False, patch_size=(16, 16, 16), batch_size=1,
                  deep_supervision=False)
    prepared = drive(prepare_data(cfg, [(image, partial, (1.0, 1.0, 1.0))]))
    trainer = Trainer(cfg, prepared)
    x = torch.from_numpy(prepared.train_cases[0].image[None]).float()
    y = torch.from_numpy(prepared.train_cases[0].label[None, None].astype(np.int64))
    grads = {}

    def keep_output_grad(module, inputs, output):
        output.register_hook(lambda g: grads.setdefault("g", g.detach().clone()))

    handle = trainer.model.register_forward_hook(keep_output_grad)
    trainer.train_step(x, y)
    handle.remove()
    g = grads["g"][0].abs().sum(0)  # (z, y, x)
    painted = (y[0, 0] != ignore)
    assert painted.any() and (~painted).any()
    assert torch.all(g[~painted] == 0)
    assert torch.all(g[painted].sum() > 0)


def test_empty_labels_refused(tmp_path):
    image, _ = make_phantom((16, 16, 16), seed=0)
    with pytest.raises(TrainingError, match="empty"):
        drive(train(_config(tmp_path), [(image, np.zeros((16, 16, 16), np.uint8), (1, 1, 1))]))


def test_unknown_label_values_refused(tmp_path):
    image, labels = make_phantom((16, 16, 16), seed=0)
    labels[0, 0, 0] = 7
    with pytest.raises(TrainingError, match="7"):
        drive(train(_config(tmp_path), [(image, labels, (1, 1, 1))]))
