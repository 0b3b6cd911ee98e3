"""Bad input: corrupt, odd or unsupported files, unwritable targets, atomic writes."""

from __future__ import annotations

import gzip
import logging
import os

import nibabel as nib
import numpy as np
import pytest

from napari_medseg._reader import napari_get_reader, read_nifti_layers
from napari_medseg.io import NiftiError, read_nifti, write_nifti
from napari_medseg.io import nifti as nifti_module


def good_file(folder, name="ok.nii.gz", shape=(20, 18, 16)) -> str:
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = str(folder / name)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 2.0, 1.0])), path)
    return path


def leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".tmp" in n]


# ------------------------------------------------------------------------------------ reader hook
def test_get_reader_accepts_only_existing_nifti(tmp_path):
    ok = good_file(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "vol.nii.gz.bak").write_bytes(b"")
    (tmp_path / "sub.nii").mkdir()
    assert napari_get_reader(ok) is read_nifti_layers
    assert napari_get_reader([ok, ok]) is read_nifti_layers
    for bad in (
        str(tmp_path / "notes.txt"),
        str(tmp_path / "vol.nii.gz.bak"),
        str(tmp_path / "sub.nii"),  # a folder named like a file
        str(tmp_path),
        str(tmp_path / "missing.nii.gz"),
        [ok, str(tmp_path / "notes.txt")],
        [],
        None,
        12,
        object(),
    ):
        assert napari_get_reader(bad) is None, bad


def test_get_reader_accepts_every_volume_format(tmp_path):
    import nrrd
    import SimpleITK as sitk

    from napari_medseg._reader import read_layers
    from napari_medseg.io._dicom_synth import write_dicom_series

    data = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    nrrd.write(str(tmp_path / "a.nrrd"), data)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "a.mha"))
    files = write_dicom_series(tmp_path / "dicom", data * 10, np.eye(4), stored_dtype=np.int16, slope=1)
    bare = tmp_path / "dicom" / "IM0001"  # DICOM files often have no extension: the magic tells
    os.rename(files[0], bare)
    (tmp_path / "no_dicom").mkdir()
    (tmp_path / "no_dicom" / "x.txt").write_text("x")
    for ok in ("a.nrrd", "a.mha", "dicom", "dicom/IM0001", "dicom/slice_0001.dcm"):
        assert napari_get_reader(str(tmp_path / ok)) is read_layers, ok
    assert napari_get_reader([str(tmp_path / "a.nrrd"), str(tmp_path / "dicom")]) is read_layers
    assert napari_get_reader(str(tmp_path / "no_dicom")) is None
    assert napari_get_reader(str(tmp_path / "no_dicom" / "x.txt")) is None
    layers = read_layers([str(tmp_path / "dicom" / "slice_0001.dcm"), str(tmp_path / "dicom" / "slice_0002.dcm")])
    assert len(layers) == 1 and layers[0][0].shape == (2, 5, 6)  # the files given, grouped into their series
    assert read_layers(str(bare))[0][0].shape == (4, 5, 6)  # one file stands for its whole series


def test_non_nifti_file(tmp_path):
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert napari_get_reader(str(png)) is None
    with pytest.raises(NiftiError, match="not a NIfTI file") as err:
        read_nifti(png)
    assert "picture.png" in str(err.value)
    with pytest.raises(NiftiError, match="no such file"):
        read_nifti(tmp_path / "absent.nii.gz")


@pytest.mark.parametrize("name", ["garbage.nii.gz", "garbage.nii"])
def test_garbage_bytes_with_nifti_name(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(1).bytes(4000))
    reader = napari_get_reader(str(path))
    assert reader is not None  # the hook only looks at the name; reading gives the clear error
    with pytest.raises(NiftiError, match="not a readable NIfTI") as err:
        reader(str(path))
    assert name in str(err.value)


@pytest.mark.parametrize(("name", "keep", "message"), [
    ("trunc.nii.gz", 0.5, "truncated or corrupt"),
    ("trunc_header.nii.gz", 60, "not a readable NIfTI"),
    ("trunc.nii", 0.5, "truncated"),
])
def test_truncated_files(tmp_path, name, keep, message):
    src = good_file(tmp_path, "full" + name[name.index("."):])
    blob = open(src, "rb").read()
    path = tmp_path / name
    path.write_bytes(blob[: int(len(blob) * keep) if keep < 1 else keep])
    with pytest.raises(NiftiError, match=message) as err:
        read_nifti(path)
    assert name in str(err.value)


def test_5d_volumes(tmp_path):
    bad = tmp_path / "five.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2, 3), np.float32), np.eye(4)), bad)
    with pytest.raises(NiftiError, match="5D"):
        read_nifti(bad)
    vec = tmp_path / "vector.nii.gz"  # (i, j, k, 1, C): the NIfTI vector layout -> C channels
    data = np.random.default_rng(2).normal(size=(4, 5, 6, 1, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), vec)
    vol = read_nifti(vec)
    assert vol.data.shape == (3, 6, 5, 4) and vol.channel_axis == 0
    np.testing.assert_array_equal(vol.data[2], data[:, :, :, 0, 2].T)
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 1, 1), np.float32), np.eye(4)), single)
    assert read_nifti(single).data.shape == (6, 5, 4)
    six = tmp_path / "six.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 1, 1, 2), np.float32), np.eye(4)), six)
    with pytest.raises(NiftiError, match="6D"):
        read_nifti(six)


def test_zero_size_dimension(tmp_path):
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 5), np.float32), np.eye(4)), path)
    with pytest.raises(NiftiError, match="size zero"):
        read_nifti(path)


def test_huge_header_refused_before_allocation(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((3000, 3000, 3000))
    hdr.set_data_dtype(np.float32)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as fh:
        hdr.write_to(fh)
        fh.write(bytes(64))
    with pytest.raises(NiftiError, match="voxels"):
        read_nifti(path)


def test_gz_too_small_for_its_header_refused_before_allocation(tmp_path):
    # 1e9 voxels is under the voxel limit, but a few hundred compressed bytes cannot hold them
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1000, 1000, 1000))
    hdr.set_data_dtype(np.uint8)
    path = tmp_path / "tiny_but_huge.nii.gz"
    with gzip.open(path, "wb") as fh:
        hdr.write_to(fh)
        fh.write(bytes(64))
    with pytest.raises(NiftiError, match="cannot hold"):
        read_nifti(path)
    # a real, highly compressible volume still passes the check
    zeros = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((200, 200, 200), np.uint8), np.eye(4)), zeros)
    assert read_nifti(zeros).data.shape == (200, 200, 200)


@pytest.mark.parametrize("value", [0.0, np.nan, np.inf])
def test_bad_spacing(tmp_path, value):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    img.header["pixdim"][2] = value
    path = tmp_path / "spacing.nii.gz"
    nib.save(img, path)
    with pytest.raises(NiftiError, match="spacing"):
        read_nifti(path)


def test_nan_values_are_kept_and_reported(tmp_path, caplog):
    data = np.random.default_rng(3).normal(size=(5, 6, 7)).astype(np.float32)
    data[1, 2, 3] = data[4, 5, 6] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with caplog.at_level(logging.WARNING, logger="napari_medseg"):
        vol = read_nifti(path)
    assert np.isnan(vol.data).sum() == 2 and np.isnan(vol.data[3, 2, 1])
    assert any("2 of 210 voxels are NaN" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------- writing
def test_unwritable_targets(tmp_path):
    data = np.zeros((3, 4, 5), np.float32)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(NiftiError, match="not a folder"):
        write_nifti(afile / "out.nii.gz", data)
    with pytest.raises(NiftiError, match="does not exist"):
        write_nifti(tmp_path / "no" / "such" / "out.nii.gz", data)
    with pytest.raises(NiftiError, match="cannot write"):
        write_nifti("/proc/medseg_cannot_write_here.nii.gz", data)
    with pytest.raises(NiftiError, match=".nii or .nii.gz"):
        write_nifti(tmp_path / "out.png", data)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(NiftiError, match="cannot write"):
            write_nifti(folder / "out.nii.gz", np.zeros((2, 2, 2), np.float32))
    finally:
        folder.chmod(0o700)


def test_unconvertible_data_leaves_previous_file(tmp_path):
    target = tmp_path / "keep.nii.gz"
    write_nifti(target, np.ones((3, 4, 5), np.float32))
    before = target.read_bytes()
    with pytest.raises(NiftiError, match="voxel type"):
        write_nifti(target, np.full((3, 4, 5), 1 + 2j))
    with pytest.raises(NiftiError, match="negative"):
        write_nifti(target, -np.ones((3, 4, 5), np.int16), is_label=True)
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_failed_replace_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "keep.nii.gz"
    write_nifti(target, np.ones((3, 4, 5), np.float32))
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nifti_module.os, "replace", broken_replace)
    with pytest.raises(NiftiError, match="No space left"):
        write_nifti(target, np.zeros((3, 4, 5), np.float32))
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_interrupted_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "keep.nii"
    write_nifti(target, np.ones((3, 4, 5), np.float32))
    before = target.read_bytes()
    real_save = nifti_module.nib.save

    def half_save(img, filename):
        real_save(img, filename)
        with open(filename, "r+b") as fh:
            fh.truncate(100)  # a half-written temp file
        raise KeyboardInterrupt

    monkeypatch.setattr(nifti_module.nib, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        write_nifti(target, np.zeros((3, 4, 5), np.float32))
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_written_files_have_ordinary_permissions(tmp_path):
    out = write_nifti(tmp_path / "perm.nii.gz", np.zeros((2, 2, 2), np.float32))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
