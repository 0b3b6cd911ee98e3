"""World space: one convention for every format, and the napari layer transform that shows it.

Every reader returns ``Volume.affine``: the 4x4 matrix from file voxel indices ``(i, j, k)`` to
world coordinates in **RAS+ millimetres** (x to the patient's right, y anterior, z superior), the
NIfTI convention. DICOM, NRRD (LPS or RAS space) and MetaImage (LPS, ITK's convention) are
converted on reading (:data:`RAS_FROM_LPS` flips x and y) and back on writing.

napari arrays are in napari order, the voxel axes reversed: ``(k, j, i)``. napari's world axes are
the RAS+ axes reversed too: ``(S, A, R)`` = ``(z, y, x)``. The napari voxel-to-world matrix is
therefore the affine with rows and columns reversed (:func:`napari_matrix`). A layer gets it as

- ``scale`` = the voxel spacing and ``translate`` = the world position of voxel 0 (napari order),
  which is what napari's status bar, scale bar and the engine read as voxel size and origin;
- ``affine`` = the rest (rotation, flips, shear), ``M @ inverse(scale/translate matrix)``, which is
  the identity for an axis-aligned RAS+ volume.

So ``layer.data_to_world(voxel)`` is the file's world coordinate of that voxel, in ``(S, A, R)``
order, and layers from any two files of one patient (any format, any orientation) overlay.
Painting still happens on each layer's own voxel grid.

**Layer axes.** napari's 2D view uses the displayed block of a layer's transform, so a layer
whose data axes are *permuted* against the world axes (a coronal or sagittal acquisition: its
slice axis points along A or R, not S) cannot be shown in 2D (napari raises on the singular
block). :func:`display_axes` finds the permutation of the volume's axes closest to the world axes
(identity for axial scans); the reader gives napari ``np.transpose(volume.data, axes)`` (a view)
with the matching transform, records ``axes`` as ``geometry["layer_axes"]``, and the writer
transposes back before writing, so files keep the source layout. Flips and oblique tilts stay
in the transform. No napari import here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "RAS_FROM_LPS",
    "affine_from_napari",
    "display_axes",
    "layer_transform",
    "to_layer_order",
    "to_volume_order",
    "napari_matrix",
    "voxel_to_world",
]

#: Converts LPS+ world coordinates to RAS+ (and back: it is its own inverse).
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def napari_matrix(affine: np.ndarray, ndim: int = 3) -> np.ndarray:
    """The napari-order ``(ndim + 1)`` square voxel-to-world matrix of a RAS+ ``affine``.

    Args:
        affine: 4x4 voxel ``(i, j, k)`` to RAS+ matrix.
        ndim: Spatial axes of the layer (2 or 3); a 2D layer keeps the in-plane part.

    Returns:
        Matrix taking napari data coordinates ``(k, j, i)`` (or ``(j, i)``) to world
        ``(S, A, R)`` (or ``(A, R)``).
    """
    a = np.asarray(affine, dtype=np.float64)
    out = np.eye(ndim + 1)
    out[:ndim, :ndim] = a[:ndim, :ndim][::-1, ::-1]
    out[:ndim, ndim] = a[:ndim, 3][::-1]
    return out


def affine_from_napari(matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`napari_matrix`: a napari-order data-to-world matrix as a 4x4 RAS+ affine.

    A 3x3 (2D layer) matrix gives a 4x4 affine with a 1 mm third axis.
    """
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0] - 1
    if m.shape != (n + 1, n + 1) or n not in (2, 3):
        raise ValueError(f"expected a 3x3 or 4x4 matrix, got shape {m.shape}")
    out = np.eye(4)
    out[:n, :n] = m[:n, :n][::-1, ::-1]
    out[:n, 3] = m[:n, n][::-1]
    return out


def display_axes(affine: np.ndarray, ndim: int = 3) -> tuple[int, ...]:
    """The permutation of napari-order volume axes that lines them up with the world axes.

    Layer axis ``w`` shows volume axis ``axes[w]``: the assignment that maximises the summed
    ``|direction cosine|`` between layer axis ``w`` and world axis ``w`` (``(S, A, R)``).
    Identity for axial (and axial-oblique) volumes; the stable first choice on ties.
    """
    from itertools import permutations

    lin = napari_matrix(affine, ndim)[:ndim, :ndim]
    cosines = np.abs(lin / np.linalg.norm(lin, axis=0))
    identity = tuple(range(ndim))
    best = max(permutations(range(ndim)), key=lambda p: (round(sum(cosines[w, p[w]] for w in range(ndim)), 9),
                                                           p == identity))
    return tuple(int(a) for a in best)


def layer_transform(affine: np.ndarray, spacing: Sequence[float], axes: Sequence[int] | None = None) -> dict:
    """napari layer keyword arguments that place a volume in world space.

    Args:
        affine: 4x4 voxel-to-RAS+ matrix of the volume.
        spacing: Voxel size per spatial axis, napari order (2 or 3 entries).
        axes: The layer shows ``np.transpose(volume.data, axes)`` (see :func:`display_axes`);
            ``None`` for the volume's own order.

    Returns:
        ``{"scale", "translate", "affine"}``: with these, ``layer.data_to_world(v)`` equals
        :func:`voxel_to_world` of the volume voxel that layer voxel ``v`` shows, for any affine,
        shear included.
    """
    n = len(spacing)
    axes = tuple(range(n)) if axes is None else tuple(axes)
    full = napari_matrix(affine, n)
    full[:n, :n] = full[:n, :n][:, list(axes)]
    scale = np.asarray([float(spacing[a]) for a in axes])
    translate = full[:n, n].copy()
    inner = np.eye(n + 1)
    inner[:n, :n] = np.diag(scale)
    inner[:n, n] = translate
    rest = full @ np.linalg.inv(inner)
    rest[np.abs(rest) < 1e-12] = 0.0
    rest[n, :] = 0.0
    rest[n, n] = 1.0
    return {
        "scale": tuple(float(s) for s in scale),
        "translate": tuple(float(t) for t in translate),
        "affine": rest,
    }


def voxel_to_world(affine: np.ndarray, voxel_napari: Sequence[float]) -> np.ndarray:
    """World ``(S, A, R)`` coordinate of a napari-order voxel index, from a RAS+ ``affine``."""
    v = np.asarray(voxel_napari, dtype=np.float64)
    n = v.size
    return (napari_matrix(affine, n) @ np.append(v, 1.0))[:n]


def check_affine(affine: np.ndarray, what: str) -> np.ndarray:
    """Return ``affine`` as float64 4x4 or raise ``ValueError`` if it is not finite and invertible."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: the voxel-to-world matrix must be a finite 4x4 matrix")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"{what}: the voxel-to-world matrix is singular (an axis has no direction)")
    return a


def to_volume_order(data: np.ndarray, geometry: dict | None) -> tuple[np.ndarray, dict | None]:
    """Undo a layer's axis permutation: ``(data in volume order, geometry without "layer_axes")``.

    A geometry that carries ``"layer_axes"`` (layer metadata) comes with layer-order data; its
    spatial axes (the last ones; a leading channel axis stays first) are transposed back.
    Anything else passes through unchanged.
    """
    if not isinstance(geometry, dict) or "layer_axes" not in geometry:
        return data, geometry
    axes = [int(a) for a in geometry["layer_axes"]]
    geometry = {k: v for k, v in geometry.items() if k != "layer_axes"}
    data = np.asarray(data)
    n = len(axes)
    if sorted(axes) != list(range(n)) or data.ndim < n:
        raise ValueError(f"layer_axes {axes} do not fit data of shape {data.shape}")
    inverse = list(np.argsort(axes))
    lead = list(range(data.ndim - n))
    return np.transpose(data, lead + [len(lead) + a for a in inverse]), geometry


def to_layer_order(data: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """``data`` (volume order, optional leading channel axis) as the layer shows it (a view)."""
    n = len(axes)
    lead = list(range(data.ndim - n))
    return np.transpose(data, lead + [len(lead) + int(a) for a in axes])
