"""Do two volumes lie on the same voxel grid? One comparison for files and for napari layers.

Same shape is not enough: labels with another voxel size, origin, axis direction (a flipped or
rotated axis) or orientation would teach a model a shifted, stretched or mirrored segmentation, and
make Dice compare the wrong voxels. :func:`grid_difference` compares two voxel-to-world matrices in
world units and tells what differs, with the numbers; the Train widget uses it for layers
(``widgets/_layers.check_same_grid``), dataset reading for a case's label and channel files
(``engine/data/dataset``), and ``evaluate`` for predictions against references.

Tolerance: two grids match when every voxel corner of one lands within :data:`GRID_TOLERANCE`
voxels (1 %) of the same corner of the other. That absorbs float32 headers and quaternion
round-trips (micrometres) and refuses anything a segmentation could show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .volume import Volume
from .world import napari_matrix

__all__ = ["GRID_TERMS", "GRID_TOLERANCE", "grid_difference", "grid_of", "volume_grid_difference"]

#: Largest allowed distance between matching voxel corners, as a fraction of the smallest voxel size.
GRID_TOLERANCE = 0.01

#: How the differences are named (the widget says "voxel size (scale)", napari's word).
GRID_TERMS = {"shape": "shape", "spacing": "voxel size", "origin": "origin", "orientation": "orientation",
              "axis": "axis"}


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def grid_of(volume: Volume) -> tuple[tuple[int, ...], np.ndarray]:
    """``(spatial shape, napari-order voxel-to-world matrix)`` of a :class:`Volume` (mm)."""
    n = volume.ndim_spatial
    return tuple(int(s) for s in volume.spatial_shape), napari_matrix(volume.affine, n)


def grid_difference(
    shape: Sequence[int],
    matrix: np.ndarray,
    ref_shape: Sequence[int],
    ref_matrix: np.ndarray,
    *,
    ref_name: str = "the reference's",
    terms: Mapping[str, str] | None = None,
) -> str | None:
    """What differs between a grid and a reference grid, or ``None`` when they match.

    Args:
        shape, ref_shape: Voxel counts per data axis (the axes of the matrices' columns).
        matrix, ref_matrix: ``(n + 1) x (n + 1)`` homogeneous voxel-to-world matrices, both in the
            same axis order and world unit (e.g. :func:`~napari_medseg.io.world.napari_matrix`).
        ref_name: How the reference is named in the text ("the image's").
        terms: Names of ``shape``, ``spacing``, ``origin``, ``orientation`` and ``axis`` in the text.

    Returns:
        One phrase with the numbers, e.g. ``"origin (0, 40, 0) vs the image's (0, 0, 0), 40 mm away"``.
    """
    names = {**GRID_TERMS, **(terms or {})}
    shape = tuple(int(s) for s in shape)
    ref_shape = tuple(int(s) for s in ref_shape)
    if shape != ref_shape:
        return f"{names['shape']} {shape} vs {ref_name} {ref_shape}"
    m = np.asarray(matrix, dtype=np.float64)
    r = np.asarray(ref_matrix, dtype=np.float64)
    n = len(shape)
    if m.shape != r.shape or m.shape[0] < n + 1:
        return f"a {m.shape} voxel-to-world matrix vs {ref_name} {r.shape}"
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(r))):
        return "a voxel-to-world matrix with non-finite values"
    d = m.shape[0] - 1
    cols, ref_cols = m[:d, :n], r[:d, :n]
    spacing, ref_spacing = np.linalg.norm(cols, axis=0), np.linalg.norm(ref_cols, axis=0)
    if min(ref_spacing.min(), spacing.min()) <= 0:
        return f"{names['spacing']} {_fmt(spacing)} vs {ref_name} {_fmt(ref_spacing)} (a degenerate axis)"
    tol = GRID_TOLERANCE * float(ref_spacing.min())
    extent = np.maximum(np.asarray(shape) - 1, 1)
    if np.any(np.abs(spacing - ref_spacing) * extent > tol):
        return f"{names['spacing']} {_fmt(spacing)} vs {ref_name} {_fmt(ref_spacing)}"
    for i in range(n):  # the far end of every axis must land where the reference's does
        if np.linalg.norm((cols[:, i] - ref_cols[:, i]) * extent[i]) <= tol:
            continue
        cos = float(np.dot(cols[:, i], ref_cols[:, i]) / (spacing[i] * ref_spacing[i]))
        if cos < -0.999:
            return f"{names['orientation']} differs: {names['axis']} {i} is flipped (it runs the other way)"
        angle = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
        return f"{names['orientation']} differs: {names['axis']} {i} points {angle:.3g} degrees away"
    origin, ref_origin = m[:d, d], r[:d, d]
    gap = float(np.linalg.norm(origin - ref_origin))
    if gap > tol:
        return f"{names['origin']} {_fmt(origin)} vs {ref_name} {_fmt(ref_origin)}, {gap:.4g} mm away"
    return None


def volume_grid_difference(volume: Volume, reference: Volume, *, ref_name: str = "the reference's") -> str | None:
    """:func:`grid_difference` of two volumes (napari order, mm)."""
    shape, matrix = grid_of(volume)
    ref_shape, ref_matrix = grid_of(reference)
    return grid_difference(shape, matrix, ref_shape, ref_matrix, ref_name=ref_name)
