"""World space in napari: layers from any format and orientation land on the file's world coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from io_helpers import make_affine, rotation, save_nifti

from napari_medseg._reader import read_layers
from napari_medseg._writer import layer_world_matrix, write_labels
from napari_medseg.io import (
    NiftiError,
    Volume,
    VolumeError,
    affine_from_napari,
    layer_transform,
    napari_matrix,
    read_volume,
    voxel_to_world,
    write_volume,
)
from napari_medseg.io._dicom_synth import write_dicom_series

AFFINES = {
    "axis_aligned": make_affine((1.0, 2.0, 3.0)),
    "lps": make_affine((0.8, 0.8, 2.5), flip=(-1, -1, 1)),
    "oblique": make_affine((1.1, 0.7, 2.0), rotation(0.3, -0.2, 0.5)),
    "left_handed": make_affine((0.5, 0.6, 1.5), rotation(0.1, 0.4, -0.3), flip=(1, 1, -1)),
    "shear": np.array([[0.8, 0.1, 0.0, -20.0], [0.0, 0.9, 0.05, 15.0], [0.0, 0.0, 3.0, 2.0], [0, 0, 0, 1.0]]),
}


def layer(data, kwargs, kind="image"):
    from napari.layers import Image, Labels

    return (Image if kind == "image" else Labels)(data, **kwargs)


def test_error_classes():
    assert issubclass(NiftiError, VolumeError) and issubclass(VolumeError, ValueError)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_layer_data_to_world_is_the_file_world(name):
    affine = AFFINES[name]
    spacing = tuple(np.linalg.norm(affine[:3, :3], axis=0)[::-1])
    lay = layer(np.zeros((4, 5, 6), np.float32), layer_transform(affine, spacing))
    np.testing.assert_allclose(lay.scale, spacing)
    for voxel in [(0, 0, 0), (3, 4, 5), (1, 2, 3), (2.5, 0.5, 4.25)]:
        ras = affine @ np.array([voxel[2], voxel[1], voxel[0], 1.0])  # napari (k, j, i) -> (i, j, k)
        np.testing.assert_allclose(lay.data_to_world(voxel), ras[:3][::-1], atol=1e-9)  # world (S, A, R)
        np.testing.assert_allclose(voxel_to_world(affine, voxel), ras[:3][::-1], atol=1e-9)
    np.testing.assert_allclose(affine_from_napari(napari_matrix(affine)), affine, atol=1e-12)
    # the writer recovers the affine from the layer state alone (no source geometry)
    state = lay._get_state()
    np.testing.assert_allclose(affine_from_napari(layer_world_matrix(state, 3)), affine, atol=1e-9)


def test_axis_aligned_ras_keeps_scale_translate_and_identity_affine():
    kw = layer_transform(AFFINES["axis_aligned"], (3.0, 2.0, 1.0))
    assert kw["scale"] == (3.0, 2.0, 1.0) and kw["translate"] == (7.0, 30.25, -12.5)
    np.testing.assert_array_equal(kw["affine"], np.eye(4))


def test_two_orientations_of_the_same_data_overlay(tmp_path):
    """The same anatomy stored axis-aligned (NIfTI) and flipped + transposed + rotated (DICOM): every
    voxel's world position in one layer finds the same value in the other."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 1000, (6, 8, 10)).astype(np.int16)  # (k, j, i)
    base = make_affine((0.9, 0.8, 2.0), origin=(5.0, -3.0, 12.0))
    save_nifti(tmp_path / "axial.nii.gz", data, base)
    # a second storage: i <- -j, j <- k, k <- -i (a rotation of the voxel grid), as another series
    perm = np.transpose(data, (2, 0, 1))[::-1, :, ::-1]  # new (k', j', i') = (i reversed, k, j reversed)
    old_from_new = np.zeros((4, 4))
    old_from_new[3, 3] = 1
    old_from_new[1, 0], old_from_new[1, 3] = -1, data.shape[1] - 1  # j = (J-1) - i'
    old_from_new[2, 1] = 1  # k = j'
    old_from_new[0, 2], old_from_new[0, 3] = -1, data.shape[2] - 1  # i = (I-1) - k'
    write_dicom_series(tmp_path / "other", perm, base @ old_from_new, modality="CT")
    (a_data, a_kw, _), = read_layers(str(tmp_path / "axial.nii.gz"))
    (b_data, b_kw, _), = read_layers(str(tmp_path / "other"))
    a, b = layer(a_data, a_kw), layer(b_data, b_kw)
    assert read_volume(tmp_path / "other").data.shape == perm.shape  # the series' own layout...
    assert b_kw["metadata"]["medseg_geometry"]["layer_axes"] != [0, 1, 2]  # ...shown transposed
    assert not np.allclose(b_kw["affine"], np.eye(4))  # and flipped
    for voxel in [(0, 0, 0), (5, 7, 9), (2, 3, 4), (4, 1, 8)]:
        world = a.data_to_world(voxel)
        other = np.round(b.world_to_data(world)).astype(int)
        np.testing.assert_allclose(b.data_to_world(tuple(other)), world, atol=1e-4)
        assert b_data[tuple(other)] == a_data[voxel]


def test_labels_written_from_a_plain_layer_use_its_world_transform(tmp_path):
    """A labels layer made in napari (no source geometry) is saved where napari shows it."""
    kw = layer_transform(AFFINES["oblique"], (2.0, 0.7, 1.1))
    lab = layer(np.ones((4, 5, 6), np.uint8), kw, kind="labels")
    for ext in (".nii.gz", ".nrrd", ".mha"):
        (out,) = write_labels(str(tmp_path / f"plain{ext}"), lab.data, lab._get_state())
        np.testing.assert_allclose(read_volume(out).affine, AFFINES["oblique"], atol=1e-5)
    with pytest.raises(VolumeError, match="DICOM-SEG can only be written"):
        write_labels(str(tmp_path / "plain.dcm"), lab.data, lab._get_state())


def test_every_geometry_is_plain_json_and_writes_back(tmp_path):
    """``metadata["medseg_geometry"]`` from every reader survives JSON and writes the same world back."""
    import json

    from napari_medseg.io import geometry_from_volume

    data = np.random.default_rng(2).integers(0, 100, (5, 6, 7)).astype(np.int16)
    affine = AFFINES["oblique"]
    src = Volume(data, tuple(np.linalg.norm(affine[:3, :3], axis=0)[::-1]), affine)
    paths = [write_volume(tmp_path / f"v{ext}", data, src) for ext in (".nii.gz", ".nrrd", ".mha")]
    write_dicom_series(tmp_path / "dcm", data, affine)
    paths.append(str(tmp_path / "dcm"))
    seg = write_volume(tmp_path / "seg.dcm", (data > 50).astype(np.uint8), read_volume(tmp_path / "dcm"), is_label=True)
    for path in [*paths, seg]:
        vol = read_volume(path)
        geom = geometry_from_volume(vol)
        plain = json.loads(json.dumps(geom, allow_nan=False))
        assert plain == geom, path
        ext = ".dcm" if path == seg else (".nii.gz" if path.endswith("dcm") else path[path.index("."):])
        out = write_volume(tmp_path / f"back{ext}", vol.data, plain, is_label=path == seg)
        np.testing.assert_allclose(read_volume(out).affine, affine, atol=1e-5, err_msg=path)


@pytest.mark.parametrize(("rot", "axes"), [
    (np.eye(3), (0, 1, 2)),  # axial
    (rotation(np.pi / 2, 0, 0), (1, 0, 2)),  # coronal: the slice axis k points along A
    (np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]]), (1, 2, 0)),  # sagittal: i along A, j along S, k along R
    (rotation(0, np.pi / 2, 0) @ rotation(np.pi / 2, 0, 0), (2, 0, 1)),  # i along -S, j along R, k along -A
    (rotation(np.pi / 2 + 0.2, 0.1, 0.0), (1, 0, 2)),  # coronal oblique
])
def test_permuted_acquisitions_get_a_transposed_view(tmp_path, rot, axes):
    """napari draws the 2D block of a layer's transform: a coronal or sagittal volume is shown through
    a transposed view whose axes follow the world axes; files keep the source layout."""
    from napari_medseg.io.world import display_axes, to_volume_order

    affine = make_affine((0.9, 0.8, 2.5), rot, flip=(-1, 1, 1) if np.allclose(rot, np.eye(3)) else (1, 1, 1))
    data = np.random.default_rng(3).integers(0, 9, (5, 6, 7)).astype(np.uint8)  # (k, j, i)
    assert display_axes(affine) == axes
    src = save_nifti(tmp_path / "labels.nii.gz", data, affine)
    ((ldata, kw, kind),) = read_layers(src)
    assert kind == "labels" and ldata.shape == tuple(data.shape[a] for a in axes)
    assert kw["metadata"]["medseg_geometry"]["layer_axes"] == list(axes)
    lin = kw["affine"][:3, :3]
    assert np.all(np.abs(np.diag(lin)) > 0.9)  # the 2D blocks napari draws are never singular
    lab = layer(ldata, kw, kind="labels")
    for v in [(0, 0, 0), (1, 2, 3), tuple(n - 1 for n in ldata.shape)]:
        vol_voxel = [0, 0, 0]
        for w, a in enumerate(axes):
            vol_voxel[a] = v[w]
        assert data[tuple(vol_voxel)] == ldata[v]
        np.testing.assert_allclose(lab.data_to_world(v), voxel_to_world(affine, vol_voxel), atol=1e-9)
    back, geom = to_volume_order(ldata, kw["metadata"]["medseg_geometry"])
    np.testing.assert_array_equal(back, data)
    assert "layer_axes" not in geom
    for ext in (".nii.gz", ".nrrd", ".mha"):
        (out,) = write_labels(str(tmp_path / f"out{ext}"), lab.data, lab._get_state())
        vol = read_volume(out)
        np.testing.assert_array_equal(vol.data, data)
        np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
