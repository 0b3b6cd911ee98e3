"""The largest-component step chosen on held-out painted slices when training ends (nnU-Net's
post-processing choice), with a stand-in network whose output is known, and on a real run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from medseg_testing import make_tiny_checkpoint

from napari_medseg.engine.checkpoints import load_checkpoint
from napari_medseg.engine.checkpoints.fields import LARGEST_COMPONENT, PAIRED_CLASSES
from napari_medseg.engine.data import Case
from napari_medseg.engine.jobs import Message, drive
from napari_medseg.engine.training.postprocess import (
    choose_largest_component,
    held_out_dice,
    step_helps,
)

IGNORE = 2
SHAPE = (12, 32, 32)


class Threshold(torch.nn.Module):
    """Class 1 where the image is bright: logits (-x, x)."""

    def forward(self, x):
        return torch.cat([-x, x], dim=1)


def _trainer(image: np.ndarray, reference: np.ndarray, held: int, extra=None):
    label = np.full(SHAPE, IGNORE, np.int16)
    label[held] = reference[held]
    case = Case("painted (held-out slices)", image[None].astype(np.float32), label, None)
    plan = SimpleNamespace(num_classes=2, patch_size=(12, 16, 16))
    return SimpleNamespace(
        data=SimpleNamespace(val_cases=[case], plan=plan, extra=extra or {}), config=SimpleNamespace(ignore_label=IGNORE),
        validation_kind="held-out slices", world_size=1, unwrapped_model=Threshold(), device=torch.device("cpu"),
    )


def _run(trainer, path):
    messages = []
    out = drive(choose_largest_component(trainer, path), lambda e: isinstance(e, Message) and messages.append(e.text))
    return out, messages


@pytest.fixture()
def final(tmp_path):
    return make_tiny_checkpoint(tmp_path / "final.pt", patch=(16, 16, 16))


def test_a_false_positive_on_the_held_out_slice_turns_the_step_on(final):
    reference = np.zeros(SHAPE, np.int16)
    reference[3:9, 8:20, 8:20] = 1  # the organ
    image = np.where(reference == 1, 1.0, -1.0)
    image[3:9, 26:29, 26:29] = 1.0  # look-alike tissue the model labels too
    out, messages = _run(_trainer(image, reference, held=6), final)
    assert out == final
    assert load_checkpoint(final).extra.get(LARGEST_COMPONENT) is True
    assert "Segment will keep it" in messages[-1] and "mean Dice 0.970, 1.000" in messages[-1], messages


def test_a_class_of_two_pieces_keeps_the_step_off(final):
    reference = np.zeros(SHAPE, np.int16)
    reference[3:9, 4:12, 4:12] = 1  # two kidneys, one class
    reference[3:9, 20:28, 20:28] = 1
    image = np.where(reference == 1, 1.0, -1.0)
    _, messages = _run(_trainer(image, reference, held=6), final)
    assert LARGEST_COMPONENT not in load_checkpoint(final).extra
    assert "not kept" in messages[-1], messages


def test_a_correction_keeps_its_parents_rules_and_other_runs_are_left_alone(final):
    reference = np.zeros(SHAPE, np.int16)
    reference[3:9, 8:20, 8:20] = 1
    image = np.where(reference == 1, 1.0, -1.0)
    image[3:9, 26:29, 26:29] = 1.0
    inherited = _trainer(image, reference, held=6, extra={PAIRED_CLASSES: [1]})
    assert _run(inherited, final) == (final, [])
    no_held_out = _trainer(image, reference, held=6)
    no_held_out.validation_kind = "none"
    assert _run(no_held_out, final) == (final, [])
    assert LARGEST_COMPONENT not in load_checkpoint(final).extra


def test_the_rule():
    labels = np.array([1, 1, 0, 2, 2, 0])
    ref = np.array([1, 1, 0, 2, 0, 0])
    counted = np.ones(6, bool)
    d = held_out_dice(labels, ref, counted, (1, 2, 3))
    assert d[1] == 1.0 and d[2] == pytest.approx(2 / 3) and np.isnan(d[3])
    assert step_helps({1: 0.5, 2: 0.8}, {1: 0.5, 2: 0.9})
    assert not step_helps({1: 0.5, 2: 0.8}, {1: 0.49, 2: 0.95})
    assert not step_helps({1: float("nan")}, {1: float("nan")})  # nothing to judge by


@pytest.mark.slow
def test_a_real_painted_run_chooses_and_records(tmp_path):
    """Five painted slices of a phantom, a tiny 2D U-Net: the run holds one slice out, predicts it
    at the end, says what it chose, and the final checkpoint says the same."""
    import napari_medseg as medseg
    from napari_medseg.io.phantom import make_phantom

    image, truth = make_phantom((20, 32, 32), num_classes=2, seed=3)
    zs = np.nonzero(truth.reshape(truth.shape[0], -1).any(1))[0]
    painted = np.full(truth.shape, IGNORE, np.int16)
    for z in np.linspace(zs[0], zs[-1], 5).round().astype(int):
        painted[z] = truth[z]
    config = medseg.TrainConfig(
        output_dir=str(tmp_path / "run"), model="unet-2d", configuration="2d", model_kwargs={"base_width": 4, "max_width": 16},
        epochs=1, iterations_per_epoch=2, val_batches=1, batch_size=2, patch_size=(32, 32), device="cpu",
        ignore_label=IGNORE, label_names={0: "background", 1: "organ"},
    )
    events = []
    path = medseg.train(config, [(image.astype(np.float32), painted, (1.0, 1.0, 1.0))], on_event=events.append)
    said = [e.text for e in events if isinstance(e, Message) and e.text.startswith("Held-out slices: mean Dice")]
    assert len(said) == 1, [getattr(e, "text", e) for e in events if isinstance(e, Message)]
    assert ("Segment will keep it" in said[0]) == bool(load_checkpoint(path).extra.get(LARGEST_COMPONENT))
