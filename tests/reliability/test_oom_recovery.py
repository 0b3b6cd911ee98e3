"""Out-of-memory recovery, by injecting allocation failures into the model's forward.

Inference: fewer tiles per batch, then accumulation on the CPU, then a clear error. Training: the
batch and patch are halved and a ``Message`` says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rel_helpers import make_tiny_checkpoint, phantom_cases

from napari_medseg.engine.inference import SlidingWindowInferer as inference
from napari_medseg.engine.inference import predict, sliding_window
from napari_medseg.engine.jobs import Message, Progress, collect, drive
from napari_medseg.engine.runtime.oom import (
    InsufficientMemoryError,
    halve_batch_and_patch,
    inference_ladder,
    is_oom_error,
    sliding_window_with_fallback,
)
from napari_medseg.engine.training import TrainConfig, Trainer, train

OOMS = [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("CUDA error: out of memory"),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    lambda: MemoryError(),
]
OOM_IDS = ["torch.OutOfMemoryError", "RuntimeError-cuda", "RuntimeError-cpu", "MemoryError"]


def test_is_oom_error_recognises_allocators_only():
    for make in OOMS:
        assert is_oom_error(make())
    assert not is_oom_error(RuntimeError("shape mismatch"))
    assert not is_oom_error(ValueError("out of range"))
    assert not is_oom_error(InsufficientMemoryError("out of memory at every rung"))


def test_ladder_order():
    assert inference_ladder(4, "cuda") == [
        (4, torch.device("cuda")), (2, torch.device("cuda")), (1, torch.device("cuda")), (1, torch.device("cpu")),
    ]
    assert inference_ladder(3, "cpu") == [(3, torch.device("cpu")), (1, torch.device("cpu"))]


def _patch_forward(monkeypatch, fail):
    """Every model ``predict`` builds raises ``fail(x)`` when it returns an exception."""
    calls = []
    real_build = inference.build_model

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        real_forward = model.forward

        def forward(x):
            calls.append(tuple(x.shape))
            err = fail(x)
            if err is not None:
                raise err
            return real_forward(x)

        model.forward = forward
        return model

    monkeypatch.setattr(inference, "build_model", build)
    return calls


@pytest.mark.parametrize("make", OOMS, ids=OOM_IDS)
def test_predict_retries_with_fewer_tiles(tmp_path, monkeypatch, make):
    ckpt = make_tiny_checkpoint(tmp_path / "m.pt")
    image = np.random.default_rng(0).normal(size=(16, 24, 24)).astype(np.float32)
    kw = dict(device="cpu", mirror=False, step=0.5)
    reference = drive(predict(image, (1.0, 1.0, 1.0), [ckpt], batch_size=1, **kw))
    calls = _patch_forward(monkeypatch, lambda x: make() if x.shape[0] > 1 else None)
    events, result = collect(predict(image, (1.0, 1.0, 1.0), [ckpt], batch_size=4, **kw))
    notes = [e.message for e in events if isinstance(e, Progress) and e.message.startswith("Out of memory")]
    assert len(notes) == 2, notes
    assert "retrying with 2 tile(s) per batch" in notes[0] and "4 tile(s) per batch" in notes[0]
    assert "retrying with 1 tile(s) per batch" in notes[1]
    assert calls[0][0] == 4 and calls[1][0] == 2 and all(c[0] == 1 for c in calls[2:])
    np.testing.assert_array_equal(result.labels, reference.labels)


def test_accumulates_on_cpu_after_fewer_tiles(tmp_path):
    """With an accelerator's accumulation failing at every batch size, the CPU rung finishes the job."""
    image = torch.randn(1, 12, 20, 20)
    tried = []

    def predictor(x):
        return torch.stack([x[:, 0] * 0.5, -x[:, 0]], dim=1)

    def make_window(bs, acc):
        tried.append((bs, acc.type))
        if acc.type != "cpu":  # pretend the "cuda" accumulation buffer never fits
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return sliding_window(predictor, image, (8, 8, 8), 2, batch_size=bs, accumulate_device=acc)

    events, logits = collect(sliding_window_with_fallback(make_window, 2, "cuda", "cuda:0"))
    assert tried == [(2, "cuda"), (1, "cuda"), (1, "cpu")]
    assert any("accumulating on cpu" in e.message for e in events)
    expected = drive(sliding_window(predictor, image, (8, 8, 8), 2, batch_size=2))
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("make", OOMS, ids=OOM_IDS)
def test_predict_tells_the_user_when_nothing_fits(tmp_path, monkeypatch, make):
    ckpt = make_tiny_checkpoint(tmp_path / "m.pt")
    image = np.zeros((16, 24, 24), np.float32)
    calls = _patch_forward(monkeypatch, lambda x: make())
    with pytest.raises(InsufficientMemoryError) as err:
        drive(predict(image, (1.0, 1.0, 1.0), [ckpt], device="cpu", mirror=False, batch_size=2))
    text = str(err.value)
    assert text.startswith("Not enough memory to segment an image of 1x16x24x24 voxels on cpu")
    assert "2 tile(s) per batch" in text and "1 tile(s) per batch" in text
    assert "choose the CPU device" in text
    assert [c[0] for c in calls] == [2, 1]


def test_other_errors_are_not_retried(tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path / "m.pt")
    calls = _patch_forward(monkeypatch, lambda x: RuntimeError("Expected 5D input"))
    with pytest.raises(RuntimeError, match="Expected 5D input"):
        drive(predict(np.zeros((16, 16, 16), np.float32), (1, 1, 1), [ckpt], device="cpu",
                                  mirror=False, batch_size=4))
    assert len(calls) == 1


def test_halve_batch_and_patch_rules():
    assert halve_batch_and_patch(4, (64, 96, 96), (8, 16, 16)) == (2, (32, 48, 48))
    assert halve_batch_and_patch(1, (24, 40, 40), (8, 16, 16)) == (1, (8, 16, 16))
    assert halve_batch_and_patch(2, (8, 16, 16), (8, 16, 16)) == (1, (8, 16, 16))
    with pytest.raises(InsufficientMemoryError, match=r"even one sample of patch \(8, 16, 16\)"):
        halve_batch_and_patch(1, (8, 16, 16), (8, 16, 16))


@pytest.mark.parametrize("make", OOMS[::3], ids=OOM_IDS[::3])
def test_training_halves_batch_and_patch_and_says_so(tmp_path, monkeypatch, make):
    real_build = Trainer.build_model
    shapes = []

    def build(self):
        model = real_build(self)
        real_forward = model.forward

        def forward(x):
            shapes.append(tuple(x.shape))
            if model.training and (x.shape[0] > 1 or x.shape[2] > 8):  # only batch 1 of 8^3 fits
                raise make()
            return real_forward(x)

        model.forward = forward
        return model

    monkeypatch.setattr(Trainer, "build_model", build)
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"), model="unet-3d-fullres", model_kwargs={"base_width": 4, "max_width": 16},
        epochs=1, iterations_per_epoch=2, val_batches=1, patch_size=(16, 16, 16), batch_size=2, device="cpu",
        label_names={0: "background", 1: "ellipsoid"}, augment=False,
    )
    events, path = collect(train(cfg, phantom_cases(2)))
    notes = [e for e in events if isinstance(e, Message) and e.text.startswith("Out of memory")]
    assert len(notes) == 1, [getattr(e, "text", e) for e in events]
    assert notes[0].level == "warning"
    assert "halved the batch 2 -> 1 and the patch (16, 16, 16) -> (8, 8, 8)" in notes[0].text
    assert [e.current for e in events if isinstance(e, Progress) and e.stage == "train"] == [1, 2]
    from napari_medseg.engine.checkpoints import load_checkpoint

    ckpt = load_checkpoint(path)
    assert tuple(ckpt.plan["patch_size"]) == (8, 8, 8) and ckpt.plan["batch_size"] == 1
    assert shapes[0][0] == 2 and all(s[0] == 1 for s in shapes[1:])


def test_training_gives_up_with_a_clear_error(tmp_path, monkeypatch):
    real_build = Trainer.build_model

    def build(self):
        model = real_build(self)
        model.forward = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
        return model

    monkeypatch.setattr(Trainer, "build_model", build)
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"), model="unet-3d-fullres", model_kwargs={"base_width": 4, "max_width": 16},
        epochs=1, iterations_per_epoch=1, val_batches=0, patch_size=(16, 16, 16), batch_size=2, device="cpu",
        label_names={0: "background", 1: "ellipsoid"}, augment=False,
    )
    with pytest.raises(InsufficientMemoryError, match="Not enough memory to train even one sample"):
        drive(train(cfg, phantom_cases(1)))
