"""Round trips on real NIfTI files written by nibabel: read -> write -> read keeps data and geometry."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from io_helpers import make_affine, rotation

from napari_medseg.io import (
    NiftiError,
    Volume,
    affine_from_spacing,
    geometry_from_volume,
    read_nifti,
    write_nifti,
)


def save(path, data_ijk, affine, *, qcode=1, scode=1, sform=None, zooms=None, dtype=None) -> str:
    """Write ``data_ijk`` (NIfTI order) with explicit qform/sform codes, the nibabel way."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data_ijk.shape)
    hdr.set_data_dtype(data_ijk.dtype if dtype is None else dtype)
    hdr.set_qform(affine, code=qcode)
    hdr.set_sform(affine if sform is None else sform, code=scode)
    if zooms is not None:
        hdr.set_zooms(zooms)
    hdr.set_xyzt_units("mm", "sec")
    # affine=None: nibabel keeps the header's qform/sform exactly as set above
    nib.save(nib.Nifti1Image(data_ijk, None, header=hdr), str(path))
    written = nib.load(str(path)).header
    assert (int(written["qform_code"]), int(written["sform_code"])) == (qcode, scode)
    return str(path)


RNG = np.random.default_rng(7)
IMG3 = RNG.normal(100, 20, (11, 9, 7)).astype(np.float32)  # NIfTI order (i, j, k)
LAB3 = RNG.integers(0, 6, (11, 9, 7)).astype(np.uint8)
SHEAR = np.array([[0.8, 0.1, 0.0, -20.0], [0.0, 0.9, 0.05, 15.0], [0.0, 0.0, 3.0, 2.0], [0, 0, 0, 1.0]])

CASES = {
    "ras_anisotropic": dict(affine=make_affine((0.8, 0.6, 3.0))),
    "lps": dict(affine=make_affine((0.9, 0.9, 2.5), flip=(-1, -1, 1))),
    "oblique": dict(affine=make_affine((1.1, 0.7, 2.0), rot=rotation(0.3, -0.2, 0.5))),
    "oblique_flipped": dict(affine=make_affine((0.5, 0.5, 1.5), rot=rotation(0.1, 0.4, -0.3), flip=(1, 1, -1))),
    "qform_only": dict(affine=make_affine((0.7, 0.8, 2.2), rot=rotation(0.2, 0, 0)), scode=0),
    "sform_only_shear": dict(affine=make_affine((1, 1, 1)), qcode=0, scode=2, sform=SHEAR),
    "both_different": dict(
        affine=make_affine((1.0, 1.0, 2.0)), qcode=1, scode=4,
        sform=make_affine((1.0, 1.0, 2.0), rot=rotation(0, 0, 0.05), origin=(1, 2, 3)),
    ),
    "no_codes": dict(affine=make_affine((1.2, 1.2, 4.0)), qcode=0, scode=0),
}


def assert_same_geometry(p1: str, p2: str) -> None:
    a, b = nib.load(p1), nib.load(p2)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
    assert int(b.header["qform_code"]) == int(a.header["qform_code"])
    assert int(b.header["sform_code"]) == int(a.header["sform_code"])
    np.testing.assert_allclose(b.header.get_qform(), a.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(b.header.get_sform(), a.header.get_sform(), atol=1e-6)
    np.testing.assert_allclose(b.header.get_zooms(), a.header.get_zooms(), atol=1e-6)
    assert b.header.get_xyzt_units() == a.header.get_xyzt_units()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["float", "label"])
def test_roundtrip_geometry_and_data(tmp_path, case, kind):
    spec = dict(CASES[case])
    data = IMG3 if kind == "float" else LAB3
    src = save(tmp_path / f"src_{case}.nii.gz", data, **spec)
    vol = read_nifti(src)

    # napari order: (k, j, i), spacing = zooms reversed, translate = affine origin reversed
    assert vol.data.shape == data.shape[::-1]
    np.testing.assert_array_equal(vol.data, data.T)
    assert vol.data.dtype == data.dtype
    zooms = nib.load(src).header.get_zooms()
    np.testing.assert_allclose(vol.spacing, zooms[::-1], rtol=1e-6)
    np.testing.assert_allclose(vol.translate, nib.load(src).affine[:3, 3][::-1], atol=1e-6)
    np.testing.assert_allclose(vol.affine, nib.load(src).affine, atol=1e-12)

    out = write_nifti(tmp_path / f"out_{case}.nii.gz", vol.data, vol.header, is_label=kind == "label")
    assert_same_geometry(src, out)
    back = read_nifti(out)
    np.testing.assert_array_equal(back.data, vol.data)
    assert back.data.dtype == vol.data.dtype
    assert back.spacing == vol.spacing


def test_geometry_is_json_and_complete(tmp_path):
    spec = CASES["both_different"]
    vol = read_nifti(save(tmp_path / "g.nii.gz", IMG3, **spec))
    geom = geometry_from_volume(vol)
    assert json.loads(json.dumps(geom, allow_nan=False)) == geom
    for key in ("affine", "qform", "qform_code", "sform", "sform_code", "zooms", "xyzt_units", "dtype", "spacing"):
        assert key in geom, key
    assert geom["qform_code"] == 1 and geom["sform_code"] == 4
    assert geom["dtype"] == "float32"
    # the JSON copy alone (what a napari layer keeps) writes the same geometry back
    out = write_nifti(tmp_path / "from_json.nii", vol.data, json.loads(json.dumps(geom)))
    assert_same_geometry(str(tmp_path / "g.nii.gz"), out)


def test_4d_multichannel_roundtrip(tmp_path):
    data = RNG.normal(0, 1, (8, 7, 6, 3)).astype(np.float32)
    src = save(tmp_path / "mc.nii.gz", data, make_affine((0.9, 0.9, 2.0), flip=(-1, -1, 1)))
    vol = read_nifti(src)
    assert vol.channel_axis == 0 and vol.data.shape == (3, 6, 7, 8)
    assert vol.spatial_shape == (6, 7, 8) and len(vol.spacing) == 3
    np.testing.assert_array_equal(vol.data[1], data[..., 1].T)
    out = write_nifti(tmp_path / "mc_out.nii.gz", vol.data, vol.header)
    assert nib.load(out).shape == data.shape
    assert_same_geometry(src, out)
    np.testing.assert_array_equal(read_nifti(out).data, vol.data)
    # one channel of a 4D source written as a 3D label map on the same grid
    lab = write_nifti(tmp_path / "mc_lab.nii.gz", (vol.data[0] > 0).astype(np.uint8), vol.header, is_label=True)
    np.testing.assert_allclose(nib.load(lab).affine, nib.load(src).affine, atol=1e-6)
    assert nib.load(lab).shape == data.shape[:3]


def test_2d_file_roundtrip(tmp_path):
    data = RNG.normal(0, 1, (13, 10)).astype(np.float32)
    img = nib.Nifti1Image(data, make_affine((0.5, 0.25, 1.0)))
    src = str(tmp_path / "slice.nii")
    nib.save(img, src)
    vol = read_nifti(src)
    assert vol.data.shape == (10, 13) and vol.ndim_spatial == 2
    assert vol.spacing == (0.25, 0.5)
    np.testing.assert_allclose(vol.translate, (30.25, -12.5))
    out = write_nifti(tmp_path / "slice_out.nii", vol.data, vol.header)
    assert nib.load(out).shape == (13, 10)
    assert_same_geometry(src, out)
    np.testing.assert_array_equal(read_nifti(out).data, vol.data)


@pytest.mark.parametrize(
    ("maximum", "dtype"), [(1, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16), (70000, np.int32)]
)
def test_label_dtype_follows_values(tmp_path, maximum, dtype):
    labels = np.zeros((4, 5, 6), np.int64)
    labels[1, 2, 3] = maximum
    out = write_nifti(tmp_path / "lab.nii.gz", labels, spacing=(1, 1, 1), is_label=True)
    img = nib.load(out)
    assert img.header.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj).T, labels)


def test_labels_from_integral_floats_and_bools(tmp_path):
    out = write_nifti(tmp_path / "f.nii.gz", np.array([[[0.0, 2.0], [3.0, 1.0]]]), is_label=True)
    assert nib.load(out).header.get_data_dtype() == np.uint8
    out = write_nifti(tmp_path / "b.nii.gz", np.ones((2, 3, 4), bool), is_label=True)
    assert np.asanyarray(nib.load(out).dataobj).dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.full((2, 3, 4), -1, np.int16), "negative"),
        (np.full((2, 3, 4), 0.5, np.float32), "non-integer"),
        (np.full((2, 3, 4), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_label_values_refused(tmp_path, data, message):
    with pytest.raises(NiftiError, match=message):
        write_nifti(tmp_path / "bad.nii.gz", data, is_label=True)
    assert not list(tmp_path.iterdir())


def test_write_without_geometry_builds_affine(tmp_path):
    data = RNG.normal(0, 1, (5, 6, 7)).astype(np.float32)
    out = write_nifti(tmp_path / "plain.nii.gz", data, spacing=(3.0, 2.0, 0.5), translate=(10.0, -20.0, 30.0))
    img = nib.load(out)
    expected = np.array([[0.5, 0, 0, 30.0], [0, 2.0, 0, -20.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(img.affine, expected, atol=1e-6)
    np.testing.assert_allclose(affine_from_spacing((3.0, 2.0, 0.5), (10.0, -20.0, 30.0)), expected)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.header.get_zooms(), (0.5, 2.0, 3.0))
    vol = read_nifti(out)
    assert vol.spacing == (3.0, 2.0, 0.5)
    assert vol.translate == (10.0, -20.0, 30.0)
    np.testing.assert_array_equal(vol.data, data)


def test_volume_as_geometry_and_in_memory_volume(tmp_path):
    affine = make_affine((1.5, 1.5, 3.0), rot=rotation(0.2, 0.1, 0.0))
    vol = Volume(np.zeros((4, 5, 6), np.float32), (3.0, 1.5, 1.5), affine)
    out = write_nifti(tmp_path / "mem.nii.gz", np.ones((4, 5, 6), np.uint8), vol, is_label=True)
    np.testing.assert_allclose(nib.load(out).affine, affine, atol=1e-5)
    np.testing.assert_allclose(nib.load(out).header.get_zooms(), (1.5, 1.5, 3.0), rtol=1e-6)


def test_float64_and_scaled_ints_become_float32(tmp_path):
    data = RNG.normal(0, 1, (4, 5, 6))
    p = str(tmp_path / "f64.nii.gz")
    nib.save(nib.Nifti1Image(data, np.eye(4)), p)
    vol = read_nifti(p)
    assert vol.data.dtype == np.float32 and vol.header["dtype"] == "float64"
    np.testing.assert_allclose(vol.data, data.T.astype(np.float32))
    img = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    p = str(tmp_path / "scaled.nii")
    nib.save(img, p)
    vol = read_nifti(p)
    assert vol.data.dtype == np.float32 and vol.header["dtype"] == "int16"
    assert vol.data.T[0, 0, 1] == pytest.approx(10.5)


def test_changed_affine_rebuilds_forms_and_zooms(tmp_path):
    """A geometry whose affine was edited (e.g. after resampling) is written from that affine."""
    vol = read_nifti(save(tmp_path / "src.nii.gz", IMG3, **CASES["oblique"]))
    geom = geometry_from_volume(vol)
    new_affine = make_affine((2.0, 1.5, 4.0), rot=rotation(0.1, 0.0, 0.2), flip=(-1, 1, 1))
    geom["affine"] = new_affine.tolist()
    out = write_nifti(tmp_path / "moved.nii.gz", vol.data, geom)
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, new_affine, atol=1e-5)
    np.testing.assert_allclose(img.header.get_qform(), new_affine, atol=1e-4)  # float32 quaternion
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 1.5, 4.0), rtol=1e-6)
