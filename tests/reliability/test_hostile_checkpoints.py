"""Hostile checkpoints: loading never runs embedded code; sizes and shapes are checked before use.

Each crafted file must be refused with a specific ``CheckpointError`` and, for the code-execution
cases, the marker file the payload would create must not exist afterwards.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
from rel_helpers import make_tiny_checkpoint

from napari_medseg.engine.checkpoints import CheckpointError, build_model, load_checkpoint
from napari_medseg.engine.checkpoints import format as ckpt_mod


class _CreatesFile:
    """Unpickling this object (pickle's REDUCE) calls ``open(marker, "w")``: it creates a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _RunsShell:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _valid_payload(tmp_path) -> dict:
    path = make_tiny_checkpoint(tmp_path / "valid.pt")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("evil", [_CreatesFile, _RunsShell], ids=["open", "os.system"])
@pytest.mark.parametrize("where", ["top", "extra", "state_dict"])
def test_code_in_a_torch_checkpoint_never_runs(tmp_path, evil, where):
    marker = tmp_path / "pwned"
    payload = _valid_payload(tmp_path)
    if where == "top":
        payload = evil(str(marker))
    else:
        payload[where]["x"] = evil(str(marker))
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    if evil is _CreatesFile:  # the exploit is real: an unsafe load creates the marker
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(CheckpointError, match="not a safe napari-medseg checkpoint") as err:
        load_checkpoint(path)
    assert "evil.pt" in str(err.value)
    assert not marker.exists()


def test_code_in_a_legacy_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps({"format": "napari-medseg-checkpoint", "x": _CreatesFile(str(marker))}))
    with pytest.raises(CheckpointError, match="not a safe napari-medseg checkpoint|damaged"):
        load_checkpoint(path)
    assert not marker.exists()


def test_zip_bomb_refused_before_loading(tmp_path, monkeypatch):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/data/0", bytes(20 * 2**20))  # 20 MB of zeros, ~20 KB on disk
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(CheckpointError, match=r"would unpack to 2097\d+ bytes from \d+ on disk"):
        load_checkpoint(path)
    assert loads == []  # refused before torch.load saw it


def test_empty_and_absurdly_large_files_are_refused(tmp_path, monkeypatch):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        load_checkpoint(empty)
    good = make_tiny_checkpoint(tmp_path / "good.pt")
    monkeypatch.setattr(ckpt_mod, "MAX_FILE_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"Refusing .*good.pt: \d+ bytes is more than the 1000"):
        load_checkpoint(good)


def test_tensor_count_and_element_budgets(tmp_path, monkeypatch):
    payload = _valid_payload(tmp_path)
    path = tmp_path / "many.pt"
    torch.save(payload, path)
    monkeypatch.setattr(ckpt_mod, "MAX_TENSORS", 25)
    with pytest.raises(CheckpointError, match="more than 25 tensors"):
        load_checkpoint(path)
    monkeypatch.setattr(ckpt_mod, "MAX_TENSORS", 50_000)
    monkeypatch.setattr(ckpt_mod, "MAX_TOTAL_ELEMENTS", 100)
    with pytest.raises(CheckpointError, match="more than 100 elements"):
        load_checkpoint(path)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda p: p["plan"].update(x=torch.zeros(3)), "holds a tensor where plain data belongs"),
    (lambda p: p["state_dict"].update(bad=[1, 2]), "is not a named tensor"),
    (lambda p: p["model"].update(num_classes=-2), "model.num_classes must be at least 1"),
    (lambda p: p["model"].update(spatial_dims=4), "spatial_dims must be 2 or 3"),
    (lambda p: p.update(label_names={"one": 5}), "is not 'index': 'name'"),
    (lambda p: p.update(format_version=99), "format version 99"),
    (lambda p: p["extra"].update(deep=_nest(60)), "nested too deeply"),
])
def test_malformed_fields_are_refused(tmp_path, mutate, message):
    payload = _valid_payload(tmp_path)
    mutate(payload)
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def _nest(n):
    out: dict = {}
    for _ in range(n):
        out = {"a": out}
    return out


def test_wrong_shapes_are_caught_before_the_weights_are_used(tmp_path, monkeypatch):
    payload = _valid_payload(tmp_path)
    key = next(k for k, v in payload["state_dict"].items() if v.ndim == 5)
    payload["state_dict"][key] = torch.zeros(3, 3, 3, 3, 3)
    path = tmp_path / "shapes.pt"
    torch.save(payload, path)
    used = []
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: used.append(a))
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model(path)
    assert used == []


def test_non_finite_weights_are_refused(tmp_path):
    payload = _valid_payload(tmp_path)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key].clone().fill_(float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"NaN or infinite weights \\(in '{key}'\\)"):
        build_model(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    good = make_tiny_checkpoint(tmp_path / "good.pt")
    blob = open(good, "rb").read()
    for keep in (0.3, 0.9):
        path = tmp_path / f"cut{keep}.pt"
        path.write_bytes(blob[: int(len(blob) * keep)])
        with pytest.raises(CheckpointError, match="damaged or truncated|damaged archive") as err:
            load_checkpoint(path)
        assert path.name in str(err.value)
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)  # a bare state dict is named for what it is
    (tmp_path / "bare.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="bare PyTorch state dict"):
        load_checkpoint(tmp_path / "bare.pt")
