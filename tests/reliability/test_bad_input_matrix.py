"""The bad-input matrix: every case asserts a clear, specific message and that nothing changed.

Issue 15's classes 4-9 (wrong geometry, units, size guards, corruption, foreign exceptions, silent
oddities) are the rows of ``matrix_cases.py``; ``python tests/reliability/count_cases.py`` prints
the rows by class and outcome.

Engine cases build their inputs in a workspace folder, hash every file in it, run the action,
check the error type and message, and check the hashes again (nothing written, nothing replaced,
no temporary file left). Viewer cases (marked ``gui``) also check the viewer's layers are unchanged.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from matrix_cases import NEW_CASES, Case
from medseg_testing import select_checkpoint
from rel_helpers import make_tiny_checkpoint, phantom_cases, tree_hashes

from napari_medseg.engine.checkpoints import (
    CheckpointError,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from napari_medseg.engine.data.dataset import DatasetError, load_raw_dataset
from napari_medseg.engine.inference import InferenceError, predict
from napari_medseg.engine.jobs import drive
from napari_medseg.engine.preprocessing import PreprocessingError
from napari_medseg.engine.runtime.oom import InsufficientMemoryError
from napari_medseg.engine.training import TrainConfig, TrainingError, train
from napari_medseg.io import NiftiError, read_nifti, write_nifti


def _nii(ws, name, data=None, affine=None, **hdr):
    data = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32) if data is None else data
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    for k, v in hdr.items():
        img.header[k] = v
    path = ws / name
    nib.save(img, path)
    return path


def _bytes(ws, name, blob):
    path = ws / name
    path.write_bytes(blob)
    return path


def _cut(ws, name, keep):
    src = _nii(ws, "src" + name[name.index("."):])
    blob = src.read_bytes()
    return _bytes(ws, name, blob[: int(len(blob) * keep) if keep < 1 else keep])


def _pixdim(ws, value):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    img.header["pixdim"][2] = value
    path = ws / "spacing.nii.gz"
    nib.save(img, path)
    return path


def _later(func, *args, **kwargs):
    """The action ``func(*args)``; the arguments (files) are made now, before the hashes."""
    return lambda: func(*args, **kwargs)


def _train(ws, cases, **kw):
    cfg = TrainConfig(output_dir=str(ws / "run"), model="unet-3d-fullres", model_kwargs={"base_width": 4},
                      epochs=1, iterations_per_epoch=1, val_batches=0, patch_size=(16, 16, 16), batch_size=1,
                      device="cpu", label_names={0: "background", 1: "organ"}, **kw)
    return lambda: drive(train(cfg, cases))


def _with_nonfinite(value, count, image=None):
    image = np.zeros((16, 16, 16), np.float32) if image is None else np.array(image, np.float32)
    image.reshape(-1)[:count] = value
    return image


def _predict(ckpt, image, spacing=(1.0, 1.0, 1.0), **kw):
    return lambda: drive(predict(image, spacing, [ckpt], device="cpu", mirror=False, **kw))


def _dataset(ws, *, channels=1, files=("c1_0000.nii.gz",)):
    root = ws / "Dataset001_X"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {str(i): f"ch{i}" for i in range(channels)}, "labels": {"background": 0, "x": 1},
            "numTraining": 1, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    for f in files:
        _nii(root / "imagesTr", f)
    _nii(root / "labelsTr", "c1.nii.gz", np.zeros((8, 9, 10), np.uint8))
    return root


def _oom_predict(ws, monkeypatch):
    from napari_medseg.engine.inference import SlidingWindowInferer as inference

    ckpt = make_tiny_checkpoint(ws / "m.pt")
    real = inference.build_model

    def build(*a, **k):
        model = real(*a, **k)
        model.forward = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
        return model

    monkeypatch.setattr(inference, "build_model", build)
    return _predict(ckpt, np.zeros((16, 16, 16), np.float32))


def _full_disk_nifti(ws, monkeypatch):
    target = _nii(ws, "labels.nii.gz", np.zeros((4, 5, 6), np.uint8))  # the previous file

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    return lambda: write_nifti(target, np.ones((6, 5, 4), np.uint8), is_label=True)


def _unwritable_nifti(ws, monkeypatch):
    target = _nii(ws, "labels.nii.gz", np.zeros((4, 5, 6), np.uint8))
    import os as _os

    real_open = _os.open

    def deny(path, *a, **k):
        if ".tmp" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(_os, "open", deny)
    return lambda: write_nifti(target, np.ones((6, 5, 4), np.uint8), is_label=True)


def _full_disk_checkpoint(ws, monkeypatch):
    path = make_tiny_checkpoint(ws / "checkpoint_latest.pt")  # the last good checkpoint
    ckpt = load_checkpoint(path)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    return lambda: save_checkpoint(path, ckpt.state_dict, model_name=ckpt.model_name, model_kwargs=ckpt.model_kwargs,
                                   in_channels=1, num_classes=2, spatial_dims=3, plan=ckpt.plan, label_names={})


def _newer_format(ws):
    path = make_tiny_checkpoint(ws / "new.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 2
    torch.save(payload, ws / "new.pt")
    return lambda: load_checkpoint(ws / "new.pt")


def _other_arch(ws):
    path = make_tiny_checkpoint(ws / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["model"]["kwargs"]["base_width"] = 8  # weights of width 4, recipe says 8
    torch.save(payload, ws / "m.pt")
    return lambda: build_model(ws / "m.pt")


def _finetune_other_model(ws):
    """Fine-tune an RKSeg run from a U-Net checkpoint: the architectures cannot share weights."""
    ckpt = make_tiny_checkpoint(ws / "unet.pt")
    cfg = TrainConfig(output_dir=str(ws / "run"), model="rkseg-l", epochs=1, iterations_per_epoch=1,
                      val_batches=0, patch_size=(16, 16, 16), batch_size=1, device="cpu", init_checkpoint=ckpt)
    return lambda: drive(train(cfg, phantom_cases(1)))


def _other_classes(ws):
    path = make_tiny_checkpoint(ws / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["model"]["num_classes"] = 3  # weights of a 2-class head
    torch.save(payload, ws / "m.pt")
    return _later(build_model, ws / "m.pt")


def _nan_srow(ws):
    import struct

    blob = bytearray(_nii(ws, "ok.nii").read_bytes())
    blob[252:256] = struct.pack("<hh", 0, 1)  # qform unused, sform code 1
    blob[296:300] = struct.pack("<f", float("nan"))  # srow_y[0]
    return _bytes(ws, "a.nii", bytes(blob))


def _labels_unknown(ws):
    (image, labels, sp), = phantom_cases(1)
    labels = labels.copy()
    labels[0, 0, 0] = 7
    return _train(ws, [(image, labels, sp)])


# (id, builder(ws, monkeypatch) -> action, exception type, message regex)
CASES = [
    ("corrupt-gz-random-bytes", lambda ws, mp: _later(read_nifti, _bytes(ws, "c.nii.gz", bytes(range(256)) * 20)),
     NiftiError, r"c\.nii\.gz: not a readable NIfTI file"),
    ("corrupt-gzip-stream", lambda ws, mp: _later(read_nifti, _bytes(ws, "g.nii.gz", gzip.compress(b"x" * 400)[:-9] + b"\0" * 9)),
     NiftiError, r"g\.nii\.gz: not a readable NIfTI"),
    ("truncated-nii", lambda ws, mp: _later(read_nifti, _cut(ws, "t.nii", 0.5)),
     NiftiError, r"t\.nii: file is truncated: header announces \d+ bytes, file has \d+"),
    ("truncated-nii-gz", lambda ws, mp: _later(read_nifti, _cut(ws, "t.nii.gz", 0.5)),
     NiftiError, r"t\.nii\.gz: voxel data is truncated or corrupt"),
    ("truncated-header", lambda ws, mp: _later(read_nifti, _cut(ws, "h.nii.gz", 60)),
     NiftiError, r"h\.nii\.gz: not a readable NIfTI file \(header could not be read"),
    ("empty-nii", lambda ws, mp: _later(read_nifti, _bytes(ws, "e.nii", b"")),
     NiftiError, r"e\.nii: not a readable NIfTI file"),
    ("empty-nii-gz", lambda ws, mp: _later(read_nifti, _bytes(ws, "e.nii.gz", b"")),
     NiftiError, r"e\.nii\.gz: not a readable NIfTI file"),
    ("zero-size-dimension", lambda ws, mp: _later(read_nifti, _nii(ws, "z.nii.gz", np.zeros((4, 0, 5), np.float32))),
     NiftiError, r"a dimension has size zero \(shape \(4, 0, 5\)\)"),
    ("6D-file", lambda ws, mp: _later(read_nifti, _nii(ws, "six.nii.gz", np.zeros((2, 2, 2, 1, 1, 2), np.float32))),
     NiftiError, r"6D NIfTI \(shape \(2, 2, 2, 1, 1, 2\)\) is not supported \(2D-5D only\)"),
    ("5D-time-and-vector", lambda ws, mp: _later(read_nifti, _nii(ws, "five.nii.gz", np.zeros((4, 5, 6, 2, 3), np.float32))),
     NiftiError, r"5D NIfTI with shape \(4, 5, 6, 2, 3\) \(time 2 and vector 3 both > 1\)"),
    ("2D-image-3D-model", lambda ws, mp: _predict(make_tiny_checkpoint(ws / "m.pt"), np.zeros((32, 32), np.float32), (1.0, 1.0)),
     CheckpointError, r"The checkpoint is a 3D model; the image is 2D\. Use a 2D model\."),
    ("4D-two-channels-1ch-model", lambda ws, mp: _predict(make_tiny_checkpoint(ws / "m.pt"), np.zeros((2, 16, 16, 16), np.float32)),
     CheckpointError, r"expects 1 input channel\(s\); the image has 2"),
    ("5D-array", lambda ws, mp: _predict(make_tiny_checkpoint(ws / "m.pt"), np.zeros((1, 1, 16, 16, 16), np.float32)),
     InferenceError, r"Image of shape \(1, 1, 16, 16, 16\) does not match a 3D spacing"),
    ("nan-spacing-file", lambda ws, mp: _later(read_nifti, _pixdim(ws, np.nan)),
     NiftiError, r"voxel spacing \(pixdim\) \[1\.0, nan, 1\.0\] must be finite and non-zero"),
    ("inf-spacing-file", lambda ws, mp: _later(read_nifti, _pixdim(ws, np.inf)),
     NiftiError, r"voxel spacing \(pixdim\) \[1\.0, inf, 1\.0\] must be finite and non-zero"),
    ("zero-spacing-file", lambda ws, mp: _later(read_nifti, _pixdim(ws, 0.0)),
     NiftiError, r"voxel spacing \(pixdim\) \[1\.0, 0\.0, 1\.0\] must be finite and non-zero"),
    ("zero-spacing-predict", lambda ws, mp: _predict(make_tiny_checkpoint(ws / "m.pt"), np.zeros((16, 16, 16), np.float32), (1.0, 0.0, 1.0)),
     InferenceError, r"Spacing must be finite and positive, got \(1\.0, 0\.0, 1\.0\)"),
    ("nan-spacing-predict", lambda ws, mp: _predict(make_tiny_checkpoint(ws / "m.pt"), np.zeros((16, 16, 16), np.float32), (1.0, float("nan"), 1.0)),
     InferenceError, r"Spacing must be finite and positive, got \(1\.0, nan, 1\.0\)"),
    ("nan-image-predict", lambda ws, mp: _predict(make_tiny_checkpoint(ws / "m.pt"), _with_nonfinite(np.nan, 5)),
     PreprocessingError, r"The image contains 5 NaN and 0 infinite voxel value\(s\) \(of 4,096\)\. .*replace them"),
    ("inf-image-training", lambda ws, mp: _train(ws, [(_with_nonfinite(np.inf, 3, phantom_cases(1)[0][0]), phantom_cases(1)[0][1], (1, 1, 1))]),
     PreprocessingError, r"The image contains 0 NaN and 3 infinite voxel value\(s\) \(of 16,384\)"),
    ("nan-affine", lambda ws, mp: _later(read_nifti, _nan_srow(ws)),
     NiftiError, r"a\.nii: (the affine \(qform/sform\) contains non-finite values|the NIfTI header is corrupt)"),
    ("nan-labels-write", lambda ws, mp: _later(write_nifti, ws / "out.nii.gz", np.full((4, 5, 6), np.nan, np.float32), is_label=True),
     NiftiError, r"out\.nii\.gz: label map contains NaN or infinite values"),
    ("inf-labels-write", lambda ws, mp: _later(write_nifti, ws / "out.nii.gz", np.full((4, 5, 6), np.inf, np.float32), is_label=True),
     NiftiError, r"label map contains NaN or infinite values"),
    ("image-labels-shape-differ", lambda ws, mp: _train(ws, [(np.zeros((16, 32, 32), np.float32), np.zeros((16, 32, 30), np.int16), (1, 1, 1))]),
     TrainingError, r"Labels of shape \(16, 32, 30\) do not match the image's spatial shape \(16, 32, 32\)"),
    ("labels-unknown-values", lambda ws, mp: _labels_unknown(ws),
     TrainingError, r"has label values \[7\] that are not among the classes \[0, 1\]"),
    ("labels-empty-training", lambda ws, mp: _train(ws, [(phantom_cases(1)[0][0], np.zeros((16, 32, 32), np.int16), (1, 1, 1))]),
     TrainingError, r"The labels are empty: no case has any foreground voxel to learn from"),
    ("checkpoint-other-architecture", lambda ws, mp: _other_arch(ws),
     CheckpointError, r"does not fit: .*weight shape|does not fit: the weights"),
    ("checkpoint-other-model-finetune", lambda ws, mp: _finetune_other_model(ws),
     TrainingError, r"unet\.pt holds a 'unet-3d-fullres' model; the run asks for 'rkseg-l'"),
    ("checkpoint-other-channels", lambda ws, mp: _predict(make_tiny_checkpoint(ws / "m.pt", in_channels=2), np.zeros((16, 16, 16), np.float32)),
     CheckpointError, r"The checkpoint expects 2 input channel\(s\); the image has 1"),
    ("checkpoint-other-classes", lambda ws, mp: _other_classes(ws),
     CheckpointError, r"does not fit: the weights predict 2 classes but the checkpoint says 3"),
    ("checkpoint-newer-format", lambda ws, mp: _newer_format(ws),
     CheckpointError, r"made by a newer napari-medseg \(format version 2; this version reads up to 1\)\. Upgrade"),
    ("folder-not-a-dataset", lambda ws, mp: _later(load_raw_dataset, ws),
     DatasetError, r"is not an nnU-Net raw dataset folder: it needs dataset.json and imagesTr/"),
    ("dataset-missing-channel", lambda ws, mp: _later(load_raw_dataset, _dataset(ws, channels=2)),
     DatasetError, r"imagesTr: case 'c1' is missing channel file\(s\) \['c1_0001'\] \(dataset.json lists 2 channel\(s\)\)"),
    ("output-parent-is-a-file", lambda ws, mp: _later(write_nifti, _bytes(ws, "afile", b"x") / "out.nii.gz", np.zeros((4, 5, 6)), is_label=True),
     NiftiError, r"cannot write: the parent folder .*afile is not a folder"),
    ("output-unwritable", _unwritable_nifti,
     NiftiError, r"labels\.nii\.gz: cannot write to folder .*Permission denied"),
    ("output-disk-full-labels", _full_disk_nifti,
     NiftiError, r"labels\.nii\.gz: cannot write: No space left on device"),
    ("output-disk-full-checkpoint", _full_disk_checkpoint,
     CheckpointError, r"Could not write checkpoint .*checkpoint_latest\.pt: .*No space left on device"),
    ("volume-too-large-for-device", _oom_predict,
     InsufficientMemoryError, r"Not enough memory to segment an image of 1x16x16x16 voxels on cpu: ran out of memory with 1 tile"),
]


#: The kind of problem of the rows above (written before issue 15's classes 4-9).
_EARLIER = {"corrupt": "reader", "truncated": "reader", "empty": "reader", "zero": "reader", "6D": "reader",
            "5D": "reader", "nan-spacing-file": "reader", "inf-spacing-file": "reader", "nan-affine": "reader",
            "2D": "shape", "4D": "shape", "5D-array": "shape", "image-labels": "shape", "nan-image": "values",
            "inf-image": "values", "nan-labels": "values", "inf-labels": "values", "labels": "values",
            "zero-spacing-predict": "values", "nan-spacing-predict": "values", "checkpoint": "checkpoint",
            "folder": "dataset", "dataset": "dataset", "output": "output", "volume-too-large": "memory"}


def _earlier_kind(case_id: str) -> str:
    return next(kind for prefix, kind in sorted(_EARLIER.items(), key=lambda kv: -len(kv[0]))
                if case_id.startswith(prefix))


#: Every row: ``Case(id, build, exc, message, cls)``; ``cls`` is issue 15's class (4-9) or the kind of
#: an earlier row. ``exc=None``: the input must be accepted (the action checks the result).
ALL_CASES = [Case(c[0], c[1], c[2], c[3], _earlier_kind(c[0])) for c in CASES] + NEW_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_bad_input(tmp_path, monkeypatch, case):
    ws = tmp_path / "ws"
    ws.mkdir()
    action = case.build(ws, monkeypatch)
    before = tree_hashes(ws)
    if case.exc is None:
        action()
    else:
        with pytest.raises(case.exc, match=case.message):
            action()
    monkeypatch.undo()
    after = tree_hashes(ws)
    if case.exc is None:  # an accepted input may create outputs, never change or remove an existing file
        assert {k: after.get(k) for k in before} == before
        assert not [k for k in after if k not in before and ".tmp" in k], after
        return
    created = {k for k in after if k not in before and k.startswith("run")}  # run.json of a refused run: none
    assert after == before, (set(after) ^ set(before), created)


def test_the_matrix_covers_every_class_and_entry_point():
    counts = {}
    for c in ALL_CASES:
        counts[c.cls] = counts.get(c.cls, 0) + 1
    assert len(ALL_CASES) >= 120 and all(counts.get(k, 0) >= 5 for k in "456789"), counts


def test_shear_affine_is_read_with_a_warning(tmp_path, caplog):
    from napari_medseg._reader import read_nifti_layers

    shear = np.array([[1.0, 0.4, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    path = _nii(tmp_path, "shear.nii.gz", affine=shear)
    before = tree_hashes(tmp_path)
    with caplog.at_level(logging.WARNING):
        layers = read_nifti_layers(str(path))
    assert any("shear.nii.gz: the affine has shear" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(layers[0][1]["metadata"]["medseg_geometry"]["affine"], shear)  # kept for saving
    assert tree_hashes(tmp_path) == before


# ------------------------------------------------------------------------------------ viewer cases
def _viewer_with_scan(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).normal(size=(16, 24, 24)).astype(np.float32), name="scan")
    return viewer


def _segment(viewer, tmp_path, **ckpt_kw):
    from napari_medseg.engine.checkpoints import register_checkpoint
    from napari_medseg.widgets._segment import SegmentWidget

    path = make_tiny_checkpoint(tmp_path / "ws" / "m.pt", **ckpt_kw)
    register_checkpoint(path, name="m")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    select_checkpoint(widget.checkpoints, path)
    widget.device.setCurrentText("cpu")
    widget.mirror.setChecked(False)
    return widget


def _layer_state(viewer):
    return [(lay.name, type(lay).__name__, np.asarray(lay.data).tobytes()) for lay in viewer.layers]


@pytest.mark.gui
def test_viewer_corrupt_file_leaves_layers(make_napari_viewer, tmp_path):
    viewer = _viewer_with_scan(make_napari_viewer)
    path = _cut(tmp_path, "broken.nii", 0.5)
    before, files = _layer_state(viewer), tree_hashes(tmp_path)
    with pytest.raises(Exception, match=r"broken\.nii: file is truncated"):
        viewer.open(str(path), plugin="napari-medseg")
    assert _layer_state(viewer) == before and tree_hashes(tmp_path) == files


@pytest.mark.gui
def test_viewer_channel_mismatch_is_refused(make_napari_viewer, qtbot, tmp_path):
    viewer = _viewer_with_scan(make_napari_viewer)
    widget = _segment(viewer, tmp_path, in_channels=2)
    before, files = _layer_state(viewer), tree_hashes(tmp_path / "ws")
    widget.run_button.click()
    assert not widget.running
    assert "Cannot segment: The checkpoint expects 2 input channel(s); the image has 1" in widget.status.text()
    assert _layer_state(viewer) == before and tree_hashes(tmp_path / "ws") == files


@pytest.mark.gui
def test_viewer_volume_too_large_for_device(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_medseg.engine.inference import SlidingWindowInferer as inference

    viewer = _viewer_with_scan(make_napari_viewer)
    widget = _segment(viewer, tmp_path)
    real = inference.build_model

    def build(*a, **k):
        model = real(*a, **k)
        model.forward = lambda x: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory"))
        return model

    monkeypatch.setattr(inference, "build_model", build)
    widget.batch.setValue(2)
    before, files = _layer_state(viewer), tree_hashes(tmp_path / "ws")
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.status.text().startswith("Segmentation failed"), timeout=10_000)
    text = widget.status.text()
    assert text.startswith("Segmentation failed: Not enough memory to segment an image of"), text
    assert "2 tile(s) per batch" in text and "choose the CPU device" in text
    assert _layer_state(viewer) == before and tree_hashes(tmp_path / "ws") == files


@pytest.mark.gui
def test_viewer_save_to_unwritable_location(make_napari_viewer, qtbot, tmp_path):
    viewer = _viewer_with_scan(make_napari_viewer)
    labels = viewer.add_labels(np.ones((16, 24, 24), np.uint8), name="seg")
    widget = _segment(viewer, tmp_path)
    widget.save_layer.set_layer(labels)
    blocker = tmp_path / "ws" / "not_a_folder"
    blocker.write_bytes(b"x")
    before, files = _layer_state(viewer), tree_hashes(tmp_path / "ws")
    assert widget.save_labels(str(blocker / "seg.nii.gz")) == []
    assert "Could not save" in widget.status.text() and "is not a folder" in widget.status.text()
    assert _layer_state(viewer) == before and tree_hashes(tmp_path / "ws") == files


@pytest.mark.gui
@pytest.mark.parametrize(("change", "message"), [
    ({"scale": (2.0, 1.0, 1.0)}, r"voxel size \(scale\) \(2, 1, 1\) vs the image's \(1, 1, 1\)"),
    ({"translate": (0.0, 5.0, 0.0)}, r"origin \(translate\) \(0, 5, 0\) vs the image's \(0, 0, 0\), 5 mm away"),
    ({"rotate": 30}, r"their orientation \(rotate, shear or affine\) differs"),
], ids=["other-spacing", "other-origin", "other-orientation"])
def test_viewer_labels_on_another_grid_are_refused(make_napari_viewer, tmp_path, change, message):
    """Same shape, other geometry: training on them would teach a shifted segmentation."""
    import re

    from napari_medseg.widgets._train import TrainWidget

    viewer = _viewer_with_scan(make_napari_viewer)
    image = viewer.layers["scan"].data
    viewer.add_labels((image > image.mean()).astype(np.uint8), name="other grid", **change)
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    widget.labels.set_layer(viewer.layers["other grid"])
    widget.output.setText(str(tmp_path / "ws" / "run"))
    (tmp_path / "ws").mkdir(exist_ok=True)
    before, files = _layer_state(viewer), tree_hashes(tmp_path / "ws")
    widget.train_button.click()
    assert not widget.running
    assert re.search(message, widget.status.text()), widget.status.text()
    assert "not on the image's grid" in widget.status.text()
    assert _layer_state(viewer) == before and tree_hashes(tmp_path / "ws") == files
