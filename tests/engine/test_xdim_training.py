"""The cross-dimensional models really train with their recipe (Lookahead + NAdam) and round-trip.

Each model trains a few iterations on phantoms through ``train()``; the loss goes down, the
checkpoint rebuilds a model with the same output, and training resumes from it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from napari_medseg.engine.checkpoints import build_model, load_checkpoint
from napari_medseg.engine.jobs import EpochEnd, collect, drive
from napari_medseg.engine.training import (
    TrainConfig,
    Trainer,
    prepare_data,
    train,
)
from napari_medseg.engine.training.optim import Lookahead
from napari_medseg.io.phantom import make_phantom

if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed", allow_module_level=True)

_W2D = [16, 16, 8, 8, 8]
# (model, phantom shape, patch, tiny kwargs, lr); omnia-net-b4 is omnia-net-b0's class with a bigger
# backbone (19 M parameters: its checkpoints alone would take seconds to write), so it is left out here.
CASES = [
    ("omnia-net-b0", (8, 32, 32), (32, 32), {"decoder_widths": _W2D}, 3e-3),
    ("dx-net", (32, 32, 32), (32, 32, 32), {"decoder_widths": _W2D}, 3e-3),
    ("ds-net", (24, 32, 32), (24, 32, 32),
     {"widths": [4, 8, 8, 8], "mid_channels": 2, "decoder_widths": _W2D}, 3e-3),
]


def _cases(shape, n=2):
    return [(*make_phantom(shape, seed=i, noise=0.2), (1.0, 1.0, 1.0)) for i in range(n)]


@pytest.mark.parametrize(("model", "shape", "patch", "kwargs", "lr"), CASES, ids=[c[0] for c in CASES])
def test_loss_decreases_and_checkpoint_round_trips(tmp_path, model, shape, patch, kwargs, lr):
    torch.set_num_threads(1)
    batch = 4 if len(patch) == 2 else 2
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"), model=model, model_kwargs=kwargs, epochs=2, iterations_per_epoch=4,
        val_batches=1, patch_size=patch, batch_size=batch, device="cpu", lr=lr, augment=False,
        configuration="2d" if len(patch) == 2 else "3d_fullres", lr_schedule="constant",
        label_names={0: "background", 1: "ellipsoid"}, early_stopping_patience=0,
    )
    events, path = collect(train(cfg, _cases(shape)))
    losses = [e.train_loss for e in events if isinstance(e, EpochEnd)]
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    ckpt = load_checkpoint(path)
    assert ckpt.model_name == model and ckpt.train_config["optimizer"] == "lookahead_nadam"
    assert set(ckpt.optimizer_state) == {"inner", "lookahead"}
    net = build_model(ckpt)
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 2, *patch)
    again = build_model(load_checkpoint(path))
    with torch.no_grad():
        torch.testing.assert_close(again(x), y, atol=0, rtol=0)


def test_recipe_gives_lookahead_nadam_and_resume_restores_it(tmp_path):
    cases = _cases((8, 32, 32), n=1)
    cfg = TrainConfig(output_dir=str(tmp_path / "a"), model="omnia-net-b0", model_kwargs={"decoder_widths": _W2D},
                      epochs=1, iterations_per_epoch=2, val_batches=1, patch_size=(32, 32), batch_size=2,
                      device="cpu", augment=False)
    data = drive(prepare_data(cfg, cases))
    trainer = Trainer(cfg, data)
    assert isinstance(trainer.optimizer, Lookahead)
    assert isinstance(trainer.optimizer.optimizer, torch.optim.NAdam)
    assert trainer.config.lr == pytest.approx(1e-3) and trainer.config.optimizer == "lookahead_nadam"
    _, path = collect(trainer.run())
    saved = load_checkpoint(path).optimizer_state
    resumed = Trainer(TrainConfig(**{**cfg.to_dict(), "patch_size": (32, 32), "resume": path, "epochs": 2,
                                     "output_dir": str(tmp_path / "b")}), data)
    assert resumed.optimizer.step_count == saved["lookahead"]["step_count"] == 2
    slow = saved["lookahead"]["slow"]
    params = [p for g in resumed.optimizer.param_groups for p in g["params"]]
    assert len(slow) == len(params)
    torch.testing.assert_close(resumed.optimizer.state[params[0]]["slow"], slow[0])
