"""Every trainable family really trains: a few iterations on phantoms, and the loss goes down.

Also checks that each model's default training recipe (``ModelSpec.training``) reaches the trainer,
and that a trained model round-trips through its checkpoint and predicts.
"""

from __future__ import annotations

import pytest
import torch

from napari_medseg.engine.checkpoints import build_model, load_checkpoint
from napari_medseg.engine.inference import predict
from napari_medseg.engine.jobs import EpochEnd, collect, drive
from napari_medseg.engine.training import (
    TrainConfig,
    Trainer,
    prepare_data,
    train,
)
from napari_medseg.io.phantom import make_phantom

# (model, spatial shape of the phantoms, patch, tiny architecture kwargs, lr for a quick descent)
CASES = [
    ("rkseg-l", (8, 32, 32), (32, 32), {"width": 8}, 1e-2),
    ("rkseg-r", (8, 32, 32), (32, 32), {"width": 8}, 1e-2),
    ("rkseg-l", (16, 16, 16), (16, 16, 16), {"width": 4}, 1e-2),
    ("sdn-unet", (8, 32, 32), (32, 32), {"n_layers": 2, "sdn_n_layers": 1, "state_size": 8, "base_width": 8}, 1e-3),
    ("sdn-unetpp", (8, 32, 32), (32, 32), {"n_layers": 2, "sdn_n_layers": 1, "state_size": 8, "base_width": 8}, 1e-3),
    ("unet-2d", (8, 32, 32), (32, 32), {"base_width": 8, "max_width": 32}, 1e-2),
]


def _cases(shape, n=2):
    return [(*make_phantom(shape, seed=i, noise=0.2), (1.0, 1.0, 1.0)) for i in range(n)]


@pytest.mark.parametrize(("model", "shape", "patch", "kwargs", "lr"), CASES, ids=[f"{c[0]}-{len(c[2])}d" for c in CASES])
def test_loss_decreases_and_checkpoint_round_trips(tmp_path, model, shape, patch, kwargs, lr):
    torch.set_num_threads(1)
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"), model=model, model_kwargs=kwargs, epochs=4, iterations_per_epoch=6,
        val_batches=1, patch_size=patch, batch_size=4, device="cpu", lr=lr, augment=False,
        configuration="2d" if len(patch) == 2 else "3d_fullres", lr_schedule="constant",
        label_names={0: "background", 1: "ellipsoid"}, early_stopping_patience=0,
    )
    events, path = collect(train(cfg, _cases(shape)))
    losses = [e.train_loss for e in events if isinstance(e, EpochEnd)]
    assert len(losses) == 4
    assert losses[-1] < losses[0], losses
    ckpt = load_checkpoint(path)
    assert ckpt.model_name == model
    net = build_model(ckpt)
    image = make_phantom(shape, seed=5)[0]
    gen = predict(image, (1.0, 1.0, 1.0), [ckpt], device="cpu", mirror=False)
    result = drive(gen)
    assert result.labels.shape == image.shape
    x = torch.zeros(1, 1, *patch)
    with torch.no_grad():
        assert net(x).shape == (1, 2, *patch)


def test_default_recipes_reach_the_trainer(tmp_path):
    cases = _cases((8, 32, 32), n=1)
    sdn = TrainConfig(output_dir=str(tmp_path / "a"), model="sdn-unet", model_kwargs=CASES[3][3],
                      patch_size=(32, 32), batch_size=2, device="cpu")
    trainer = Trainer(sdn, drive(prepare_data(sdn, cases)))
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert trainer.config.lr == pytest.approx(1e-4)
    assert trainer.config.early_stopping_patience == 30
    assert trainer.config.configuration == "2d"
    assert trainer.loss_fn.weight_ce == 0  # binary task: soft Dice only
    rk = TrainConfig(output_dir=str(tmp_path / "b"), model="rkseg-r", model_kwargs={"width": 4},
                     patch_size=(32, 32), batch_size=2, device="cpu")
    trainer = Trainer(rk, drive(prepare_data(rk, cases)))
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["nesterov"] and trainer.config.lr == pytest.approx(1e-2)
    assert "deep_supervision" not in trainer.model_kwargs


def test_early_stopping_stops(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), model="unet-2d", model_kwargs=CASES[5][3], epochs=50,
                      iterations_per_epoch=1, val_batches=1, patch_size=(32, 32), batch_size=2, device="cpu",
                      lr=0.0, early_stopping_patience=2)  # lr 0: the validation loss never improves
    events, _ = collect(train(cfg, _cases((8, 32, 32), n=1)))
    epochs = [e for e in events if isinstance(e, EpochEnd)]
    assert len(epochs) == 3
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint_final.pt")).epoch == 2
