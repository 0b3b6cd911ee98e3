"""napari writer hooks (npe2): save one Labels or Image layer as NIfTI, NRRD, MetaImage or DICOM-SEG.

The format follows the file name (``.nii.gz``/``.nii``, ``.nrrd``, ``.mha``/``.mhd``; ``.dcm`` writes
a DICOM-SEG, for Labels layers on a DICOM series' grid). The geometry comes from
``metadata["medseg_geometry"]`` when the layer has it (layers opened by this plugin, or made from
them by the widgets) and its grid matches the layer data: the source geometry is written back
exactly (for NIfTI the same qform/sform and codes; for NRRD the same space, directions, origin and
measurement frame; for DICOM-SEG references to the source series). Otherwise the voxel-to-world
matrix is the layer's own napari transform (``scale``, ``translate``, ``rotate``, ``shear`` and
``affine``; napari order, world axes taken as ``(S, A, R)``; see :mod:`napari_medseg.io.world`).
Label names for DICOM-SEG segments come from ``metadata["medseg_label_names"]``. No napari import.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from napari_medseg.io import VolumeError, affine_from_napari, write_volume

logger = logging.getLogger(__name__)


def _shear_matrix(shear: Any, n: int) -> np.ndarray:
    arr = np.asarray(shear if shear is not None else [], dtype=np.float64)
    if arr.ndim == 2:
        return arr[-n:, -n:]
    full_n = int(round((1 + np.sqrt(1 + 8 * arr.size)) / 2)) if arr.size else n
    mat = np.eye(full_n)
    mat[np.triu(np.ones((full_n, full_n), bool), 1)] = arr
    return mat[-n:, -n:]


def layer_world_matrix(meta: dict, n: int) -> np.ndarray:
    """The layer's data-to-world matrix over its last ``n`` axes (napari order), from its state dict."""
    scale = np.asarray(meta.get("scale") if meta.get("scale") is not None else np.ones(n), float)[-n:]
    translate = np.asarray(meta.get("translate") if meta.get("translate") is not None else np.zeros(n), float)[-n:]
    rotate = np.asarray(meta.get("rotate") if meta.get("rotate") is not None else np.eye(n), float)
    rotate = rotate[-n:, -n:] if rotate.ndim == 2 else np.eye(n)
    inner = np.eye(n + 1)
    inner[:n, :n] = rotate @ _shear_matrix(meta.get("shear"), n) @ np.diag(scale)
    inner[:n, n] = translate
    outer = np.asarray(meta.get("affine") if meta.get("affine") is not None else np.eye(n + 1), float)
    outer = np.block([[outer[-(n + 1):-1, -(n + 1):-1], outer[-(n + 1):-1, -1:]], [np.zeros((1, n)), np.ones((1, 1))]])
    return outer @ inner


def _geometry_for(data: np.ndarray, meta: dict, path: str) -> dict | None:
    geom = (meta.get("metadata") or {}).get("medseg_geometry")
    if not isinstance(geom, dict) or "affine" not in geom:
        return None
    grid = geom.get("spatial_shape")
    axes = geom.get("layer_axes")
    if grid is not None and axes is not None and sorted(axes) == list(range(len(grid))):
        grid = [grid[a] for a in axes]  # the layer shows the source grid transposed
    if grid is not None and tuple(grid) != tuple(data.shape[-len(grid) :]):
        logger.warning(
            "%s: layer shape %s does not match its source grid %s; using the layer's own transform",
            path, data.shape, tuple(grid),
        )
        return None
    return geom


def _label_names(meta: dict) -> dict[int, str] | None:
    names = (meta.get("metadata") or {}).get("medseg_label_names")
    if not isinstance(names, dict):
        return None
    out = {}
    for key, value in names.items():
        try:
            out[int(key)] = str(value)
        except (TypeError, ValueError):
            continue
    return out


def _write_layer(path: str, data: Any, meta: dict, *, is_label: bool) -> list[str]:
    if meta.get("multiscale") or isinstance(data, list):
        raise VolumeError(f"{path}: multiscale layers cannot be saved by napari-medseg; save one level")
    if meta.get("rgb"):
        raise VolumeError(f"{path}: RGB layers cannot be saved by napari-medseg (medical scans are greyscale)")
    arr = np.asarray(data)
    nsp = min(arr.ndim, 3)
    geom = _geometry_for(arr, meta, path)
    world = layer_world_matrix(meta, nsp)
    if geom is not None:
        affine = np.asarray(geom["affine"], float)
        axes = geom.get("layer_axes") or list(range(nsp))
        if nsp == 3 and len(axes) == 3:
            volume_world = world.copy()
            volume_world[:3, :3] = world[:3, :3][:, list(np.argsort(axes))]
            if not np.allclose(affine_from_napari(volume_world), affine, atol=1e-3):
                logger.warning("%s: the layer was moved in napari; the file keeps the source geometry", path)
    else:
        affine = affine_from_napari(world)
        spacing = [float(v) for v in np.linalg.norm(world[:nsp, :nsp], axis=0)]
        geom = {"affine": affine.tolist(), "spacing": spacing, "xyzt_units": 2,
                "spatial_shape": [int(s) for s in arr.shape[-nsp:]]}
    return [write_volume(path, arr, geom, is_label=is_label, label_names=_label_names(meta))]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer (integer labels; DICOM-SEG for ``.dcm`` names)."""
    return _write_layer(path, data, meta, is_label=True)


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Write an Image layer (float32 for floating data, else its integer type)."""
    return _write_layer(path, data, meta, is_label=False)
