"""Issue 15, classes 4-9, as rows of the bad-input matrix (``test_bad_input_matrix.py``).

Each row: ``Case(id, build, exc, message, cls)``. ``build(ws, monkeypatch)`` makes the inputs in the
workspace ``ws`` (before the files are hashed) and returns the action. ``exc`` is the error the action
must raise with a message matching ``message``; ``exc=None`` means the input is *accepted* (handled
right: converted, computed in float64, ...) and the action checks the result itself. CLI rows raise
:class:`CliRefusal` carrying the exit status and the one ``error:`` line the command printed.

Classes: 4 wrong geometry, 5 units, 6 size guards, 7 corruption, 8 foreign exceptions / raw
tracebacks, 9 silent oddities.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import struct
import zipfile
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch
from rel_helpers import make_tiny_checkpoint, phantom_cases

from napari_medseg import api
from napari_medseg.cli import main
from napari_medseg.engine.checkpoints import CheckpointError, build_model, load_checkpoint
from napari_medseg.engine.data.dataset import (
    DatasetError,
    load_raw_dataset,
    read_raw_case,
    verify_dataset,
)
from napari_medseg.engine.evaluation import (
    EvaluationError,
    SelectionError,
    evaluate_folder,
    find_best,
)
from napari_medseg.engine.inference import predict
from napari_medseg.engine.jobs import drive
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.preprocessing import PreprocessingError, normalization_params
from napari_medseg.engine.preprocessing.resampling import ResamplingError, compute_new_shape
from napari_medseg.engine.training import TrainConfig, TrainingError, train
from napari_medseg.io import (
    NiftiError,
    VolumeError,
    read_nifti,
    read_volume,
    write_nifti,
    write_volume,
)
from napari_medseg.io.phantom import write_phantom_dataset


class Case(NamedTuple):
    id: str
    build: Any
    exc: Any
    message: str
    cls: str


class CliRefusal(Exception):
    """A CLI command that exited non-zero: ``exit N: <the one error line>``."""


# ------------------------------------------------------------------------------------------ helpers
TINY = '{"base_width": 4, "max_width": 16}'


def cli(*argv: Any):
    """The action ``napari-medseg argv``: raises :class:`CliRefusal` on a non-zero exit, after checking
    the command printed exactly one ``error:`` line and no traceback."""
    args = [str(a) for a in argv]

    def action():
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(args)
            except SystemExit as exit_:  # argparse (status 2) or SystemExit("error: ...") (Python exits with 1)
                rc = exit_.code if isinstance(exit_.code, int) else 1
                if not isinstance(exit_.code, int):
                    print(exit_.code, file=err)
        text = err.getvalue()
        assert "Traceback" not in text, text
        if rc == 0:
            return out.getvalue()
        lines = [ln.strip() for part in text.split("\n") for ln in part.split("\r")]
        errors = [ln for ln in lines if ln.startswith(("error:", "usage:"))]
        assert len([ln for ln in errors if ln.startswith("error:")]) == 1, text
        raise CliRefusal(f"exit {rc}: {errors[-1]}")

    return action


def later(func, *args, **kwargs):
    return lambda: func(*args, **kwargs)


def phantom_ds(ws, name="Dataset001_P", n=2, shape=(16, 32, 32)):
    return write_phantom_dataset(ws / name, num_cases=n, shape=shape)


def rewrite(path, affine=None, units=None, data=None):
    """Save the NIfTI at ``path`` again with another affine / spatial unit / data (same voxels by default)."""
    img = nib.load(path)
    arr = np.asanyarray(img.dataobj) if data is None else data
    new = nib.Nifti1Image(arr, img.affine if affine is None else affine)
    if units:
        new.header.set_xyzt_units(units)
    nib.save(new, path)
    return path


def label_of(ds, i=0):
    return os.path.join(ds, "labelsTr", f"phantom_{i:03d}.nii.gz")


def image_of(ds, i=0):
    return os.path.join(ds, "imagesTr", f"phantom_{i:03d}_0000.nii.gz")


def moved(path, how):
    """The affine of ``path`` changed: shift (mm along y), flip (axis i, same field of view), scale, rotate."""
    aff = nib.load(path).affine.copy()
    shape = nib.load(path).shape
    if how == "shift":
        aff[1, 3] += 40.0
    elif how == "flip":
        aff[0, 3] += aff[0, 0] * (shape[0] - 1)
        aff[:, 0] = -aff[:, 0]
        aff[3, 0] = 0.0
    elif how == "spacing":
        aff[:3, 2] *= 1.5
    elif how == "rotate":
        c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
        aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ aff[:3, :3]
    return aff


def bad_label_ds(ws, how="shift", **kw):
    ds = phantom_ds(ws, **kw)
    rewrite(label_of(ds), moved(label_of(ds), how))
    return ds


def train_on(ws, data, **kw):
    settings = dict(output_dir=str(ws / "run"), model="unet-3d-fullres", model_kwargs={"base_width": 4},
                    epochs=1, iterations_per_epoch=1, val_batches=0, patch_size=(16, 16, 16), batch_size=1,
                    device="cpu", label_names={0: "background", 1: "organ"})
    cfg = TrainConfig(**{**settings, **kw})
    return lambda: drive(train(cfg, data))


def predict_on(ckpt, image, spacing=(1.0, 1.0, 1.0), **kw):
    return lambda: drive(predict(image, spacing, [ckpt], device="cpu", mirror=False, **kw))


def label_folders(ws, how=None, units=None):
    """``pred/`` and ``ref/`` with one case; the prediction moved ``how`` or stored in ``units``."""
    (ws / "pred").mkdir()
    (ws / "ref").mkdir()
    labels = phantom_cases(1)[0][1]
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.T.astype(np.uint8)), aff), ws / "ref" / "c.nii.gz")
    pred = ws / "pred" / "c.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.T.astype(np.uint8)), aff), pred)
    if how:
        rewrite(pred, moved(pred, how))
    if units:
        factor = {"meter": 0.001, "micron": 1000.0}[units]
        scaled = aff.copy()
        scaled[:3] *= factor
        rewrite(pred, scaled, units)
    return ws / "pred", ws / "ref"


def evaluates_perfectly(pred, ref):
    def action():
        result = evaluate_folder(pred, ref, {0: "background", 1: "organ"})
        assert result["mean"]["organ"]["dice"] == 1.0, result
    return action


def gz_bomb(ws, name="bomb.nii.gz", shape=(256, 256, 256)):
    """A small .nii.gz announcing a large volume of zeros (64 MB for the default shape)."""
    path = ws / name
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    return path


def tight_memory(mp, gb="0.01"):
    mp.setenv("MEDSEG_MAX_MEMORY_GB", gb)


def flipped_gz(ws, name="flip.nii.gz", labels=False):
    """A .nii.gz whose data block (stored, level 0) has one changed byte: nibabel reads a wrong voxel."""
    data = (phantom_cases(1)[0][1] if labels else phantom_cases(1)[0][0]).T
    raw = nib.Nifti1Image(np.ascontiguousarray(data.astype(np.uint8 if labels else np.float32)), np.eye(4))
    blob = bytearray(gzip.compress(raw.to_bytes(), compresslevel=0))
    blob[len(blob) // 2] ^= 0x01
    path = ws / name
    path.write_bytes(bytes(blob))
    return path


def bad_isize_gz(ws, name="len.nii.gz"):
    raw = nib.Nifti1Image(np.ones((8, 9, 10), np.float32), np.eye(4)).to_bytes()
    blob = bytearray(gzip.compress(raw))
    blob[-4:] = struct.pack("<I", len(raw) + 4)
    path = ws / name
    path.write_bytes(bytes(blob))
    return path


def flipped_checkpoint(ws, name="m.pt", where="data"):
    """A tiny checkpoint with one changed byte in a weight (``data``) or in the stored CRC (``crc``)."""
    path = make_tiny_checkpoint(ws / name)
    blob = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    if where == "data":
        name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        blob[start + info.file_size // 2] ^= 0x40
    else:  # the CRC-32 the central directory stores for that entry
        pos = struct.unpack("<I", blob[blob.rfind(b"PK\x05\x06") + 16:][:4])[0]
        while blob[pos:pos + 4] == b"PK\x01\x02":
            name_len, extra_len, comment_len = struct.unpack("<HHH", blob[pos + 28:pos + 34])
            if bytes(blob[pos + 46:pos + 46 + name_len]).decode() == info.filename:
                blob[pos + 16] ^= 0xFF
                break
            pos += 46 + name_len + extra_len + comment_len
    with open(path, "wb") as fh:
        fh.write(bytes(blob))
    return path


def huge_kwargs_checkpoint(ws, mp):
    """A tiny checkpoint whose kwargs describe a giant network; building it for real is forbidden."""
    import napari_medseg.engine.checkpoints.build as build_mod

    path = make_tiny_checkpoint(ws / "huge.pt")
    payload = torch.load(path, weights_only=True)
    payload["model"]["kwargs"].update(base_width=20_000, max_width=20_000)
    torch.save(payload, path)
    real = build_mod.create_model

    def guarded(*a, **k):
        if torch.empty(0).device.type != "meta" and k.get("base_width", 0) > 1000:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (the test forbids the real build)")
        return real(*a, **k)

    mp.setattr(build_mod, "create_model", guarded)
    return path


def sparse_checkpoint(ws, dtype=None):
    path = make_tiny_checkpoint(ws / "odd.pt")
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["state_dict"]))
    t = payload["state_dict"][key]
    payload["state_dict"][key] = t.to(dtype) if dtype is not None else t.to_sparse()
    torch.save(payload, path)
    return path


def nifti(ws, name, data, affine=None, units=None):
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    if units:
        img.header.set_xyzt_units(units)
    nib.save(img, ws / name)
    return ws / name


def run_folder(ws, name, run_json):
    folder = ws / name
    folder.mkdir()
    (folder / "run.json").write_text(run_json if isinstance(run_json, str) else json.dumps(run_json))
    make_tiny_checkpoint(folder / "checkpoint_final.pt")
    return folder


def headless_layers():
    from napari.layers import Image, Labels

    from napari_medseg.widgets._layers import InputError, check_same_grid, resolve_image_input

    return Image, Labels, InputError, check_same_grid, resolve_image_input


def widget_grid(change):
    def action():
        image_cls, labels_cls, _, check, resolve = headless_layers()
        scan = image_cls(np.zeros((8, 9, 10), np.float32), name="scan")
        check(resolve([scan]), labels_cls(np.zeros((8, 9, 10), np.uint8), name="lab", **change))
    return action


def accepts_huge_values(ws):
    ckpt = make_tiny_checkpoint(ws / "m.pt")
    image = phantom_cases(1)[0][0][:16, :16, :16]

    def action():
        small = drive(predict(image, (1, 1, 1), [ckpt], device="cpu", mirror=False, return_probabilities=True))
        huge = drive(predict(image.astype(np.float64) * 1e37, (1, 1, 1), [ckpt], device="cpu", mirror=False,
                             return_probabilities=True))
        assert np.all(np.isfinite(huge.probabilities))
        np.testing.assert_allclose(huge.probabilities, small.probabilities, atol=1e-4)
    return action


def normalises_near_float32_max():
    plan = Plan(configuration="3d_fullres", spacing=(1, 1, 1), patch_size=(16, 16, 16), batch_size=1,
                pool_kernels=[[2, 2, 2]], conv_kernels=[[3, 3, 3], [3, 3, 3]], normalization=["zscore"],
                num_channels=1, num_classes=2, use_mask_for_norm=[False])

    def action():
        normal = np.clip(np.random.default_rng(0).normal(size=(1, 8, 8, 8)), -3, 3)
        image = (normal * 1e38).astype(np.float32)  # up to +-3e38, near float32's +-3.4e38
        (norm,) = normalization_params(image, plan)
        assert np.isfinite(norm.mean) and np.isfinite(norm.std) and norm.std > 1e37, norm
        out = np.empty(image.shape[1:], np.float32)
        norm.apply(image[0], out)
        assert np.all(np.isfinite(out)) and abs(float(out.std()) - 1.0) < 1e-3
    return action


# ------------------------------------------------------------------------------------------- rows
def _class4() -> list[Case]:
    grid = r"is not on the voxel grid of .*phantom_000_0000\.nii\.gz"
    return [
        Case("geom-label-shifted-40mm-read", lambda ws, mp: later(read_raw_case, load_raw_dataset(bad_label_ds(ws)).cases[0]),
             DatasetError, grid + r": origin \(0, 40, 0\) vs .*, 40 mm away", "4"),
        Case("geom-label-flipped-axis-read", lambda ws, mp: later(read_raw_case, load_raw_dataset(bad_label_ds(ws, "flip")).cases[0]),
             DatasetError, grid + r": orientation differs: axis 2 is flipped", "4"),
        Case("geom-label-other-spacing-read", lambda ws, mp: later(read_raw_case, load_raw_dataset(bad_label_ds(ws, "spacing")).cases[0]),
             DatasetError, grid + r": voxel size \(3, 1, 1\) vs .*\(2, 1, 1\)", "4"),
        Case("geom-label-rotated-read", lambda ws, mp: later(read_raw_case, load_raw_dataset(bad_label_ds(ws, "rotate")).cases[0]),
             DatasetError, grid + r": orientation differs: axis [12] points 10 degrees away", "4"),
        Case("geom-label-shifted-verify", lambda ws, mp: later(verify_dataset, load_raw_dataset(bad_label_ds(ws))),
             DatasetError, r"label file: .*phantom_000\.nii\.gz is not on the voxel grid", "4"),
        Case("geom-label-shifted-train-api", lambda ws, mp: train_on(ws, str(bad_label_ds(ws))),
             DatasetError, r"phantom_000\.nii\.gz is not on the voxel grid .*40 mm away", "4"),
        Case("geom-label-flipped-train-cli", lambda ws, mp: cli("train", bad_label_ds(ws, "flip"), "-o", ws / "run", "--model-kwargs", TINY,
                                                               "--epochs", "1", "--iterations", "1", "--device", "cpu", "-q"),
             CliRefusal, r"exit 2: error: Case phantom_000: label file: .*phantom_000\.nii\.gz is not on the voxel grid .*flipped", "4"),
        Case("geom-label-spacing-plan-cli", lambda ws, mp: cli("plan", bad_label_ds(ws, "spacing")),
             CliRefusal, r"exit 2: error: .*phantom_000\.nii\.gz is not on the voxel grid .*voxel size", "4"),
        Case("geom-label-shifted-plan-api", lambda ws, mp: later(api.plan, bad_label_ds(ws)),
             DatasetError, r"40 mm away", "4"),
        Case("geom-channel-shifted", lambda ws, mp: later(read_raw_case, load_raw_dataset(_two_channel_ds(ws)).cases[0]),
             DatasetError, r"Case c1: .*c1_0001\.nii\.gz is not on the voxel grid of .*c1_0000\.nii\.gz: origin", "4"),
        Case("geom-label-other-shape-read", lambda ws, mp: later(read_raw_case, load_raw_dataset(_other_shape_label(ws)).cases[0]),
             DatasetError, r"phantom_000\.nii\.gz has shape \(16, 32, 30\), which differs from .*\(16, 32, 32\)", "4"),
        Case("geom-label-mha-shifted", lambda ws, mp: later(read_raw_case, load_raw_dataset(_mha_label_ds(ws)).cases[0]),
             DatasetError, r"phantom_000\.mha is not on the voxel grid .*40 mm away", "4"),
        Case("geom-findbest-shifted-label", lambda ws, mp: later(drive, find_best(str(bad_label_ds(ws)), {
            "a": str(run_folder(ws, "runA", {"val_cases": ["phantom_000"]}))}, device="cpu", mirror=False)),
             DatasetError, r"not on the voxel grid", "4"),
        Case("geom-widget-labels-shifted", lambda ws, mp: widget_grid({"translate": (0, 40, 0)}),
             ValueError, r"not on the image's grid: origin \(translate\) \(0, 40, 0\) .*40 mm away", "4"),
        Case("geom-widget-labels-flipped", lambda ws, mp: widget_grid({"scale": (1, 1, -1), "translate": (0, 0, 9)}),
             ValueError, r"not on the image's grid: their orientation .* axis 2 is flipped", "4"),
        Case("geom-widget-labels-spacing", lambda ws, mp: widget_grid({"scale": (1, 1.5, 1)}),
             ValueError, r"not on the image's grid: voxel size \(scale\) \(1, 1\.5, 1\)", "4"),
        Case("geom-widget-same-grid-accepted", lambda ws, mp: widget_grid({"translate": (0, 0, 0.001)}),
             None, "", "4"),
        Case("geom-label-float32-rounding-accepted", lambda ws, mp: _float_jitter_ok(ws), None, "", "4"),
    ]


def _two_channel_ds(ws):
    root = ws / "Dataset002_C"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "a", "1": "b"}, "labels": {"background": 0, "x": 1},
                                                   "file_ending": ".nii.gz"}))
    data = np.random.default_rng(0).normal(size=(10, 9, 8)).astype(np.float32)
    nifti(root / "imagesTr", "c1_0000.nii.gz", data)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    nifti(root / "imagesTr", "c1_0001.nii.gz", data, shifted)
    nifti(root / "labelsTr", "c1.nii.gz", (data > 0).astype(np.uint8))
    return root


def _other_shape_label(ws):
    ds = phantom_ds(ws)
    lab = label_of(ds)
    rewrite(lab, data=np.zeros((30, 32, 16), np.uint8))
    return ds


def _mha_label_ds(ws):
    ds = phantom_ds(ws)
    vol = read_volume(label_of(ds))
    geom = dict(vol.header)
    aff = np.array(vol.affine)
    aff[1, 3] += 40.0
    geom["affine"] = aff.tolist()
    write_volume(os.path.join(ds, "labelsTr", "phantom_000.mha"), vol.data, {"affine": aff.tolist()}, is_label=True)
    os.remove(label_of(ds))
    return ds


def _float_jitter_ok(ws):
    """A label whose affine differs from the image's by float32 rounding only (micrometres) is accepted."""
    ds = phantom_ds(ws, n=1)
    aff = nib.load(label_of(ds)).affine.copy()
    aff[:3, 3] += 1e-4
    rewrite(label_of(ds), aff)
    return later(read_raw_case, load_raw_dataset(ds).cases[0])


def _class5() -> list[Case]:
    return [
        Case("units-metre-labels-40mm-off", lambda ws, mp: later(read_raw_case, load_raw_dataset(_metre_labels(ws, 0.04)).cases[0]),
             DatasetError, r"origin \(0, 40, 0\) vs .*40 mm away", "5"),
        Case("units-metre-labels-same-place-accepted", lambda ws, mp: later(read_raw_case, load_raw_dataset(_metre_labels(ws, 0.0)).cases[0]),
             None, "", "5"),
        Case("units-micron-labels-same-place-accepted", lambda ws, mp: later(verify_dataset, load_raw_dataset(_micron_labels(ws))),
             None, "", "5"),
        Case("units-metre-scan-read-in-mm", lambda ws, mp: _reads_as(nifti(ws, "m.nii.gz", np.zeros((4, 5, 6), np.float32),
                                                                          np.diag([0.002, 0.001, 0.001, 1]), "meter"), (1.0, 1.0, 2.0)),
             None, "", "5"),
        Case("units-micron-scan-read-in-mm", lambda ws, mp: _reads_as(nifti(ws, "u.nii.gz", np.zeros((4, 5, 6), np.float32),
                                                                           np.diag([500.0, 500, 1000, 1]), "micron"), (1.0, 0.5, 0.5)),
             None, "", "5"),
        Case("units-metre-geometry-written-back", lambda ws, mp: _metre_round_trip(ws), None, "", "5"),
        Case("units-metre-1m-voxels-predict-file", lambda ws, mp: later(
            api.predict_file,
            nifti(ws, "big_voxels.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32),
                  np.diag([1.0, 1.0, 1.0, 1.0]), "meter"), ws / "out.nii.gz", make_tiny_checkpoint(ws / "m.pt"),
            device="cpu", mirror=False, force=True),
             ResamplingError, r"of 1000x1000x1000 mm to 1x1x1 mm would make", "5"),
        Case("units-metre-1m-voxels-predict-cli", lambda ws, mp: cli(
            "predict", nifti(ws, "big_voxels.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32),
                             np.eye(4), "meter"), "-o", ws / "out.nii.gz", "-c", make_tiny_checkpoint(ws / "m.pt"),
            "--device", "cpu", "--no-mirror", "-q", "--force"),
             CliRefusal, r"exit 2: error: Resampling 16x16x16 voxels of 1000x1000x1000 mm", "5"),
        Case("units-micron-500um-scan-predicts", lambda ws, mp: _micron_predicts(ws), None, "", "5"),
        Case("units-evaluate-micron-prediction-accepted", lambda ws, mp: evaluates_perfectly(*label_folders(ws, units="micron")),
             None, "", "5"),
        Case("units-evaluate-metre-prediction-accepted", lambda ws, mp: evaluates_perfectly(*label_folders(ws, units="meter")),
             None, "", "5"),
    ]


def _metre_labels(ws, offset_m):
    ds = phantom_ds(ws, n=1)
    aff = nib.load(label_of(ds)).affine.copy()
    aff[:3] *= 0.001
    aff[1, 3] += offset_m
    rewrite(label_of(ds), aff, "meter")
    return ds


def _micron_labels(ws):
    ds = phantom_ds(ws, n=1)
    aff = nib.load(label_of(ds)).affine.copy()
    aff[:3] *= 1000.0
    rewrite(label_of(ds), aff, "micron")
    return ds


def _reads_as(path, spacing):
    def action():
        vol = read_nifti(path)
        np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), spacing[::-1], rtol=1e-6)
    return action


def _metre_round_trip(ws):
    src = nifti(ws, "m.nii.gz", np.zeros((4, 5, 6), np.uint8), np.array(
        [[0.001, 0, 0, -0.05], [0, 0.001, 0, 0.02], [0, 0, 0.002, 0.01], [0, 0, 0, 1]]), "meter")

    def action():
        vol = read_nifti(src)
        (ws / "out").mkdir()
        write_nifti(ws / "out" / "labels.nii.gz", np.ones(vol.data.shape, np.uint8), vol, is_label=True)
        a, b = nib.load(src).header, nib.load(ws / "out" / "labels.nii.gz").header
        assert b.get_xyzt_units()[0] == "meter"
        for key in ("srow_x", "srow_y", "srow_z", "pixdim"):
            np.testing.assert_allclose(a[key][:4], b[key][:4])
        np.testing.assert_allclose(read_nifti(ws / "out" / "labels.nii.gz").affine, vol.affine)
    return action


def _micron_predicts(ws):
    path = nifti(ws, "u.nii.gz", np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32),
                 np.diag([500.0, 500.0, 500.0, 1]), "micron")
    ckpt = make_tiny_checkpoint(ws / "m.pt")

    def action():
        vol = read_nifti(path)
        assert vol.spacing == (0.5, 0.5, 0.5)
        result = drive(predict(vol.data, vol.spacing, [ckpt], device="cpu", mirror=False))
        assert result.labels.shape == (32, 32, 32)
    return action


def _class6() -> list[Case]:
    need = r"would need about 64 MB of memory; 10\.2 MB is available \(your MEDSEG_MAX_MEMORY_GB\)"
    return [
        Case("size-gzip-bomb-read", lambda ws, mp: (tight_memory(mp), later(read_nifti, gz_bomb(ws)))[1],
             NiftiError, r"bomb\.nii\.gz: reading 256x256x256 float32 voxels " + need, "6"),
        Case("size-gzip-bomb-read-volume", lambda ws, mp: (tight_memory(mp), later(read_volume, gz_bomb(ws)))[1],
             NiftiError, need + r".*MEDSEG_SIZE_GUARD=off", "6"),
        Case("size-gzip-bomb-predict-cli", lambda ws, mp: (tight_memory(mp), cli("predict", gz_bomb(ws), "-o", ws / "o.nii.gz",
                                                                              "-c", make_tiny_checkpoint(ws / "m.pt"), "--device", "cpu", "-q"))[1],
             CliRefusal, r"exit 2: error: .*bomb\.nii\.gz: reading 256x256x256 float32 voxels would need about 64 MB", "6"),
        Case("size-gzip-bomb-in-dataset", lambda ws, mp: (tight_memory(mp), later(read_raw_case, load_raw_dataset(_bomb_ds(ws)).cases[0]))[1],
             DatasetError, r"Cannot read .*phantom_000_0000\.nii\.gz: .*would need about 64 MB", "6"),
        Case("size-gzip-bomb-evaluate", lambda ws, mp: (tight_memory(mp), later(evaluate_folder, *_bomb_eval(ws), {0: "b", 1: "x"}))[1],
             DatasetError, r"c\.nii\.gz: reading 256x256x256 .*would need about", "6"),
        Case("size-guard-off-reads-anyway", lambda ws, mp: (tight_memory(mp), mp.setenv("MEDSEG_SIZE_GUARD", "off"),
                                                           later(read_nifti, gz_bomb(ws, shape=(64, 64, 64))))[-1],
             None, "", "6"),
        Case("size-huge-kwargs-build", lambda ws, mp: later(build_model, huge_kwargs_checkpoint(ws, mp)),
             CheckpointError, r"huge\.pt does not fit: .*weight shape|huge\.pt does not fit", "6"),
        Case("size-huge-kwargs-predict", lambda ws, mp: predict_on(huge_kwargs_checkpoint(ws, mp), np.zeros((16, 16, 16), np.float32)),
             CheckpointError, r"huge\.pt does not fit", "6"),
        Case("size-huge-kwargs-predict-cli", lambda ws, mp: cli(
            "predict", nifti(ws, "s.nii.gz", np.zeros((16, 16, 16), np.float32)), "-o", ws / "o.nii.gz",
            "-c", huge_kwargs_checkpoint(ws, mp), "--device", "cpu", "-q"),
             CliRefusal, r"exit 2: error: .*huge\.pt does not fit", "6"),
        Case("size-8cubed-at-50mm-predict", lambda ws, mp: predict_on(make_tiny_checkpoint(ws / "m.pt"),
                                                                      np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32),
                                                                      (50.0, 50.0, 50.0), force=True),
             ResamplingError, r"8x8x8 voxels of 50x50x50 mm to 1x1x1 mm would make 400x400x400 = 64,000,000 voxels, "
                              r"125,000 per input voxel", "6"),
        Case("size-8cubed-at-50mm-cli", lambda ws, mp: cli("predict", nifti(ws, "s.nii.gz", np.random.default_rng(0).normal(
            size=(8, 8, 8)).astype(np.float32), np.diag([50.0, 50, 50, 1])), "-o", ws / "o.nii.gz", "-c",
            make_tiny_checkpoint(ws / "m.pt"), "--device", "cpu", "-q", "--force"),
             CliRefusal, r"exit 2: error: Resampling 8x8x8 voxels of 50x50x50 mm", "6"),
        Case("size-resample-shape-guard", lambda ws, mp: later(compute_new_shape, (8, 8, 8), (50, 50, 50), (0.5, 0.5, 0.5)),
             ResamplingError, r"would make 800x800x800 = 512,000,000 voxels, 1,000,000 per input voxel", "6"),
        Case("size-resample-memory-guard", lambda ws, mp: (tight_memory(mp, "0.001"), later(
            compute_new_shape, (64, 64, 64), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0)))[1],
             ResamplingError, r"Resampling 64x64x64 voxels to 128x128x128 .* would need about 24 MB of memory", "6"),
        Case("size-gzip-bomb-train-api", lambda ws, mp: (tight_memory(mp), train_on(ws, str(_bomb_ds(ws))))[1],
             DatasetError, r"phantom_000_0000\.nii\.gz: reading 256x256x256 float32 voxels would need about 64 MB", "6"),
    ]


def _bomb_ds(ws):
    ds = phantom_ds(ws, n=1)
    rewrite(image_of(ds), data=np.zeros((256, 256, 256), np.float32))
    return ds


def _bomb_eval(ws):
    (ws / "pred").mkdir()
    (ws / "ref").mkdir()
    gz_bomb(ws / "ref", "c.nii.gz")
    nifti(ws / "pred", "c.nii.gz", np.zeros((4, 4, 4), np.uint8))
    return ws / "pred", ws / "ref"


def _class7() -> list[Case]:
    crc = r"fail their gzip checksum \(CRC check failed"
    ck = r"is damaged: its entry .* does not match the CRC-32 checksum"
    return [
        Case("corrupt-gz-flipped-byte-read", lambda ws, mp: later(read_nifti, flipped_gz(ws)), NiftiError, r"flip\.nii\.gz: the compressed data " + crc, "7"),
        Case("corrupt-gz-flipped-byte-read-volume", lambda ws, mp: later(read_volume, flipped_gz(ws)), NiftiError, crc, "7"),
        Case("corrupt-gz-wrong-length", lambda ws, mp: later(read_nifti, bad_isize_gz(ws)), NiftiError,
             r"len\.nii\.gz: (the compressed data fail their gzip checksum \(Incorrect length|voxel data is truncated or corrupt)", "7"),
        Case("corrupt-gz-napari-reader", lambda ws, mp: later(_read_layers(), str(flipped_gz(ws))), NiftiError, crc, "7"),
        Case("corrupt-gz-in-dataset", lambda ws, mp: later(read_raw_case, load_raw_dataset(_flipped_ds(ws)).cases[0]),
             DatasetError, r"Cannot read .*phantom_000_0000\.nii\.gz: .*" + crc, "7"),
        Case("corrupt-gz-predict-cli", lambda ws, mp: cli("predict", flipped_gz(ws), "-o", ws / "o.nii.gz", "-c",
                                                          make_tiny_checkpoint(ws / "m.pt"), "--device", "cpu", "-q"),
             CliRefusal, r"exit 2: error: .*flip\.nii\.gz: the compressed data fail their gzip checksum", "7"),
        Case("corrupt-gz-fill-cli", lambda ws, mp: cli("fill", flipped_gz(ws, labels=True), "-o", ws / "filled.nii.gz"),
             CliRefusal, r"exit 2: error: .*flip\.nii\.gz: the compressed data fail their gzip checksum", "7"),
        Case("corrupt-gz-evaluate", lambda ws, mp: later(evaluate_folder, *_flipped_eval(ws), {0: "b", 1: "x"}),
             DatasetError, r"c\.nii\.gz: the compressed data " + crc, "7"),
        Case("corrupt-checkpoint-weight-byte", lambda ws, mp: later(load_checkpoint, flipped_checkpoint(ws)), CheckpointError, r"m\.pt " + ck, "7"),
        Case("corrupt-checkpoint-stored-crc", lambda ws, mp: later(load_checkpoint, flipped_checkpoint(ws, where="crc")),
             CheckpointError, r"m\.pt (is damaged|.*damaged archive)", "7"),
        Case("corrupt-checkpoint-build", lambda ws, mp: later(build_model, flipped_checkpoint(ws)), CheckpointError, ck, "7"),
        Case("corrupt-checkpoint-predict", lambda ws, mp: predict_on(flipped_checkpoint(ws), np.zeros((16, 16, 16), np.float32)),
             CheckpointError, ck, "7"),
        Case("corrupt-checkpoint-predict-cli", lambda ws, mp: cli("predict", nifti(ws, "s.nii.gz", np.zeros((16, 16, 16), np.float32)),
                                                                  "-o", ws / "o.nii.gz", "-c", flipped_checkpoint(ws), "--device", "cpu", "-q"),
             CliRefusal, r"exit 2: error: .*m\.pt is damaged", "7"),
        Case("corrupt-checkpoint-finetune", lambda ws, mp: train_on(ws, phantom_cases(1), init_checkpoint=flipped_checkpoint(ws)),
             (CheckpointError, TrainingError), ck, "7"),
    ]


def _flipped_ds(ws):
    ds = phantom_ds(ws, n=1)
    raw = nib.load(image_of(ds))
    blob = bytearray(gzip.compress(nib.Nifti1Image(np.asanyarray(raw.dataobj), raw.affine).to_bytes(), compresslevel=0))
    blob[len(blob) // 2] ^= 0x01
    with open(image_of(ds), "wb") as fh:
        fh.write(bytes(blob))
    return ds


def _flipped_eval(ws):
    (ws / "pred").mkdir()
    (ws / "ref").mkdir()
    flipped_gz(ws / "ref", "c.nii.gz", labels=True)
    nifti(ws / "pred", "c.nii.gz", np.zeros((4, 4, 4), np.uint8))
    return ws / "pred", ws / "ref"


def _class8() -> list[Case]:
    return [
        Case("raw-zero-size-axis-predict", lambda ws, mp: predict_on(make_tiny_checkpoint(ws / "m.pt"), np.zeros((0, 16, 16), np.float32)),
             ResamplingError, r"The image has an axis of size 0 \(shape \(0, 16, 16\)\)", "8"),
        Case("raw-sparse-tensor-load", lambda ws, mp: later(load_checkpoint, sparse_checkpoint(ws)),
             CheckpointError, r"odd\.pt: Checkpoint tensor state_dict\[.*\] is a sparse_coo tensor", "8"),
        Case("raw-sparse-tensor-predict", lambda ws, mp: predict_on(sparse_checkpoint(ws), np.zeros((16, 16, 16), np.float32)),
             CheckpointError, r"sparse_coo tensor; only dense tensors", "8"),
        Case("raw-complex-tensor-load", lambda ws, mp: later(load_checkpoint, sparse_checkpoint(ws, torch.complex64)),
             CheckpointError, r"has dtype torch\.complex64; only real and integer", "8"),
        Case("raw-config-epochs-abc-inline-cli", lambda ws, mp: cli("train", phantom_ds(ws), "-o", ws / "run", "--config", '{"epochs":"abc"}'),
             CliRefusal, r"exit 1: error: --config: Training setting epochs \(--epochs\) must be an integer of at least 1, got 'abc'", "8"),
        Case("raw-config-epochs-abc-file-cli", lambda ws, mp: cli("train", phantom_ds(ws), "-o", ws / "run", "--config",
                                                                  _text(ws, "cfg.json", '{"epochs": "abc"}')),
             CliRefusal, r"exit 1: error: .*cfg\.json: Training setting epochs", "8"),
        Case("raw-config-list-cli", lambda ws, mp: cli("train", phantom_ds(ws), "-o", ws / "run", "--config", _text(ws, "cfg.json", "[1, 2]")),
             CliRefusal, r"exit 1: error: .*cfg\.json must hold a JSON object of settings, not a list", "8"),
        Case("raw-config-epochs-abc-api", lambda ws, mp: train_on(ws, phantom_cases(1), iterations_per_epoch="abc"),
             TrainingError, r"iterations_per_epoch \(--iterations\) must be an integer of at least 1, got 'abc'", "8"),
        Case("raw-config-from-dict", lambda ws, mp: later(TrainConfig.from_dict, {"epochs": "abc"}),
             TrainingError, r"epochs \(--epochs\) must be an integer", "8"),
        Case("raw-patch-zero-api", lambda ws, mp: train_on(ws, phantom_cases(1), patch_size=(0, 16, 16)),
             TrainingError, r"patch_size \(--patch-size\) must be 2 or 3 positive integers, got \(0, 16, 16\)", "8"),
        Case("raw-patch-zero-cli", lambda ws, mp: cli("train", phantom_ds(ws), "-o", ws / "run", "--patch-size", "0x32x32", "-q"),
             CliRefusal, r"exit 2: error: patch_size \(--patch-size\) must be 2 or 3 positive integers", "8"),
        Case("raw-region-labels-v1", lambda ws, mp: later(load_raw_dataset, _labels_ds(ws, {"0": "background", "1": [1, 2]})),
             DatasetError, r"dataset\.json: Region-based labels .* not supported: \{'1': \[1, 2\]\}", "8"),
        Case("raw-region-labels-v2", lambda ws, mp: later(load_raw_dataset, _labels_ds(ws, {"background": 0, "tumour": [1, 2]})),
             DatasetError, r"dataset\.json: Region-based labels", "8"),
        Case("raw-region-labels-plan-cli", lambda ws, mp: cli("plan", _labels_ds(ws, {"0": "background", "1": [1, 2]})),
             CliRefusal, r"exit 2: error: .*Dataset001_P.dataset\.json: Region-based labels", "8"),
        Case("raw-dataset-json-list", lambda ws, mp: later(load_raw_dataset, _dataset_json(ws, "[1, 2]")),
             DatasetError, r"dataset\.json holds a JSON list, not an object", "8"),
        Case("raw-run-json-list-api", lambda ws, mp: later(drive, find_best(str(phantom_ds(ws)), {
            "a": str(run_folder(ws, "runA", "[1, 2]"))}, device="cpu", mirror=False)),
             SelectionError, r"runA.run\.json holds a JSON list, not a run's record", "8"),
        Case("raw-run-json-list-cli", lambda ws, mp: cli("find-best", phantom_ds(ws), run_folder(ws, "runA", "[1, 2]"), "--device", "cpu", "-q"),
             CliRefusal, r"exit 2: error: .*runA.run\.json holds a JSON list", "8"),
        Case("raw-nan-affine-write-nifti", lambda ws, mp: later(write_nifti, ws / "o.nii.gz", np.zeros((4, 5, 6), np.uint8),
                                                                {"affine": _nan_affine()}, is_label=True),
             NiftiError, r"o\.nii\.gz: the voxel-to-world matrix must be a finite 4x4 matrix; nothing was written", "8"),
        Case("raw-nan-affine-write-nrrd", lambda ws, mp: later(write_volume, ws / "o.nrrd", np.zeros((4, 5, 6), np.uint8),
                                                               {"affine": _nan_affine()}, is_label=True),
             VolumeError, r"o\.nrrd: the voxel-to-world matrix must be a finite", "8"),
        Case("raw-nan-affine-write-mha", lambda ws, mp: later(write_volume, ws / "o.mha", np.zeros((4, 5, 6), np.uint8),
                                                              {"affine": _nan_affine()}, is_label=True),
             VolumeError, r"o\.mha: the voxel-to-world matrix must be a finite", "8"),
        Case("raw-geometry-not-a-dict", lambda ws, mp: later(write_volume, ws / "o.nii.gz", np.zeros((4, 5, 6), np.uint8), [1, 2, 3]),
             VolumeError, r"the geometry must be a dict with an 'affine'", "8"),
        Case("raw-singular-affine-write", lambda ws, mp: later(write_volume, ws / "o.nii.gz", np.zeros((4, 5, 6), np.uint8),
                                                               {"affine": np.diag([1.0, 0.0, 1.0, 1.0]).tolist()}),
             VolumeError, r"singular", "8"),
        Case("raw-internal-error-cli", lambda ws, mp: _cli_internal(ws, mp, KeyError("spacing")),
             CliRefusal, r"exit 1: error: internal error \(KeyError: 'spacing'\); please report it \(--debug", "8"),
        Case("raw-memory-error-cli", lambda ws, mp: _cli_internal(ws, mp, MemoryError()),
             CliRefusal, r"exit 2: error: out of memory", "8"),
        Case("raw-debug-shows-traceback", lambda ws, mp: _cli_internal(ws, mp, KeyError("spacing"), "--debug"),
             KeyError, r"spacing", "8"),
    ]


def _text(ws, name, text):
    (ws / name).write_text(text)
    return ws / name


def _labels_ds(ws, labels):
    ds = phantom_ds(ws, n=1)
    meta = json.loads(open(os.path.join(ds, "dataset.json")).read())
    meta["labels"] = labels
    with open(os.path.join(ds, "dataset.json"), "w") as fh:
        json.dump(meta, fh)
    return ds


def _dataset_json(ws, text):
    ds = phantom_ds(ws, n=1)
    with open(os.path.join(ds, "dataset.json"), "w") as fh:
        fh.write(text)
    return ds


def _nan_affine():
    aff = np.eye(4)
    aff[0, 0] = np.nan
    return aff.tolist()


def _cli_internal(ws, mp, error, *flags):
    """A command whose engine fails with a foreign exception (a bug): one line, or a traceback with --debug."""
    def broken(*_a, **_k):
        raise error

    mp.setattr(api, "plan", broken)
    ds = phantom_ds(ws)
    return cli("plan", ds) if not flags else later(main, [*flags, "plan", str(ds)])


def _read_layers():
    from napari_medseg._reader import read_layers

    return read_layers


def _class9() -> list[Case]:
    return [
        Case("odd-evaluate-shifted-prediction", lambda ws, mp: later(evaluate_folder, *label_folders(ws, "shift"), {0: "b", 1: "x"}),
             EvaluationError, r"Case c: the prediction .*c\.nii\.gz is not on the reference's grid .*40 mm away", "9"),
        Case("odd-evaluate-flipped-prediction", lambda ws, mp: later(evaluate_folder, *label_folders(ws, "flip"), {0: "b", 1: "x"}),
             EvaluationError, r"axis 2 is flipped", "9"),
        Case("odd-evaluate-other-spacing-cli", lambda ws, mp: cli("evaluate", *label_folders(ws, "spacing"), "--json", ws / "s.json"),
             CliRefusal, r"exit 2: error: Case c: the prediction .* voxel size \(3, 1, 1\) vs the reference's \(2, 1, 1\)", "9"),
        Case("odd-values-near-1e38-predict", lambda ws, mp: accepts_huge_values(ws), None, "", "9"),
        Case("odd-values-near-1e38-normalise", lambda ws, mp: normalises_near_float32_max(), None, "", "9"),
        Case("odd-complex-normalise", lambda ws, mp: later(normalization_params, np.zeros((1, 4, 4, 4), np.complex64), _plan()),
             PreprocessingError, r"complex values", "9"),
        Case("odd-complex-write", lambda ws, mp: later(write_nifti, ws / "o.nii.gz", np.zeros((4, 5, 6), np.complex64)),
             NiftiError, r"o\.nii\.gz: cannot write voxel type complex64", "9"),
        Case("odd-output-png-cli", lambda ws, mp: cli("predict", nifti(ws, "s.nii.gz", np.zeros((16, 16, 16), np.float32)),
                                                      "-o", ws / "out.png", "-c", make_tiny_checkpoint(ws / "m.pt"), "--device", "cpu", "-q"),
             CliRefusal, r"exit 1: error: .*out\.png: unknown output format '\.png'", "9"),
        Case("odd-output-upper-PNG-cli", lambda ws, mp: cli("predict", nifti(ws, "s.nii.gz", np.zeros((16, 16, 16), np.float32)),
                                                            "-o", ws / "OUT.PNG", "-c", make_tiny_checkpoint(ws / "m.pt"), "--device", "cpu", "-q"),
             CliRefusal, r"exit 1: error: .*OUT\.PNG: unknown output format '\.png'", "9"),
        Case("odd-output-upper-NII-GZ-is-a-file", lambda ws, mp: _upper_output(ws), None, "", "9"),
        Case("odd-fill-output-tif", lambda ws, mp: cli("fill", nifti(ws, "l.nii.gz", np.ones((4, 5, 6), np.uint8)), "-o", ws / "f.TIF"),
             CliRefusal, r"exit 2: error: .*f\.TIF: unknown output format", "9"),
        Case("odd-epochs-negative-cli", lambda ws, mp: cli("train", phantom_ds(ws), "-o", ws / "run", "--epochs", "-3", "-q"),
             CliRefusal, r"exit 2: error: Training setting epochs \(--epochs\) must be an integer of at least 1, got -3", "9"),
        Case("odd-iterations-zero-cli", lambda ws, mp: cli("train", phantom_ds(ws), "-o", ws / "run", "--iterations", "0", "-q"),
             CliRefusal, r"iterations_per_epoch \(--iterations\) must be an integer of at least 1, got 0", "9"),
        Case("odd-val-fraction-2-cli", lambda ws, mp: cli("train", phantom_ds(ws), "-o", ws / "run", "--val-fraction", "2", "-q"),
             CliRefusal, r"val_fraction \(--val-fraction\) must be a finite number from 0\.0 to 0\.999, got 2\.0", "9"),
        Case("odd-val-fraction-2-api", lambda ws, mp: train_on(ws, phantom_cases(1), val_fraction=2.0),
             TrainingError, r"val_fraction .* got 2\.0", "9"),
        Case("odd-lr-nan-api", lambda ws, mp: train_on(ws, phantom_cases(1), lr=float("nan")),
             TrainingError, r"lr \(--lr\) must be a finite number", "9"),
        Case("odd-float64-beyond-float32-write", lambda ws, mp: later(write_nifti, ws / "o.nii.gz", _huge64()),
             NiftiError, r"o\.nii\.gz: 1 voxel value\(s\) \(largest magnitude 1e\+300\) exceed float32's range", "9"),
        Case("odd-float64-beyond-float32-write-nrrd", lambda ws, mp: later(write_volume, ws / "o.nrrd", _huge64(), None),
             VolumeError, r"exceed float32's range", "9"),
        Case("odd-float64-beyond-float32-read", lambda ws, mp: later(read_nifti, nifti(ws, "f64.nii.gz", _huge64())),
             NiftiError, r"f64\.nii\.gz: 1 voxel value\(s\) \(largest magnitude 1e\+300\) exceed float32's range", "9"),
        Case("odd-float64-beyond-float32-widget", lambda ws, mp: _widget_huge(), ValueError, r"Layer 'big': .* exceed float32's range", "9"),
        Case("odd-findbest-unknown-cases-api", lambda ws, mp: later(drive, find_best(str(phantom_ds(ws)), {
            "a": str(run_folder(ws, "runA", {"val_cases": ["nope_1", "nope_2"]}))}, device="cpu", mirror=False)),
             SelectionError, r"2 validation case\(s\) of the runs are not labelled cases of .*: \['nope_1', 'nope_2'\]", "9"),
        Case("odd-findbest-unknown-cases-cli", lambda ws, mp: cli("find-best", phantom_ds(ws), run_folder(ws, "runA", {"val_cases": ["nope"]}),
                                                                  "--device", "cpu", "-q", "-o", ws / "best.json"),
             CliRefusal, r"exit 2: error: 1 validation case\(s\) of the runs are not labelled", "9"),
        Case("odd-run-json-invalid-names-file", lambda ws, mp: later(drive, find_best(str(phantom_ds(ws)), {
            "a": str(run_folder(ws, "runA", "{oops"))}, device="cpu", mirror=False)),
             SelectionError, r"Cannot read .*runA.run\.json: Expecting property name", "9"),
        Case("odd-dataset-json-invalid-names-file", lambda ws, mp: later(load_raw_dataset, _dataset_json(ws, "{oops")),
             DatasetError, r"Cannot read .*Dataset001_P.dataset\.json: Expecting property name", "9"),
        Case("odd-config-json-invalid-names-file", lambda ws, mp: cli("train", phantom_ds(ws), "-o", ws / "run", "--config",
                                                                      _text(ws, "cfg.json", "{oops")),
             CliRefusal, r"exit 1: error: cannot read .*cfg\.json: Expecting property name", "9"),
    ]


def _plan():
    return Plan(configuration="3d_fullres", spacing=(1, 1, 1), patch_size=(16, 16, 16), batch_size=1,
                pool_kernels=[[2, 2, 2]], conv_kernels=[[3, 3, 3], [3, 3, 3]], normalization=["zscore"],
                num_channels=1, num_classes=2, use_mask_for_norm=[False])


def _huge64():
    data = np.zeros((4, 5, 6), np.float64)
    data[0, 0, 0] = 1e300
    return data


def _widget_huge():
    def action():
        image_cls, _, _, _, resolve = headless_layers()
        resolve([image_cls(_huge64(), name="big")]).array()
    return action


def _upper_output(ws):
    scan = nifti(ws, "s.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    ckpt = make_tiny_checkpoint(ws / "m.pt")
    (ws / "out").mkdir()
    run = cli("predict", scan, "-o", ws / "out" / "OUT.NII.GZ", "-c", ckpt, "--device", "cpu", "--no-mirror", "-q")

    def action():
        run()
        assert os.path.isfile(ws / "out" / "OUT.NII.GZ")
        assert read_nifti(ws / "out" / "OUT.NII.GZ").data.shape == (16, 16, 16)
    return action


NEW_CASES: list[Case] = [*_class4(), *_class5(), *_class6(), *_class7(), *_class8(), *_class9()]
