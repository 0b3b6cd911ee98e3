"""``napari-medseg fill``: fill between painted slices from the terminal, geometry kept."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.engine.annotation import fill_between_slices
from napari_medseg.io import read_volume

#: An oblique voxel-to-RAS affine with anisotropic voxels (rotation about z plus an origin).
ANGLE = np.deg2rad(20)
AFFINE = np.array([
    [0.8 * np.cos(ANGLE), -0.8 * np.sin(ANGLE), 0.0, -40.0],
    [0.8 * np.sin(ANGLE), 0.8 * np.cos(ANGLE), 0.0, 12.5],
    [0.0, 0.0, 2.5, -60.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _ellipsoid(shape, center, radii) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _truth() -> np.ndarray:
    """Napari order (z, y, x): label 1 an ellipsoid, label 2 a smaller one inside it."""
    shape = (30, 36, 40)
    truth = _ellipsoid(shape, (15, 18, 20), (12, 14, 16)).astype(np.uint8)
    truth[_ellipsoid(shape, (15, 18, 24), (8, 6, 6))] = 2
    return truth


def _write_nifti(path, napari_data: np.ndarray, dtype=np.uint8) -> str:
    nib.save(nib.Nifti1Image(napari_data.transpose(2, 1, 0).astype(dtype), AFFINE), str(path))
    return str(path)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def painted(tmp_path):
    truth = _truth()
    sparse = np.zeros_like(truth)
    sparse[3:28:5] = truth[3:28:5]
    return truth, sparse, _write_nifti(tmp_path / "painted.nii.gz", sparse)


def test_fill_writes_the_interpolation_with_the_source_geometry(painted, tmp_path, capsys):
    truth, sparse, src = painted
    out = tmp_path / "filled.nii.gz"
    assert main(["fill", src, "-o", str(out)]) == 0
    assert "painted slice(s) along axis 0 [3, 8, 13, 18, 23]" in capsys.readouterr().out
    vol, source = read_volume(out), read_volume(src)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(vol.affine, source.affine)
    np.testing.assert_allclose(vol.spacing, source.spacing)
    np.testing.assert_array_equal(vol.data, fill_between_slices(sparse))
    between = [z for z in range(4, 23) if z % 5 != 3]
    for value in (1, 2):
        a, b = vol.data[between] == value, truth[between] == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85, value


def test_fill_into_another_format_along_another_axis(painted, tmp_path):
    truth, _, _ = painted
    sparse = np.zeros_like(truth)
    sparse[:, 6:31:6] = truth[:, 6:31:6]
    src = _write_nifti(tmp_path / "coronal.nii", sparse, dtype=np.float32)  # float-stored labels
    out = tmp_path / "coronal_filled.nrrd"
    assert main(["fill", src, "-o", str(out), "--axis", "1"]) == 0
    vol = read_volume(out)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-4)
    np.testing.assert_array_equal(vol.data, fill_between_slices(sparse, axis=1))
    assert np.issubdtype(vol.data.dtype, np.integer)


def test_explicit_slices_end_the_objects_at_a_background_slice(painted, tmp_path):
    _, sparse, src = painted
    out = tmp_path / "ended.mha"
    assert main(["fill", src, "-o", str(out), "--slices", "3,8,10,13,18,23"]) == 0
    data = read_volume(out).data
    assert not data[10].any()  # painted as background: nothing there
    np.testing.assert_array_equal(data, fill_between_slices(sparse, slices=[3, 8, 10, 13, 18, 23]))


def test_fill_never_replaces_its_input_and_asks_before_replacing_an_output(painted, tmp_path, capsys):
    _, _, src = painted
    before = _digest(src)
    assert main(["fill", src, "-o", src, "--overwrite"]) == 2
    assert "would replace the input" in capsys.readouterr().err
    assert _digest(src) == before
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    assert main(["fill", src, "-o", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["fill", src, "-o", str(out), "--overwrite"]) == 0
    assert read_volume(out).data.any()


def test_bad_arguments_are_reported(painted, tmp_path, capsys):
    _, _, src = painted
    assert main(["fill", src, "-o", str(tmp_path / "a.nii.gz"), "--slices", "3,40"]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(["fill", src, "-o", str(tmp_path / "b.nii.gz"), "--axis", "3"]) == 2
    with pytest.raises(SystemExit, match="slice indices like"):
        main(["fill", src, "-o", str(tmp_path / "c.nii.gz"), "--slices", "three"])
    assert not list(tmp_path.glob("[abc].nii.gz"))
    image = _write_nifti(tmp_path / "image.nii.gz", np.full((4, 5, 6), 0.5), dtype=np.float32)
    with pytest.raises(SystemExit, match="non-integer"):
        main(["fill", image, "-o", str(tmp_path / "d.nii.gz")])
