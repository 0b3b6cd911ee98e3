"""napari reader hook (npe2): NIfTI, NRRD, MetaImage, DICOM series (folders or files) and DICOM-SEG.

``napari_get_reader(path)`` returns :func:`read_layers` for a readable file (by name: ``.nii``,
``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, ``.dcm``; or by the DICOM magic), a folder
holding DICOM files, or a list of them; ``None`` for anything else. It never raises. The reader
function returns napari layer data tuples (no napari import needed):

- every layer is placed in world space: ``scale`` = voxel spacing, ``translate`` = the world
  position of voxel 0, ``affine`` = the rotation/flips/shear (see :mod:`napari_medseg.io.world`),
  so ``layer.data_to_world(voxel)`` is the file's RAS+ coordinate in ``(S, A, R)`` order and layers
  from different files, formats and orientations of one patient overlay;
- ``metadata = {"medseg_geometry": <plain geometry dict>, "medseg_source": <path>}`` so that the
  writer can put a label map back on the source grid (and write DICOM-SEG for DICOM sources);
- a DICOM folder gives one layer per series, named by ``SeriesDescription``; DICOM-SEG files give
  Labels layers with ``metadata["medseg_label_names"]``; a series that cannot be read is skipped
  with a warning (napari shows it) while the others open;
- a corrupt file makes the reader function raise a :class:`~napari_medseg.io.VolumeError`
  (:class:`~napari_medseg.io.NiftiError` for NIfTI) with a clear message.

**Label rule.** A file opens as a Labels layer when it is a DICOM-SEG, or when any of these holds
and its voxels are integers (or integral floats, which are converted):

1. it lies in a ``labelsTr`` or ``labelsTs`` folder (nnU-Net raw layout);
2. its file name (lower case) contains ``_seg``, ``seg.``, ``label``, ``mask`` or ``aal``;
3. its header intent is ``NIFTI_INTENT_LABEL`` (1002), as this plugin's label writer sets;
4. its on-disk type is integer, it has at most 256 distinct values (checked on a strided
   subsample first, then on all voxels), and it is piecewise constant: at least half of the
   neighbouring voxel pairs that touch a non-zero voxel are equal. The last test keeps
   8-bit scans (which always have <= 256 values) as images.

DICOM image series always open as images. Everything else opens as an Image layer.

**Intensity window.** An image opens with a radiology window instead of napari's min..max
(``contrast_limits``, and its name in ``metadata["medseg_window"]``): a CT (DICOM modality ``CT``,
or, without a modality, Hounsfield units: at least 2 % of the voxels are air, -1100..-900) with the
soft-tissue window W400/L40; anything else (MR) with its 1st..99th percentile. :data:`WINDOW_PRESETS`
and :func:`window_limits` are the presets the Display widget offers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from napari_medseg.io import (
    VOLUME_EXTENSIONS,
    NiftiError,
    Volume,
    VolumeError,
    geometry_from_volume,
    is_volume_path,
    layer_transform,
    read_dicom_series,
    read_volume,
    volume_format,
    volume_stem,
)
from napari_medseg.io.world import display_axes, to_layer_order

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]
LABEL_FOLDERS = ("labelstr", "labelsts")
LABEL_NAME_HINTS = ("_seg", "seg.", "label", "mask", "aal")
MAX_LABEL_VALUES = 256
MIN_EQUAL_NEIGHBOURS = 0.5
#: The ``filename_patterns`` of the manifest's reader (folders are accepted too).
FILE_PATTERNS = tuple(f"*{ext}" for ext in VOLUME_EXTENSIONS)

#: Radiology windows: name -> (width, level), in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "CT soft tissue": (400.0, 40.0),
    "CT lung": (1500.0, -600.0),
    "CT bone": (2000.0, 300.0),
    "CT brain": (80.0, 40.0),
}
#: The window of anything that is not CT: these percentiles of the voxel values.
PERCENTILE_WINDOW = "MR 1-99 %"
PERCENTILES = (1.0, 99.0)
CT_DEFAULT_WINDOW = "CT soft tissue"
#: CT without a modality: at least this fraction of the voxels lies in the air band (HU).
AIR_BAND = (-1100.0, -900.0)
MIN_AIR_FRACTION = 0.02
_MAX_SAMPLES = 2**20


def window_limits(width: float, level: float) -> tuple[float, float]:
    """``(low, high)`` contrast limits of a window of ``width`` centred on ``level``."""
    return float(level) - float(width) / 2, float(level) + float(width) / 2


def _sample(data: np.ndarray) -> np.ndarray:
    """Finite voxel values of ``data``, strided down to about a million."""
    arr = np.asarray(data)
    stride = max(1, int(np.ceil((arr.size / _MAX_SAMPLES) ** (1 / max(arr.ndim, 1)))))
    sub = np.asarray(arr[(slice(None, None, stride),) * arr.ndim], dtype=np.float64).ravel()
    return sub[np.isfinite(sub)]


def percentile_limits(data: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> tuple[float, float] | None:
    """The ``percentiles`` of the voxel values (``None`` for an empty or constant image); a window
    that would be empty (most voxels equal) widens to the maximum."""
    values = _sample(data)
    if values.size == 0:
        return None
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if hi <= lo:
        hi = float(values.max())
    return (lo, hi) if hi > lo else None


def looks_like_ct(data: np.ndarray, modality: str | None = None) -> bool:
    """CT by its DICOM modality; without one, by Hounsfield units (enough voxels of air)."""
    if modality:
        return modality.upper() == "CT"
    values = _sample(data)
    if values.size == 0:
        return False
    air = np.count_nonzero((values >= AIR_BAND[0]) & (values <= AIR_BAND[1]))
    return air / values.size >= MIN_AIR_FRACTION


def default_window(data: np.ndarray, modality: str | None = None) -> tuple[str, tuple[float, float]] | None:
    """The window an image opens with: ``(name, (low, high))``, or ``None`` (napari's default)."""
    if looks_like_ct(data, modality):
        return CT_DEFAULT_WINDOW, window_limits(*WINDOW_PRESETS[CT_DEFAULT_WINDOW])
    limits = percentile_limits(data)
    return (PERCENTILE_WINDOW, limits) if limits is not None else None


def _modality(vol: Volume) -> str | None:
    dicom = vol.header.get("dicom")
    modality = dicom.get("modality") if isinstance(dicom, dict) else None
    return str(modality) if modality else None


def _acceptable(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = os.fspath(path)
    return isinstance(p, str) and is_volume_path(p)


def napari_get_reader(path: Any) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_layers` when every path is a readable volume file or DICOM folder, else ``None``."""
    try:
        paths = list(path) if isinstance(path, (list, tuple)) else [path]
        if paths and all(_acceptable(p) for p in paths):
            return read_layers
    except Exception:  # a reader hook must never raise
        logger.debug("napari_get_reader(%r) failed", path, exc_info=True)
    return None


def layer_name(path: str) -> str:
    """File (or folder) name without its volume extension."""
    return volume_stem(path)


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
    if vol.header.get("format") == "dicom":
        return "seg" in (vol.header.get("dicom") or {})
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


def _default_name(vol: Volume) -> str:
    if vol.header.get("format") == "dicom":
        from napari_medseg.io.dicom import dicom_volume_name

        return dicom_volume_name(vol)
    return layer_name(vol.path) if vol.path else "volume"


def _warn_shear(vol: Volume) -> None:
    """Warn when the affine has shear (non-orthogonal voxel axes): scanners do not store that, so it
    is usually a damaged or hand-made header. napari places the layer with the shear; files saved
    from it keep the original affine."""
    m = np.asarray(vol.affine, dtype=np.float64)[:3, :3]
    cols = np.linalg.norm(m, axis=0)
    if not np.all(cols > 0):
        return
    gram = (m / cols).T @ (m / cols)
    shear = float(np.max(np.abs(gram - np.eye(3))))
    if shear > 1e-3:
        logger.warning(
            "%s: the affine has shear (largest off-diagonal of the direction cosines' Gram matrix %.3g): "
            "the voxel axes are not perpendicular, which scanners do not produce; check the header. "
            "napari shows it sheared, and files saved from it keep the original affine",
            vol.path, shear,
        )


def volume_to_layer_data(vol: Volume, *, as_labels: bool | None = None, name: str | None = None) -> list[LayerData]:
    """Turn a :class:`Volume` into napari layer data tuples (image or labels) placed in world space.

    A volume whose axes are permuted against the world axes (coronal or sagittal acquisitions)
    is shown through a transposed view, ``np.transpose(vol.data, axes)``, so that napari's 2D view
    can draw it; ``metadata["medseg_geometry"]["layer_axes"]`` records ``axes`` and the writers
    transpose back (:mod:`napari_medseg.io.world`).

    Args:
        vol: The volume; its geometry goes into ``metadata["medseg_geometry"]``.
        as_labels: Force a Labels (``True``) or Image (``False``) layer; ``None`` applies the rule.
        name: Layer name; defaults to the file name (the series description for DICOM).
    """
    path = vol.path or ""
    if vol.ndim_spatial == 3:
        _warn_shear(vol)
    name = name or _default_name(vol)
    labels = is_label_volume(vol) if as_labels is None else as_labels
    axes = display_axes(vol.affine, vol.ndim_spatial)
    geometry = geometry_from_volume(vol)
    geometry["layer_axes"] = list(axes)
    meta: dict[str, Any] = {"medseg_geometry": geometry, "medseg_source": path}
    names = vol.header.get("label_names")
    if isinstance(names, dict) and names:
        meta["medseg_label_names"] = {0: "background", **{int(k): str(v) for k, v in names.items()}}
    kwargs: dict[str, Any] = {"name": name, "metadata": meta, **layer_transform(vol.affine, vol.spacing, axes)}
    data = to_layer_order(vol.data, axes)
    if labels:
        return [(np.ascontiguousarray(_as_label_array(data)), kwargs, "labels")]
    if vol.channel_axis == 0:
        n = vol.num_channels
        windows = [default_window(data[c], _modality(vol)) for c in range(n)]
        kwargs["channel_axis"] = 0
        kwargs["name"] = [f"{name} [{c}]" for c in range(n)]
        kwargs["metadata"] = [dict(meta, medseg_channel=c) for c in range(n)]
        if all(w is not None for w in windows):
            kwargs["contrast_limits"] = [list(w[1]) for w in windows]
            for c, w in enumerate(windows):
                kwargs["metadata"][c]["medseg_window"] = w[0]
        return [(data, kwargs, "image")]
    window = default_window(data, _modality(vol)) if data.dtype.kind in "biuf" else None
    if window is not None:
        kwargs["contrast_limits"] = list(window[1])
        meta["medseg_window"] = window[0]
    return [(data, kwargs, "image")]


def _unique_names(layers: list[LayerData]) -> list[LayerData]:
    seen: dict[str, int] = {}
    for _data, kwargs, _kind in layers:
        if isinstance(kwargs["name"], str):
            count = seen.get(kwargs["name"], 0)
            seen[kwargs["name"]] = count + 1
            if count:
                kwargs["name"] = f"{kwargs['name']} ({count + 1})"
    return layers


def read_layers(path: str | os.PathLike | list) -> list[LayerData]:
    """Read files and DICOM folders into layer data tuples.

    DICOM files given together (a list) are grouped into their series; a single DICOM file opens
    its whole series (its siblings in the folder); a folder opens every series it holds.

    Raises:
        VolumeError: A file is corrupt or unsupported, or no series of a DICOM folder could be read
            (the message names the file and the problem).
    """
    paths = [os.fspath(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    dicom_files = [p for p in paths if os.path.isfile(p) and volume_format(p) == "dicom"]
    layers: list[LayerData] = []
    for p in paths:
        if p in dicom_files:
            continue
        if os.path.isdir(p):
            for vol in read_dicom_series(p):
                layers.extend(volume_to_layer_data(vol))
        else:
            layers.extend(volume_to_layer_data(read_volume(p)))
    if len(dicom_files) == 1:
        layers.extend(volume_to_layer_data(read_volume(dicom_files[0])))
    elif dicom_files:
        for vol in read_dicom_series(dicom_files):
            layers.extend(volume_to_layer_data(vol))
    return _unique_names(layers)


#: The previous name of :func:`read_layers` (it read NIfTI only).
read_nifti_layers = read_layers

__all__ = ["FILE_PATTERNS", "PERCENTILE_WINDOW", "WINDOW_PRESETS", "NiftiError", "VolumeError", "default_window",
           "is_label_volume", "looks_like_ct", "napari_get_reader", "percentile_limits", "read_layers",
           "read_nifti_layers", "volume_to_layer_data", "window_limits"]
