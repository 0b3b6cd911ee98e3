"""Checkpoints: round trip, refusal of unsafe/damaged/foreign files, atomic writes, fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest
import torch

from napari_medseg.engine.checkpoints import (
    FORMAT_VERSION,
    CheckpointError,
    build_model,
    check_compatible,
    checkpoint_summary,
    load_checkpoint,
    load_weights_for_finetune,
    save_checkpoint,
)
from napari_medseg.engine.checkpoints import format as ckpt_mod
from napari_medseg.engine.planning import Plan

pytestmark = pytest.mark.usefixtures("one_thread")


MODEL = "unet-3d-fullres"
KWARGS = {"pool_kernels": [[1, 2, 2], [2, 2, 2]], "conv_kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
          "base_width": 4, "deep_supervision": False}


@dataclasses.dataclass
class _Config:
    epochs: int = 3
    lr: float = 0.01
    patch: tuple = (16, 32, 32)
    name: str = "run"


def _plan() -> Plan:
    return Plan(configuration="3d_fullres", spacing=(2.0, 1.0, 1.0), patch_size=(16, 32, 32),
                batch_size=2, pool_kernels=KWARGS["pool_kernels"], conv_kernels=KWARGS["conv_kernels"],
                normalization=["zscore"], num_channels=1, num_classes=2)


def _model(num_classes: int = 2, seed: int = 0, **kw):
    from napari_medseg.models import create_model

    torch.manual_seed(seed)
    return create_model(MODEL, 1, num_classes, 3, **{**KWARGS, **kw})


def _save(path, model=None, **overrides):
    model = model if model is not None else _model()
    args = dict(model_name=MODEL, model_kwargs=KWARGS, in_channels=1, num_classes=2, spatial_dims=3,
                plan=_plan(), label_names={0: "background", 1: "tumour"}, train_config=_Config(),
                epoch=3, history=[{"epoch": 0, "train_loss": 1.5, "val_dice": float("nan")}],
                extra={"fingerprint": {"spacing": [2.0, 1.0, 1.0]}})
    args.update(overrides)
    return save_checkpoint(path, model, **args)


def test_round_trip(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    model(torch.randn(1, 1, 8, 16, 16)).mean().backward()
    opt.step()
    path = _save(tmp_path / "model.pt", model, optimizer=opt)
    ck = load_checkpoint(path)

    assert ck.format_version == FORMAT_VERSION
    assert (ck.model_name, ck.model_kwargs) == (MODEL, KWARGS)
    assert (ck.in_channels, ck.num_classes, ck.spatial_dims, ck.epoch) == (1, 2, 3, 3)
    assert ck.plan == _plan().to_dict()
    assert Plan.from_dict(ck.plan) == _plan()
    assert ck.label_names == {0: "background", 1: "tumour"}
    assert ck.train_config == {"epochs": 3, "lr": 0.01, "patch": [16, 32, 32], "name": "run"}
    assert ck.history[0]["train_loss"] == 1.5 and ck.history[0]["val_dice"] != ck.history[0]["val_dice"]
    assert set(ck.versions) == {"napari_medseg", "torch", "python"}
    assert ck.state_dict.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(ck.state_dict[k], v), k

    rebuilt = build_model(ck)
    assert not rebuilt.training
    model.eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x))
    opt2 = torch.optim.SGD(rebuilt.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    opt2.load_state_dict(ck.optimizer_state)  # resumable
    summary = checkpoint_summary(path)
    json.dumps(summary)  # plain types only
    assert summary["model_name"] == MODEL and summary["num_parameters"] > 0
    assert summary["patch_size"] == [16, 32, 32] and summary["resumable"]


class _Evil:
    def __init__(self, how: str, marker: str):
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["system", "open"])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "napari-medseg-checkpoint", "format_version": 1,
                "payload": _Evil(how, str(marker))}, path)
    if how == "open":  # the exploit is real: a plain unpickle creates the marker
        with open(path, "rb") as fh:
            torch.load(fh, weights_only=False)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(CheckpointError, match="not a safe napari-medseg checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "plain.pkl"
    marker = tmp_path / "pwned"
    with open(path, "wb") as fh:
        pickle.dump(_Evil("open", str(marker)), fh)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_wrong_architecture_channels_classes(tmp_path):
    ck = load_checkpoint(_save(tmp_path / "m.pt"))
    with pytest.raises(CheckpointError, match="weight shape"):  # other width
        build_model(dataclasses.replace(ck, model_kwargs={**KWARGS, "base_width": 8}))
    deeper = {**KWARGS, "pool_kernels": [[1, 2, 2], [2, 2, 2], [2, 2, 2]],
              "conv_kernels": [[1, 3, 3]] + [[3, 3, 3]] * 3}
    with pytest.raises(CheckpointError, match="another architecture"):
        build_model(dataclasses.replace(ck, model_kwargs=deeper))
    with pytest.raises(CheckpointError, match="Cannot build"):
        build_model(dataclasses.replace(ck, model_name="no-such-model"))
    with pytest.raises(CheckpointError, match="expect 1 input channel"):
        build_model(dataclasses.replace(ck, in_channels=2))
    with pytest.raises(CheckpointError, match="predict 2 classes but the checkpoint says 3"):
        build_model(dataclasses.replace(ck, num_classes=3))
    with pytest.raises(CheckpointError, match=r"expects 1 input channel\(s\); the image has 2"):
        check_compatible(ck, in_channels=2, spatial_dims=3)
    with pytest.raises(CheckpointError, match="3D model; the image is 2D"):
        check_compatible(ck, in_channels=1, spatial_dims=2)
    check_compatible(ck, in_channels=1, spatial_dims=3)


def test_newer_format_version_is_refused(tmp_path):
    path = _save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="newer napari-medseg.*Upgrade"):
        load_checkpoint(path)


def test_truncated_missing_and_foreign_files(tmp_path):
    path = _save(tmp_path / "m.pt")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    bare = tmp_path / "bare.pt"
    torch.save(_model().state_dict(), bare)
    with pytest.raises(CheckpointError, match="bare PyTorch state dict"):
        load_checkpoint(bare)


def test_invalid_fields_are_refused(tmp_path, monkeypatch):
    path = _save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    bad = dict(payload, epoch="three")
    torch.save(bad, tmp_path / "bad1.pt")
    with pytest.raises(CheckpointError, match="'epoch' should be int"):
        load_checkpoint(tmp_path / "bad1.pt")
    bad = dict(payload, plan={"spacing": torch.zeros(3)})
    torch.save(bad, tmp_path / "bad2.pt")
    with pytest.raises(CheckpointError, match="tensor where plain data"):
        load_checkpoint(tmp_path / "bad2.pt")
    bad = dict(payload, state_dict={**payload["state_dict"], "x": [1, 2]})
    torch.save(bad, tmp_path / "bad3.pt")
    with pytest.raises(CheckpointError, match="not a named tensor"):
        load_checkpoint(tmp_path / "bad3.pt")
    monkeypatch.setattr(ckpt_mod, "MAX_TOTAL_ELEMENTS", 1000)
    with pytest.raises(CheckpointError, match="more than 1000 elements"):
        load_checkpoint(path)


def test_non_plain_metadata_is_refused_on_save(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be stored"):
        _save(tmp_path / "m.pt", extra={"thing": object()})
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = _save(tmp_path / "m.pt", epoch=1)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(CheckpointError, match="disk full"):
        _save(path, epoch=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path) == ["m.pt"]  # no temp file left
    assert load_checkpoint(path).epoch == 1


def test_finetune_keeps_all_but_the_head(tmp_path):
    ck = load_checkpoint(_save(tmp_path / "m.pt"))
    fresh = _model(num_classes=3, seed=1)
    before_head = fresh.state_dict()["head.weight"].clone()
    skipped = load_weights_for_finetune(fresh, ck)
    assert skipped == ["head.weight"]
    state = fresh.state_dict()
    for k, v in state.items():
        if k != "head.weight":
            assert torch.equal(v, ck.state_dict[k]), k
    assert state["head.weight"].shape[0] == 3
    assert torch.equal(state["head.weight"], before_head)


def test_rebuild_ignores_pretrained_initialisers(tmp_path, monkeypatch):
    """A run trained from timm's pretrained weights stores ``pretrained=True``; rebuilding it must not
    look for those weights (they are overwritten by the checkpoint's, and may not exist here)."""
    from napari_medseg.engine.checkpoints import build_model, save_checkpoint
    from napari_medseg.models import ModelError, create_model
    from napari_medseg.models._timm import import_timm

    try:
        import_timm()
    except ModelError:
        pytest.skip("timm is not installed")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch"))
    kwargs = {"decoder_widths": [32, 16, 16, 8, 8]}
    with pytest.raises(Exception, match="not available offline"):
        create_model("omnia-net-b0", 1, 2, 2, pretrained=True, **kwargs)
    model = create_model("omnia-net-b0", 1, 2, 2, **kwargs)
    path = save_checkpoint(
        tmp_path / "m.pt", model, model_name="omnia-net-b0", model_kwargs={**kwargs, "pretrained": True},
        in_channels=1, num_classes=2, spatial_dims=2, plan={}, label_names={}, train_config={},
    )
    rebuilt = build_model(path)
    x = torch.randn(1, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
