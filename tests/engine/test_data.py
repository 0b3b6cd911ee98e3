"""Raw datasets, preprocessed cases, caching and patch sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medseg.engine.data import (
    Case,
    DatasetError,
    PatchSampler,
    case_from_arrays,
    iter_preprocess_dataset,
    load_case,
    load_raw_dataset,
    verify_dataset,
)
from napari_medseg.engine.data import cases as cases_mod
from napari_medseg.engine.jobs import collect, drive
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.preprocessing import CaseProperties
from napari_medseg.io.phantom import write_phantom_dataset

SHAPE = (10, 16, 16)


def make_plan(spacing=(2.0, 1.0, 1.0), patch=(8, 16, 16), num_classes=2) -> Plan:
    return Plan(
        configuration="3d_fullres" if len(patch) == 3 else "2d", spacing=tuple(spacing),
        patch_size=tuple(patch), batch_size=2, pool_kernels=[], conv_kernels=[],
        normalization=["zscore"], num_classes=num_classes,
    )


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    return write_phantom_dataset(folder, num_cases=3, shape=SHAPE, num_test=1)


def save_nifti(path, arr, spacing=(1.0, 1.0, 1.0)):
    zooms = list(spacing)[::-1]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(arr).T), np.diag(zooms + [1.0])), str(path))


def write_json(folder, meta):
    with open(os.path.join(folder, "dataset.json"), "w") as fh:
        json.dump(meta, fh)


def small_dataset(tmp_path, meta, cases=("a", "b"), channels=1):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for name in cases:
        for c in range(channels):
            save_nifti(tmp_path / "imagesTr" / f"{name}_{c:04d}.nii.gz", np.ones((4, 5, 6), np.float32))
        save_nifti(tmp_path / "labelsTr" / f"{name}.nii.gz", np.zeros((4, 5, 6), np.uint8))
    write_json(tmp_path, meta)
    return tmp_path


# ------------------------------------------------------------------------------------------ raw
def test_load_raw_dataset_v2(dataset_dir):
    raw = load_raw_dataset(dataset_dir)
    assert [c.name for c in raw.cases] == ["phantom_000", "phantom_001", "phantom_002"]
    assert raw.labels == {0: "background", 1: "ellipsoid_1"}
    assert raw.channel_names == {0: "MRI"} and raw.modality == ("MRI",)
    assert raw.num_channels == 1 and raw.num_classes == 2
    assert raw.cases[0].image_paths[0].endswith("imagesTr/phantom_000_0000.nii.gz")
    assert raw.cases[0].label_path.endswith("labelsTr/phantom_000.nii.gz")
    assert [c.name for c in raw.test_images] == ["phantom_003"]
    assert raw.test_images[0].label_path.endswith("labelsTs/phantom_003.nii.gz")


def test_load_raw_dataset_v1_multichannel(tmp_path):
    meta = {"modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "a", "2": "b"}}
    small_dataset(tmp_path, meta, channels=2)
    raw = load_raw_dataset(tmp_path)
    assert raw.channel_names == {0: "T1", 1: "T2"} and raw.num_channels == 2
    assert raw.labels == {0: "background", 1: "a", 2: "b"} and raw.num_classes == 3
    assert len(raw.cases[0].image_paths) == 2 and raw.test_images == []


def test_decathlon_layout_with_4d_images(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    img = np.stack([np.full((4, 5, 6), 1.0, np.float32), np.full((4, 5, 6), 2.0, np.float32)])  # (C,z,y,x)
    nib.save(nib.Nifti1Image(np.transpose(img, (3, 2, 1, 0)).copy(), np.eye(4)),
             str(tmp_path / "imagesTr" / "brain_001.nii.gz"))
    save_nifti(tmp_path / "labelsTr" / "brain_001.nii.gz", np.ones((4, 5, 6), np.uint8))
    write_json(tmp_path, {"modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "x"}})
    raw = load_raw_dataset(tmp_path)
    assert [c.name for c in raw.cases] == ["brain_001"] and len(raw.cases[0].image_paths) == 1
    plan = make_plan((1, 1, 1))
    plan.normalization, plan.num_channels = ["none", "none"], 2
    case = load_case(raw.cases[0], plan)
    assert case.image.shape == (2, 4, 5, 6)
    np.testing.assert_array_equal(case.image[1], 2.0)


def test_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="not an nnU-Net raw dataset"):
        load_raw_dataset(tmp_path)
    meta = {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "x": 1}}
    small_dataset(tmp_path, meta, channels=1)
    with pytest.raises(DatasetError, match="missing channel file.*a_0001"):
        load_raw_dataset(tmp_path)
    write_json(tmp_path, {"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}})
    save_nifti(tmp_path / "labelsTr" / "zzz.nii.gz", np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(DatasetError, match="has no image"):
        load_raw_dataset(tmp_path)
    os.remove(tmp_path / "labelsTr" / "zzz.nii.gz")
    write_json(tmp_path, {"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 2}})
    with pytest.raises(DatasetError, match="consecutive"):
        load_raw_dataset(tmp_path)


def test_label_values_not_in_dataset_json(tmp_path):
    small_dataset(tmp_path, {"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}})
    bad = np.zeros((4, 5, 6), np.uint8)
    bad[1, 1, 1] = 3
    save_nifti(tmp_path / "labelsTr" / "b.nii.gz", bad)
    raw = load_raw_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"values \[3\]"):
        verify_dataset(raw)
    with pytest.raises(DatasetError, match=r"values \[3\]"):
        load_case(raw.cases[1], make_plan((1, 1, 1)), label_values=raw.labels)


# -------------------------------------------------------------------------------------- loading
def test_load_case_geometry(dataset_dir):
    raw = load_raw_dataset(dataset_dir)
    plan = make_plan(spacing=(2.0, 2.0, 2.0))
    case = load_case(raw.cases[0], plan)
    assert case.image.dtype == np.float32 and case.label.dtype == np.int16
    assert case.properties.original_shape == SHAPE
    assert case.properties.original_spacing == pytest.approx((2.0, 1.0, 1.0))
    crop = case.properties.shape_after_crop
    assert case.image.shape == (1, crop[0], round(crop[1] / 2), round(crop[2] / 2))
    assert set(np.unique(case.label)) <= {0, 1} and case.label.any()


def test_iter_preprocess_dataset_cache(dataset_dir, tmp_path, monkeypatch):
    raw = load_raw_dataset(dataset_dir)
    plan = make_plan()
    events, cases = collect(iter_preprocess_dataset(raw, plan, cache_dir=tmp_path / "cache"))
    assert [e.current for e in events] == [1, 2, 3] and events[-1].total == 3
    assert sorted(os.listdir(tmp_path / "cache"))[:3] == ["phantom_000.json", "phantom_000_image.npy",
                                                         "phantom_000_label.npy"]

    def boom(*a, **k):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(cases_mod, "load_case", boom)
    again = drive(iter_preprocess_dataset(raw, plan, cache_dir=tmp_path / "cache"))
    for a, b in zip(cases, again):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert a.properties == b.properties
    # another plan must not reuse the cache
    with pytest.raises(AssertionError, match="cache"):
        drive(iter_preprocess_dataset(raw, make_plan(spacing=(3.0, 1.0, 1.0)), cache_dir=tmp_path / "cache"))


def test_case_from_arrays():
    img = np.random.default_rng(0).normal(size=(6, 8, 8)).astype(np.float32)
    lab = (img > 1).astype(np.uint8)
    case = case_from_arrays(img, lab, (1.0, 1.0, 1.0), make_plan((1, 1, 1)), name="layer")
    assert case.name == "layer" and case.image.shape == (1, 6, 8, 8)
    np.testing.assert_array_equal(case.label, lab)


# -------------------------------------------------------------------------------------- sampling
def synthetic_case(shape=(12, 20, 20), fg_at=(6, 10, 10), name="c", channels=1, seed=0) -> Case:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int16)
    label[fg_at] = 1
    image = rng.normal(size=(channels, *shape)).astype(np.float32)
    props = CaseProperties(shape, (1.0,) * 3, [[0, s] for s in shape], shape, shape, (1.0,) * 3)
    return Case(name, image, label, props)


def test_sampler_shapes_and_determinism():
    cases = [synthetic_case(seed=i, name=str(i)) for i in range(3)]
    s1 = PatchSampler(cases, (8, 8, 8), batch_size=3, seed=5)
    s2 = PatchSampler(cases, (8, 8, 8), batch_size=3, seed=5)
    s3 = PatchSampler(cases, (8, 8, 8), batch_size=3, seed=6)
    for _ in range(3):
        (x1, y1), (x2, y2), (x3, _) = s1.sample(), s2.sample(), s3.sample()
        assert x1.shape == (3, 1, 8, 8, 8) and x1.dtype == torch.float32
        assert y1.shape == (3, 1, 8, 8, 8) and y1.dtype == torch.int64
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_foreground_oversampling():
    cases = [synthetic_case(seed=i, name=str(i)) for i in range(2)]  # one foreground voxel each
    sampler = PatchSampler(cases, (4, 4, 4), batch_size=6, oversample_foreground=0.33, seed=0)
    assert sampler.num_forced == 2
    random_hits = 0
    for _ in range(20):
        _, y = sampler.sample()
        has_fg = (y == 1).flatten(1).any(1)
        assert has_fg[-2:].all()  # the last round(6 * 0.33) = 2 samples are forced
        random_hits += int(has_fg[:4].sum())
    assert random_hits < 40  # random 4^3 crops of a 12x20x20 case rarely hit one voxel
    always = PatchSampler(cases, (4, 4, 4), batch_size=4, oversample_foreground=1.0, seed=1)
    assert all((always.sample()[1] == 1).flatten(1).any(1).all() for _ in range(5))


def test_forced_voxel_in_central_window():
    case = synthetic_case(shape=(20, 20, 20), fg_at=(10, 10, 10))
    sampler = PatchSampler([case], (12, 12, 12), 2, oversample_foreground=1.0, seed=0,
                           final_patch_size=(4, 4, 4))
    for _ in range(10):
        _, y = sampler.sample()
        assert (y[:, 0, 4:8, 4:8, 4:8] == 1).flatten(1).any(1).all()


def test_padding_small_case_and_ignore_label():
    case = synthetic_case(shape=(4, 6, 6), fg_at=(1, 2, 2))
    case.label[0] = 2
    for ignore, pad in ((None, 0), (7, 7)):
        sampler = PatchSampler([case], (8, 10, 10), 2, seed=0, ignore_label=ignore)
        x, y = sampler.sample()
        assert x.shape == (2, 1, 8, 10, 10)
        # the case is centred: 2 voxels of padding each side along every axis
        np.testing.assert_array_equal(x[0, :, 2:6, 2:8, 2:8].numpy(), case.image)
        np.testing.assert_array_equal(y[0, 0, 2:6, 2:8, 2:8].numpy(), case.label)
        assert (x[0, :, :2] == 0).all() and (y[0, 0, :2] == pad).all() and (y[0, 0, :, :, -2:] == pad).all()


def test_2d_sampling_from_3d_cases():
    cases = [synthetic_case(channels=2)]
    sampler = PatchSampler(cases, (8, 8), batch_size=4, oversample_foreground=0.5, seed=0)
    x, y = sampler.sample()
    assert x.shape == (4, 2, 8, 8) and y.shape == (4, 1, 8, 8)
    assert (y[-2:] == 1).flatten(1).any(1).all()


def test_sampler_errors():
    case = synthetic_case()
    with pytest.raises(ValueError, match="labelled"):
        PatchSampler([Case("x", case.image, None, case.properties)], (4, 4, 4), 2)
    with pytest.raises(ValueError, match="patch_size"):
        PatchSampler([case], (4,), 2)
    with pytest.raises(ValueError):
        PatchSampler([], (4, 4, 4), 2)


def test_compute_modules_do_not_import_qt():
    code = (
        "import sys\n"
        "import napari_medseg.engine.preprocessing.preprocess, napari_medseg.engine.preprocessing.resampling\n"
        "import napari_medseg.engine.data\n"
        "import napari_medseg.engine.training.losses, napari_medseg.engine.evaluation.metrics\n"
        "bad = [m for m in ('qtpy', 'napari', 'PyQt5') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
