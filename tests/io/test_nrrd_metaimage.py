"""NRRD and MetaImage round trips with full geometry, on files written by pynrrd and SimpleITK."""

from __future__ import annotations

import os

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from io_helpers import make_affine, rotation, save_nifti, world_corners

from napari_medseg.io import (
    Volume,
    VolumeError,
    read_nifti,
    read_volume,
    write_volume,
)
from napari_medseg.io._dicom_synth import write_dicom_series

RNG = np.random.default_rng(5)
DATA = RNG.normal(50, 10, (6, 7, 8)).astype(np.float32)  # napari order (k, j, i)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_dirs() -> np.ndarray:
    """Space directions (rows = axes i, j, k) in LPS: rotated, anisotropic."""
    return (rotation(0.2, 0.35, -0.4) @ np.diag([0.9, 0.8, 2.2])).T


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior", "left-anterior-superior"])
def test_nrrd_geometry_in_and_back_out(tmp_path, space):
    flips = {"left-posterior-superior": [-1, -1, 1], "right-anterior-superior": [1, 1, 1],
             "left-anterior-superior": [-1, 1, 1]}[space]
    dirs, origin = oblique_dirs(), np.array([10.5, -20.25, 33.0])
    frame = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    header = {"space": space, "space directions": dirs, "space origin": origin, "measurement frame": frame,
              "kinds": ["domain"] * 3, "space units": ["mm", "mm", "mm"], "encoding": "gzip"}
    src = str(tmp_path / "src.nrrd")
    nrrd.write(src, DATA, header, index_order="C")
    vol = read_volume(src)
    expected = np.eye(4)
    expected[:3, :3] = np.diag(flips) @ dirs.T
    expected[:3, 3] = np.asarray(flips) * origin
    np.testing.assert_allclose(vol.affine, expected, atol=1e-12)
    np.testing.assert_array_equal(vol.data, DATA)
    np.testing.assert_allclose(vol.spacing, np.linalg.norm(dirs, axis=1)[::-1])
    out = write_volume(tmp_path / "out.nrrd", vol.data, vol.header)
    back, _ = nrrd.read(out, index_order="C")
    written = nrrd.read_header(out)
    assert written["space"] == space  # the source's own space, not converted
    np.testing.assert_allclose(written["space directions"], dirs, atol=1e-12)
    np.testing.assert_allclose(written["space origin"], origin, atol=1e-12)
    np.testing.assert_allclose(written["measurement frame"], frame)
    assert list(written["space units"]) == ["mm", "mm", "mm"]
    np.testing.assert_array_equal(back, DATA)


def test_nrrd_channels_detached_header_and_labels(tmp_path):
    data = RNG.integers(0, 200, (6, 7, 8, 3)).astype(np.uint8)  # C order: (k, j, i, vector)
    dirs = np.vstack([np.full(3, np.nan), np.diag([0.5, 0.6, 1.5])])
    header = {"space": "left-posterior-superior", "space directions": dirs, "space origin": np.zeros(3),
              "kinds": ["vector", "domain", "domain", "domain"]}
    src = str(tmp_path / "rgbish.nrrd")
    nrrd.write(src, data.T, header)  # F order (C, i, j, k): the vector axis is the fastest on disk
    vol = read_volume(src)
    assert vol.channel_axis == 0 and vol.data.shape == (3, 6, 7, 8)
    np.testing.assert_array_equal(vol.data, np.moveaxis(data, -1, 0))
    np.testing.assert_allclose(vol.spacing, (1.5, 0.6, 0.5))
    detached = str(tmp_path / "scan.nhdr")
    nrrd.write(detached, DATA.T, {"space": "right-anterior-superior", "space directions": np.eye(3) * 2.0,
                                  "space origin": np.ones(3), "encoding": "raw"}, detached_header=True)
    vol = read_volume(detached)
    np.testing.assert_array_equal(vol.data, DATA)
    np.testing.assert_allclose(vol.affine, np.array([[2, 0, 0, 1], [0, 2, 0, 1], [0, 0, 2, 1], [0, 0, 0, 1.0]]))
    lab = write_volume(tmp_path / "lab.seg.nrrd", (DATA > 50).astype(np.int64), vol.header, is_label=True)
    assert nrrd.read_header(lab)["type"] in ("uint8", "unsigned char")
    assert read_volume(lab).data.dtype == np.uint8


def test_metaimage_geometry_in_and_back_out(tmp_path):
    img = sitk.GetImageFromArray(DATA)
    direction = rotation(-0.3, 0.2, 0.6) @ np.diag([1, -1, 1])  # a reflection, as after a flip
    img.SetDirection(direction.ravel().tolist())
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((-100.0, 50.5, 3.25))
    src = str(tmp_path / "src.mha")
    sitk.WriteImage(img, src, True)
    vol = read_volume(src)
    expected = np.eye(4)
    expected[:3, :3] = direction @ np.diag([0.7, 0.9, 2.5])
    expected[:3, 3] = [-100.0, 50.5, 3.25]
    np.testing.assert_allclose(vol.affine, LPS @ expected, atol=1e-12)
    np.testing.assert_array_equal(vol.data, DATA)
    for name in ("out.mha", "out.mhd"):
        out = write_volume(tmp_path / name, vol.data, vol.header)
        back = sitk.ReadImage(out)
        np.testing.assert_allclose(np.reshape(back.GetDirection(), (3, 3)), direction, atol=1e-12)
        np.testing.assert_allclose(back.GetSpacing(), (0.7, 0.9, 2.5), atol=1e-12)
        np.testing.assert_allclose(back.GetOrigin(), (-100.0, 50.5, 3.25), atol=1e-12)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), DATA)
    assert sorted(os.listdir(tmp_path)) == ["out.mha", "out.mhd", "out.zraw", "src.mha"]


def test_metaimage_vector_and_4d(tmp_path):
    vec = sitk.GetImageFromArray(RNG.normal(size=(6, 7, 8, 2)).astype(np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "vec.mha"))
    vol = read_volume(tmp_path / "vec.mha")
    assert vol.channel_axis == 0 and vol.data.shape == (2, 6, 7, 8)
    back = read_volume(write_volume(tmp_path / "vec_out.mha", vol.data, vol.header))
    np.testing.assert_array_equal(back.data, vol.data)


@pytest.mark.parametrize("zooms,rot,flip", [
    ((0.9, 0.7, 2.5), rotation(0.3, -0.2, 0.5), (1, 1, 1)),
    ((0.6, 0.6, 1.2), rotation(0.1, 0.1, 0.1), (-1, -1, 1)),
])
def test_every_format_keeps_the_same_world(tmp_path, zooms, rot, flip):
    """One volume written as NIfTI, NRRD, MHA and a DICOM series reads back identical, same affine."""
    affine = make_affine(zooms, rot, flip, origin=(12.0, -40.5, 77.25))
    data = RNG.integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    src = read_nifti(save_nifti(tmp_path / "src.nii.gz", data, affine))
    paths = [write_volume(tmp_path / f"v{ext}", src.data, src.header) for ext in (".nrrd", ".mha", ".mhd", ".nii")]
    write_dicom_series(tmp_path / "dcm", src.data, src.affine, modality="CT")
    for path in [*paths, str(tmp_path / "dcm")]:
        vol = read_volume(path)
        np.testing.assert_array_equal(vol.data, data, err_msg=path)
        np.testing.assert_allclose(world_corners(vol.affine, vol.spatial_shape),
                                   world_corners(affine, data.shape), atol=1e-4, err_msg=path)
        # and written once more from that geometry, into every other format
        for ext in (".nrrd", ".mha", ".nii.gz"):
            again = read_volume(write_volume(tmp_path / f"again{ext}", vol.data, vol.header))
            np.testing.assert_allclose(again.affine, affine, atol=1e-4, err_msg=f"{path} -> {ext}")


def test_bad_nrrd_and_metaimage_files(tmp_path):
    good = str(tmp_path / "good.nrrd")
    nrrd.write(good, DATA, {"encoding": "raw", "space": "RAS", "space directions": np.eye(3)}, index_order="C")
    blob = open(good, "rb").read()
    (tmp_path / "trunc.nrrd").write_bytes(blob[: len(blob) - 500])
    with pytest.raises(VolumeError, match="trunc.nrrd: file is truncated"):
        read_volume(tmp_path / "trunc.nrrd")
    huge = blob.replace(b"sizes: 8 7 6", b"sizes: 3000 3000 3000")
    (tmp_path / "huge.nrrd").write_bytes(huge)
    with pytest.raises(VolumeError, match="voxels"):
        read_volume(tmp_path / "huge.nrrd")
    (tmp_path / "garbage.nrrd").write_bytes(RNG.bytes(500))
    with pytest.raises(VolumeError, match="garbage.nrrd: not a readable NRRD"):
        read_volume(tmp_path / "garbage.nrrd")
    nrrd.write(str(tmp_path / "odd.nrrd"), DATA, {"space": "scanner-xyz-time", "space directions": np.eye(4)[:3]})
    with pytest.raises(VolumeError):
        read_volume(tmp_path / "odd.nrrd")
    (tmp_path / "garbage.mha").write_bytes(RNG.bytes(500))
    with pytest.raises(VolumeError, match="garbage.mha"):
        read_volume(tmp_path / "garbage.mha")
    mha = str(tmp_path / "ok.mha")
    sitk.WriteImage(sitk.GetImageFromArray(DATA), mha, False)
    blob = open(mha, "rb").read()
    (tmp_path / "cut.mha").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(VolumeError, match="cut.mha: file is truncated"):
        read_volume(tmp_path / "cut.mha")
    (tmp_path / "huge.mha").write_bytes(blob.replace(b"DimSize = 8 7 6", b"DimSize = 3000 3000 3000"))
    with pytest.raises(VolumeError, match="voxels"):
        read_volume(tmp_path / "huge.mha")
    (tmp_path / "lost.mhd").write_text("NDims = 3\nDimSize = 8 7 6\nElementType = MET_FLOAT\nElementDataFile = gone.raw\n")
    with pytest.raises(VolumeError, match="gone.raw is missing"):
        read_volume(tmp_path / "lost.mhd")
    with pytest.raises(VolumeError, match="unknown output format"):
        write_volume(tmp_path / "x.png", DATA, Volume(DATA, (1, 1, 1), np.eye(4)))
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
