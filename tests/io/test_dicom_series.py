"""DICOM series in: NIfTI -> synthetic DICOM series -> volume, and the irregular series refused."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
import pytest
from io_helpers import ORIENTATIONS, make_affine, rotation, save_nifti, world_corners
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEGLosslessSV1

from napari_medseg.io import (
    VolumeError,
    is_volume_path,
    read_dicom_series,
    read_nifti,
    read_volume,
)
from napari_medseg.io._dicom_synth import write_dicom_series

RNG = np.random.default_rng(11)
SHAPE = (7, 10, 12)  # napari order (k, rows, columns)


def ct_data() -> np.ndarray:
    return RNG.integers(-1024, 3000, SHAPE).astype(np.int16)


def series(tmp_path, name="s", data=None, affine=None, **kwargs) -> str:
    folder = tmp_path / name
    data = ct_data() if data is None else data
    affine = make_affine((0.8, 0.7, 2.5), rotation(0.2, -0.1, 0.3)) if affine is None else affine
    kwargs.setdefault("modality", "CT")
    kwargs.setdefault("intercept", -1024)
    kwargs.setdefault("seed", name)
    write_dicom_series(folder, data, affine, **kwargs)
    return str(folder)


@pytest.mark.parametrize("case", sorted(ORIENTATIONS))
@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "enhanced"])
def test_nifti_to_dicom_series_round_trip(tmp_path, case, multiframe):
    """A real NIfTI file re-stored as a shuffled DICOM series reads back voxel for voxel, same world."""
    zooms, rot, flip = ORIENTATIONS[case]
    affine = make_affine(zooms, rot, flip)
    src = read_nifti(save_nifti(tmp_path / "src.nii.gz", ct_data(), affine))
    folder = series(tmp_path, "dcm", src.data, src.affine, shuffle_seed=5, multiframe=multiframe)
    vol = read_volume(folder)
    assert vol.header["format"] == "dicom" and vol.data.dtype == np.int16
    if np.linalg.det(affine[:3, :3]) > 0:
        # right-handed (RAS, LPS and oblique orderings): same array, same affine
        np.testing.assert_array_equal(vol.data, src.data)
        np.testing.assert_allclose(vol.affine, src.affine, atol=1e-4)
    else:
        # left-handed (LAS): slices come sorted along the normal, so k is reversed; every voxel
        # keeps its world position
        np.testing.assert_array_equal(vol.data, src.data[::-1])
        assert np.allclose(world_corners(vol.affine, vol.spatial_shape).mean(0),
                           world_corners(src.affine, src.spatial_shape).mean(0), atol=1e-4)
        flip_k = np.eye(4)
        flip_k[2, 2], flip_k[2, 3] = -1, SHAPE[0] - 1
        np.testing.assert_allclose(vol.affine, src.affine @ flip_k, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, np.abs(zooms)[::-1], rtol=1e-6)
    instances = vol.header["dicom"]["instances"]
    assert len({i["sop_instance_uid"] for i in instances}) == (1 if multiframe else SHAPE[0])
    if multiframe:
        assert len({i["file"] for i in instances}) == 1 and sorted(i["frame"] for i in instances) == list(range(7))


def test_rescale_and_header(tmp_path):
    data = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 50).astype(np.float32) * 0.5 + 3.0
    folder = series(tmp_path, "mr", data, modality="MR", slope=0.5, intercept=3.0, description="T1 axial")
    vol = read_volume(folder)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data)
    info = vol.header["dicom"]
    assert info["series_description"] == "T1 axial" and info["modality"] == "MR"
    for key in ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid"):
        assert info[key].startswith("2.25."), key
    assert info["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    assert info["patient"]["PatientID"] == "SYNTH001"
    assert all(os.path.isfile(i["file"]) for i in info["instances"])
    # per-slice rescale (PET-like) is applied slice by slice
    slopes = np.linspace(0.5, 2.0, SHAPE[0])
    stored = RNG.integers(0, 1000, SHAPE)
    folder = series(tmp_path, "pet", stored * slopes[:, None, None], modality="MR", slope=slopes, intercept=0.0)
    np.testing.assert_allclose(read_volume(folder).data, stored * slopes[:, None, None], rtol=1e-6)


def test_ct_hounsfield_units(tmp_path):
    hu = ct_data()
    folder = series(tmp_path, "ct", hu, intercept=-1024, stored_dtype=np.uint16)
    vol = read_volume(folder)
    assert vol.data.dtype == np.int16 and vol.data.min() < 0
    np.testing.assert_array_equal(vol.data, hu)


def test_single_file_stands_for_its_series_and_junk_is_ignored(tmp_path):
    folder = series(tmp_path, "one", shuffle_seed=1)
    (tmp_path / "one" / "notes.txt").write_text("not DICOM")
    (tmp_path / "one" / "DICOMDIR.bak").write_bytes(bytes(300))
    whole = read_volume(folder)
    some_file = sorted(os.listdir(folder))[3]
    assert some_file.endswith(".dcm")
    again = read_volume(os.path.join(folder, some_file))
    np.testing.assert_array_equal(again.data, whole.data)
    np.testing.assert_allclose(again.affine, whole.affine)
    assert is_volume_path(folder) and is_volume_path(os.path.join(folder, some_file))
    assert not is_volume_path(tmp_path / "one" / "notes.txt")


def test_several_series_in_one_folder(tmp_path):
    root = tmp_path / "study"
    series(root, "a", description="T1 axial", series_number=2)
    series(root, "b", description="T2 coronal", series_number=3,
           affine=make_affine((0.9, 0.9, 3.0), rotation(np.pi / 2, 0, 0)))
    with pytest.raises(VolumeError, match="holds 2 series") as err:
        read_volume(root)
    assert "'T1 axial'" in str(err.value) and "'T2 coronal'" in str(err.value)
    vols = read_dicom_series(root)
    assert sorted(v.header["dicom"]["series_description"] for v in vols) == ["T1 axial", "T2 coronal"]


def test_localiser_skipped(tmp_path):
    folder = series(tmp_path, "loc")
    scout = pydicom.dcmread(os.path.join(folder, "slice_0000.dcm"))
    scout.SOPInstanceUID = "2.25.1234"
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    scout.save_as(os.path.join(folder, "scout.dcm"))
    vol = read_volume(folder)
    assert vol.data.shape == SHAPE
    assert any("localiser" in s for s in vol.header["dicom"]["skipped"])


def test_missing_slice_is_refused_and_located(tmp_path):
    folder = series(tmp_path, "gap")
    victim = pydicom.dcmread(os.path.join(folder, "slice_0003.dcm"), stop_before_pixels=True)
    os.remove(os.path.join(folder, "slice_0003.dcm"))
    with pytest.raises(VolumeError, match="missing slices") as err:
        read_volume(folder)
    text = str(err.value)
    assert "slice_0002.dcm" in text and "slice_0004.dcm" in text and "1 slice(s) missing" in text
    assert "5.000 mm gap" in text and "spacing is 2.500 mm" in text
    assert victim.InstanceNumber == 4


def test_uneven_spacing_is_refused(tmp_path):
    folder = series(tmp_path, "uneven", affine=make_affine((0.8, 0.7, 2.0)))
    path = os.path.join(folder, "slice_0004.dcm")
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [float(ds.ImagePositionPatient[2]) + 0.7]
    ds.save_as(path)
    with pytest.raises(VolumeError, match="uneven slice spacing") as err:
        read_volume(folder)
    assert "slice_0004.dcm" in str(err.value) or "slice_0005.dcm" in str(err.value)


@pytest.mark.parametrize("tilt_deg", [12.0, 0.5])
def test_gantry_tilt_is_refused(tmp_path, tilt_deg):
    """Slices whose origins drift in-plane (the stack leans) are refused with the angle."""
    affine = make_affine((0.7, 0.7, 2.5))
    affine[1, 2] = 2.5 * np.tan(np.radians(tilt_deg))  # each slice shifts along y: a tilted gantry
    folder = series(tmp_path, "tilt", affine=affine)
    with pytest.raises(VolumeError, match="not stacked perpendicular") as err:
        read_volume(folder)
    assert f"{tilt_deg:.2f} degrees" in str(err.value) and "gantry tilt" in str(err.value)


def test_mixed_orientations_and_duplicates_are_refused(tmp_path):
    folder = series(tmp_path, "mixed")
    path = os.path.join(folder, "slice_0002.dcm")
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(path)
    with pytest.raises(VolumeError, match="mixed slice orientations"):
        read_volume(folder)
    dup = series(tmp_path, "dup")
    ds = pydicom.dcmread(os.path.join(dup, "slice_0002.dcm"))
    ds.SOPInstanceUID = "2.25.99"
    ds.save_as(os.path.join(dup, "echo2.dcm"))
    with pytest.raises(VolumeError, match="hold more than one slice"):
        read_volume(dup)


def test_bad_series_skipped_with_a_warning_when_others_are_good(tmp_path):
    root = tmp_path / "study"
    series(root, "good", description="good")
    bad = series(root, "bad", description="bad")
    os.remove(os.path.join(bad, "slice_0003.dcm"))
    with pytest.warns(UserWarning, match="missing slices"):
        vols = read_dicom_series(root)
    assert [v.header["dicom"]["series_description"] for v in vols] == ["good"]
    with pytest.raises(VolumeError, match="missing slices"):
        read_dicom_series(root, strict=True)
    shutil.rmtree(root / "good")
    with pytest.raises(VolumeError, match="no DICOM series could be read.*missing slices"):
        read_dicom_series(root)


def _compress(folder: str, ts: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = encapsulate([b"\xff\xd8not really compressed\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)


def test_compressed_without_decoder_names_the_package(tmp_path):
    from pydicom.pixels import get_decoder

    if get_decoder(UID(JPEGLosslessSV1)).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    folder = series(tmp_path, "jpeg")
    _compress(folder, JPEGLosslessSV1)
    with pytest.raises(VolumeError, match="no installed decoder") as err:
        read_volume(folder)
    assert "pip install python-gdcm" in str(err.value)
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in str(err.value)
    other = series(tmp_path, "j2k-multi")
    _compress(other, "1.2.840.10008.1.2.4.92")  # JPEG 2000 Part 2: no pydicom decoder exists
    with pytest.raises(VolumeError, match="cannot decode"):
        read_volume(other)


def test_no_dicom_and_corrupt_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no DICOM files"):
        read_volume(tmp_path / "empty")
    folder = series(tmp_path, "corrupt")
    path = os.path.join(folder, "slice_0001.dcm")
    blob = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(blob[: len(blob) - 100])  # truncated pixel data
    with pytest.raises(VolumeError, match="slice_0001.dcm.*could not be decoded"):
        read_volume(folder)
    with open(path, "wb") as fh:
        fh.write(blob[:128] + b"DICM" + RNG.bytes(200))
    with pytest.raises(VolumeError, match="missing slices") as err:  # the garbage file leaves a gap...
        read_volume(folder)
    assert "1 file(s) could not be read" in str(err.value) and "slice_0001.dcm" in str(err.value)  # ...and is named


def test_rtstruct_file_is_named_not_misread(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "2.25.1"
    ds.Modality, ds.SeriesInstanceUID = "RTSTRUCT", "2.25.2"
    ds.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    with pytest.raises(VolumeError, match="RTSTRUCT object holds no image"):
        read_volume(tmp_path / "rt.dcm")
    folder = series(tmp_path, "with_rt")
    shutil.copy(tmp_path / "rt.dcm", os.path.join(folder, "rt.dcm"))
    assert read_volume(folder).data.shape == SHAPE  # beside a series it is skipped
