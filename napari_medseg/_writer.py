"""napari writer hooks (npe2): save one Labels or Image layer as ``.nii.gz``/``.nii``.

The geometry comes from ``metadata["medseg_geometry"]`` when the layer has it (layers opened by
this plugin, or made from them by the widgets) and its grid matches the layer data; the written
file then carries the source affine, qform and sform (matrices and codes) and zooms unchanged, so it
overlays the source scan in any other viewer. Otherwise the affine is built from the layer's
``scale`` and ``translate`` (napari order; see :func:`napari_medseg.io.affine_from_spacing`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from napari_medseg.io import NiftiError, write_nifti

logger = logging.getLogger(__name__)


def _geometry_for(data: np.ndarray, meta: dict, path: str) -> dict | None:
    geom = (meta.get("metadata") or {}).get("medseg_geometry")
    if not isinstance(geom, dict) or "affine" not in geom:
        return None
    grid = geom.get("spatial_shape")
    if grid is not None and tuple(grid) != tuple(data.shape[-len(grid) :]):
        logger.warning(
            "%s: layer shape %s does not match its source grid %s; using the layer scale/translate",
            path, data.shape, tuple(grid),
        )
        return None
    return geom


def _write_layer(path: str, data: Any, meta: dict, *, is_label: bool) -> list[str]:
    if meta.get("multiscale") or isinstance(data, list):
        raise NiftiError(f"{path}: multiscale layers cannot be saved as NIfTI; save one level")
    if meta.get("rgb"):
        raise NiftiError(f"{path}: RGB layers cannot be saved as NIfTI by napari-medseg")
    arr = np.asarray(data)
    geom = _geometry_for(arr, meta, path)
    nsp = min(arr.ndim, 3)
    scale = meta.get("scale")
    translate = meta.get("translate")
    spacing = tuple(scale[-nsp:]) if scale is not None else None
    origin = tuple(translate[-nsp:]) if translate is not None else None
    if geom is not None:
        return [write_nifti(path, arr, geom, is_label=is_label)]
    return [write_nifti(path, arr, spacing=spacing, translate=origin, is_label=is_label)]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as an integer NIfTI (uint8/uint16/int32 as the values need)."""
    return _write_layer(path, data, meta, is_label=True)


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Write an Image layer as a NIfTI (float32 for floating data, else its integer type)."""
    return _write_layer(path, data, meta, is_label=False)
