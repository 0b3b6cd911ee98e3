"""napari reader hook (npe2) for NIfTI volumes (``.nii``, ``.nii.gz``).

``napari_get_reader(path)`` returns a reader function for one NIfTI file or a list of them, and
``None`` for anything else (other extensions, folders, missing files, mixed lists); it never
raises. The reader function returns napari layer data tuples (no napari import needed):

- images: ``scale`` = voxel spacing and ``translate`` = the affine's origin, both napari order;
  4D files give one image layer per channel (``channel_axis=0``);
- ``metadata = {"medseg_geometry": <plain geometry dict>, "medseg_source": <path>}`` so that the
  writer can put a label map back on the source grid;
- a corrupt file makes the reader function raise :class:`~napari_medseg.io.NiftiError` with a
  clear message (napari shows it as a notification).

**Label rule.** A file opens as a Labels layer when any of these holds and its voxels are
integers (or integral floats, which are converted):

1. it lies in a ``labelsTr`` or ``labelsTs`` folder (nnU-Net raw layout);
2. its file name (lower case) contains ``_seg``, ``seg.``, ``label``, ``mask`` or ``aal``;
3. its header intent is ``NIFTI_INTENT_LABEL`` (1002), as this plugin's label writer sets;
4. its on-disk type is integer, it has at most 256 distinct values (checked on a strided
   subsample first, then on all voxels), and it is piecewise constant: at least half of the
   neighbouring voxel pairs that touch a non-zero voxel are equal. The last test keeps
   8-bit scans (which always have <= 256 values) as images.

Otherwise it opens as an Image layer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from napari_medseg.io import NiftiError, Volume, geometry_from_volume, is_nifti_path, read_nifti

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]
LABEL_FOLDERS = ("labelstr", "labelsts")
LABEL_NAME_HINTS = ("_seg", "seg.", "label", "mask", "aal")
MAX_LABEL_VALUES = 256
MIN_EQUAL_NEIGHBOURS = 0.5


def _acceptable(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = os.fspath(path)
    return isinstance(p, str) and is_nifti_path(p) and os.path.isfile(p)


def napari_get_reader(path: Any) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_nifti_layers` when every path is an existing NIfTI file, else ``None``."""
    try:
        paths = list(path) if isinstance(path, (list, tuple)) else [path]
        if paths and all(_acceptable(p) for p in paths):
            return read_nifti_layers
    except Exception:  # a reader hook must never raise
        logger.debug("napari_get_reader(%r) failed", path, exc_info=True)
    return None


def layer_name(path: str) -> str:
    """File name without ``.nii``/``.nii.gz``."""
    base = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _piecewise_constant(data: np.ndarray) -> bool:
    """Fraction of equal neighbour pairs (touching a non-zero voxel) along the last axis."""
    step = max(1, data.shape[0] // 32) if data.ndim == 3 else 1
    sub = data[::step] if data.ndim == 3 else data
    a, b = sub[..., :-1], sub[..., 1:]
    touching = (a != 0) | (b != 0)
    n = int(np.count_nonzero(touching))
    if n == 0:
        return True
    return np.count_nonzero((a == b) & touching) / n >= MIN_EQUAL_NEIGHBOURS


def _few_values(data: np.ndarray) -> bool:
    stride = max(1, round((data.size / 2**20) ** (1 / data.ndim)))
    sub = data[(slice(None, None, stride),) * data.ndim]
    if np.unique(sub).size > MAX_LABEL_VALUES:
        return False
    if data.dtype.kind in "iu" and data.min() >= 0 and data.max() < 2**16:
        return int(np.count_nonzero(np.bincount(data.ravel()))) <= MAX_LABEL_VALUES
    return np.unique(data).size <= MAX_LABEL_VALUES


def is_label_volume(vol: Volume) -> bool:
    """Apply the label rule of this module's docstring to a volume read from ``vol.path``."""
    if vol.channel_axis is not None:
        return False
    path = vol.path or ""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path))).lower() if path else ""
    name = os.path.basename(path).lower()
    hinted = folder in LABEL_FOLDERS or any(h in name for h in LABEL_NAME_HINTS)
    hinted = hinted or vol.header.get("intent_code") == 1002
    data = vol.data
    if data.dtype.kind == "f":
        if not hinted:
            return False
        if not (np.all(np.isfinite(data)) and np.array_equal(data, np.round(data))):
            logger.warning("%s: named like a label map but has non-integer values; opening as image", path)
            return False
        return True
    if hinted:
        return True
    if data.dtype.kind not in "biu":
        return False
    return _few_values(data) and _piecewise_constant(data)


def _as_label_array(data: np.ndarray) -> np.ndarray:
    if data.dtype.kind in "iu":
        return data
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    for dt in (np.uint8, np.uint16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return data.astype(dt)
    return data.astype(np.int64)


def _warn_oblique(vol: Volume) -> None:
    """Warn when the affine has shear (non-orthogonal axes): napari shows the grid axis-aligned (scale and
    translate only), while files written back keep the original affine."""
    m = np.asarray(vol.affine, dtype=np.float64)[:3, :3]
    cols = np.linalg.norm(m, axis=0)
    if not np.all(cols > 0):
        return
    gram = (m / cols).T @ (m / cols)
    shear = float(np.max(np.abs(gram - np.eye(3))))
    if shear > 1e-3:
        logger.warning(
            "%s: the affine has shear (largest off-diagonal of the direction cosines' Gram matrix %.3g); "
            "napari shows the voxel grid without it, and label files saved from it keep the original affine",
            vol.path, shear,
        )


def volume_to_layer_data(vol: Volume, *, as_labels: bool | None = None, name: str | None = None) -> list[LayerData]:
    """Turn a :class:`Volume` into napari layer data tuples (image or labels).

    Args:
        vol: The volume; its geometry goes into ``metadata["medseg_geometry"]``.
        as_labels: Force a Labels (``True``) or Image (``False``) layer; ``None`` applies the rule.
        name: Layer name; defaults to the file name.
    """
    path = vol.path or ""
    name = name or (layer_name(path) if path else "volume")
    _warn_oblique(vol)
    labels = is_label_volume(vol) if as_labels is None else as_labels
    meta = {"medseg_geometry": geometry_from_volume(vol), "medseg_source": path}
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": tuple(vol.spacing),
        "translate": tuple(vol.translate),
        "metadata": meta,
    }
    if labels:
        return [(_as_label_array(vol.data), kwargs, "labels")]
    if vol.channel_axis == 0:
        n = vol.num_channels
        kwargs["channel_axis"] = 0
        kwargs["name"] = [f"{name} [{c}]" for c in range(n)]
        kwargs["metadata"] = [dict(meta, medseg_channel=c) for c in range(n)]
    return [(vol.data, kwargs, "image")]


def read_nifti_layers(path: str | os.PathLike | list) -> list[LayerData]:
    """Read one or more NIfTI files into layer data tuples.

    Raises:
        NiftiError: A file is corrupt or unsupported (the message names it).
    """
    paths = path if isinstance(path, (list, tuple)) else [path]
    layers: list[LayerData] = []
    for p in paths:
        vol = read_nifti(p)
        layers.extend(volume_to_layer_data(vol))
    return layers


__all__ = ["NiftiError", "napari_get_reader", "read_nifti_layers", "volume_to_layer_data", "is_label_volume"]
