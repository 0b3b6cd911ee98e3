"""Geometry helpers shared by the IO tests (affines, NIfTI files written by nibabel)."""

from __future__ import annotations

import nibabel as nib
import numpy as np


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(zooms, rot=np.eye(3), flip=(1, 1, 1), origin=(-12.5, 30.25, 7.0)) -> np.ndarray:
    """Voxel (i, j, k) -> RAS+ affine: ``rot @ diag(flip * zooms)`` and ``origin``."""
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(np.asarray(flip, float) * np.asarray(zooms, float))
    aff[:3, 3] = origin
    return aff


def save_nifti(path, data_napari: np.ndarray, affine: np.ndarray) -> str:
    """Write napari-order data as a NIfTI file with nibabel (qform and sform = ``affine``, code 1)."""
    img = nib.Nifti1Image(np.asarray(data_napari).T, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def world_corners(affine: np.ndarray, shape_napari) -> np.ndarray:
    """RAS+ world coordinates of the 8 corner voxels of a grid (napari-order shape)."""
    k, j, i = (np.array([0, n - 1]) for n in shape_napari)
    ijk = np.array([[a, b, c, 1.0] for a in i for b in j for c in k])
    return (ijk @ np.asarray(affine).T)[:, :3]


# Orientation cases for series round trips: (zooms (i, j, k), rotation, flips). All right-handed
# (det > 0) except "las_left_handed", where the slice axis points against the slice normal.
ORIENTATIONS = {
    "ras_anisotropic": ((0.8, 0.6, 3.0), np.eye(3), (1, 1, 1)),
    "lps_anisotropic": ((0.9, 0.7, 2.5), np.eye(3), (-1, -1, 1)),
    "oblique": ((1.1, 0.7, 2.0), rotation(0.3, -0.2, 0.5), (1, 1, 1)),
    "oblique_lps": ((0.5, 0.55, 1.5), rotation(0.1, 0.4, -0.3), (-1, -1, 1)),
    "sagittal_oblique": ((1.0, 1.0, 1.2), rotation(0.2, np.pi / 2 + 0.1, 0.0), (1, 1, 1)),
    "las_left_handed": ((1.0, 1.0, 2.0), rotation(0.0, 0.0, 0.15), (-1, 1, 1)),
}
