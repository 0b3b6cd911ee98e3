"""DICOM-SEG out and in: labels -> DICOM-SEG (highdicom) -> labels, identical and on the same grid."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pydicom
import pytest
from io_helpers import make_affine, rotation, save_nifti

from napari_medseg.io import (
    VolumeError,
    geometry_from_volume,
    read_dicom_seg,
    read_dicom_series,
    read_nifti,
    read_volume,
    write_volume,
)
from napari_medseg.io._dicom_synth import write_dicom_series

SHAPE = (9, 12, 14)
AFFINE = make_affine((0.8, 0.75, 2.5), rotation(0.25, -0.15, 0.4), flip=(-1, -1, 1))
NAMES = {0: "background", 1: "liver", 2: "spleen", 5: "left kidney"}


def labels() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 3:8, 4:10] = 1
    lab[4:7, 6:10, 2:6] = 2  # overlaps 1's box: 2 wins there (a label map has one value per voxel)
    lab[6, 1:3, 11:13] = 5  # values 3 and 4 absent
    return lab  # slices 0, 1, 7, 8 are empty: the grid must still come back whole


@pytest.fixture
def source(tmp_path):
    data = np.random.default_rng(3).integers(-200, 300, SHAPE).astype(np.int16)
    folder = tmp_path / "ct"
    write_dicom_series(folder, data, AFFINE, modality="CT", intercept=-1024, shuffle_seed=2, seed="seg-test")
    return read_volume(folder)


def test_labels_round_trip_same_grid(tmp_path, source):
    lab = labels()
    out = write_volume(tmp_path / "seg.dcm", lab, geometry_from_volume(source), is_label=True, label_names=NAMES)
    back = read_volume(out)
    assert back.data.shape == SHAPE
    np.testing.assert_array_equal(back.data, lab)
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-6)
    assert back.spacing == pytest.approx(source.spacing)
    assert back.header["label_names"] == {"1": "liver", "2": "spleen", "3": "label 3", "4": "label 4",
                                          "5": "left kidney"}
    # the file is a DICOM Segmentation that references the source series
    ds = pydicom.dcmread(out)
    info = source.header["dicom"]
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == info["study_instance_uid"]
    assert ds.FrameOfReferenceUID == info["frame_of_reference_uid"]
    assert ds.PatientID == info["patient"]["PatientID"]
    (ref,) = ds.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == info["series_instance_uid"]
    assert [r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence] == [
        i["sop_instance_uid"] for i in info["instances"]]
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "spleen", "label 3", "label 4", "left kidney"]
    assert int(ds.NumberOfFrames) == sum(np.any(lab == v, axis=(1, 2)).sum() for v in (1, 2, 5))  # empty frames omitted
    assert ds.SeriesInstanceUID != info["series_instance_uid"]
    # the SEG read back can be saved as DICOM-SEG again (its geometry keeps the references)
    again = read_volume(write_volume(tmp_path / "again.dcm", back.data, back.header, is_label=True))
    np.testing.assert_array_equal(again.data, lab)
    np.testing.assert_allclose(again.affine, source.affine, atol=1e-6)


def test_source_files_gone_references_rebuilt_from_uids(tmp_path, source):
    geometry = json.loads(json.dumps(geometry_from_volume(source)))  # what a napari layer keeps
    shutil.rmtree(tmp_path / "ct")
    out = write_volume(tmp_path / "seg.dcm", labels(), geometry, is_label=True, label_names=NAMES)
    back = read_volume(out)
    np.testing.assert_array_equal(back.data, labels())
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-6)
    ds = pydicom.dcmread(out)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.header["dicom"]["series_instance_uid"]
    assert ds.PatientName == "Synthetic^Phantom"


def test_folder_with_series_and_seg(tmp_path, source):
    write_volume(tmp_path / "ct" / "seg.dcm", labels(), source, is_label=True, label_names=NAMES)
    image, seg = read_dicom_series(tmp_path / "ct")
    assert "seg" not in image.header["dicom"] and "seg" in seg.header["dicom"]
    np.testing.assert_array_equal(seg.data, labels())
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-6)
    assert seg.header["dicom"]["instances"][0]["file"] == image.header["dicom"]["instances"][0]["file"]


def test_enhanced_multiframe_source(tmp_path):
    data = np.random.default_rng(4).integers(0, 500, SHAPE).astype(np.int16)
    folder = tmp_path / "mf"
    write_dicom_series(folder, data, AFFINE, modality="MR", multiframe=True, shuffle_seed=7, seed="mf")
    image = read_volume(folder)
    write_volume(folder / "seg.dcm", labels(), image, is_label=True)
    _, seg = read_dicom_series(folder)  # beside its series: the exact grid
    np.testing.assert_array_equal(seg.data, labels())
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-6)
    alone = read_dicom_seg(folder / "seg.dcm")  # alone: the grid spans the frames, world positions kept
    k0 = int(np.nonzero(labels().any(axis=(1, 2)))[0][0])
    np.testing.assert_array_equal(alone.data, labels()[k0:k0 + alone.data.shape[0]])
    shifted = image.affine.copy()
    shifted[:3, 3] = image.affine[:3, :3] @ [0, 0, k0] + image.affine[:3, 3]
    np.testing.assert_allclose(alone.affine, shifted, atol=1e-6)


def test_empty_labels_and_label_values(tmp_path, source):
    empty = np.zeros(SHAPE, np.uint8)
    back = read_volume(write_volume(tmp_path / "empty.dcm", empty, source, is_label=True))
    np.testing.assert_array_equal(back.data, empty)
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-6)
    big = labels().astype(np.uint16)
    big[big == 5] = 300
    back = read_volume(write_volume(tmp_path / "big.dcm", big, source, is_label=True))
    np.testing.assert_array_equal(back.data, big)


def test_refusals(tmp_path, source):
    nifti = read_nifti(save_nifti(tmp_path / "x.nii.gz", np.zeros(SHAPE, np.float32), AFFINE))
    with pytest.raises(VolumeError, match="grid of a DICOM series.*from nifti1.*nii.gz"):
        write_volume(tmp_path / "a.dcm", labels(), nifti, is_label=True)
    with pytest.raises(VolumeError, match="only label maps"):
        write_volume(tmp_path / "b.dcm", labels(), source, is_label=False)
    with pytest.raises(VolumeError, match="not on the source series' grid"):
        write_volume(tmp_path / "c.dcm", labels()[1:], source, is_label=True)
    with pytest.raises(VolumeError, match="negative"):
        write_volume(tmp_path / "d.dcm", -labels().astype(np.int16), source, is_label=True)
    with pytest.raises(VolumeError, match="not a DICOM Segmentation"):
        read_dicom_seg(os.path.join(tmp_path, "ct", sorted(os.listdir(tmp_path / "ct"))[0]))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".dcm") or ".tmp" in n]


def test_failed_write_keeps_previous_file(tmp_path, source, monkeypatch):
    target = tmp_path / "keep.dcm"
    write_volume(target, labels(), source, is_label=True)
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(VolumeError, match="No space left"):
        write_volume(target, np.zeros(SHAPE, np.uint8), source, is_label=True)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [n for n in os.listdir(tmp_path) if ".tmp" in n] == []
