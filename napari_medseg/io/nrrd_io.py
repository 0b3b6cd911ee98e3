"""NRRD (``.nrrd``, detached ``.nhdr``) <-> :class:`Volume`, with pynrrd (pure Python).

Reading: the header is read and checked first (dimension, sizes against ``MAX_VOXELS``, the bytes
the data file can hold), then the voxels. Spatial axes are those with a ``space directions``
vector; their vectors (in the file's ``space``: RAS, LAS, LPS, or a non-anatomical 3D space taken
as RAS) and the ``space origin`` give the RAS+ affine. A file without ``space directions`` uses
``spacings`` (axis-aligned, origin 0). One non-spatial axis (``kinds`` list/vector/time...) becomes
the channel axis. ``header["nrrd"]`` keeps the space, directions and origin as written in the file,
the measurement frame, kinds and space units.

Writing (``.nrrd``, gzip, atomic): a geometry from an NRRD file whose affine is unchanged is written
back field for field (same space, directions, origin, measurement frame, units); any other geometry
is written in the source NRRD's space, else LPS (3D Slicer's and ITK's choice).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from ._dtypes import image_dtype, label_dtype
from .atomic import AtomicWriteError, atomic_path
from .limits import check_memory
from .nifti import MAX_DEFLATE_RATIO, MAX_VOXELS
from .volume import (
    Volume,
    VolumeError,
    affine_from_spacing,
    foreign_errors_as,
    geometry_from_volume,
)

logger = logging.getLogger(__name__)

__all__ = ["NRRD_EXTENSIONS", "read_nrrd", "write_nrrd"]

NRRD_EXTENSIONS = (".nrrd", ".nhdr")
SPACE_TO_RAS = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
    "scanner-xyz": (1, 1, 1), "3d-right-handed": (1, 1, 1), "3d-left-handed": (1, 1, 1),
}
ANATOMICAL = ("right-anterior-superior", "left-anterior-superior", "left-posterior-superior")
_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)


def _flips(header: dict, path: str) -> np.ndarray:
    space = str(header.get("space", "") or "").lower()
    if not space:
        if "space directions" in header:
            logger.info("%s: no 'space' field; the space directions are taken as RAS", path)
        return np.ones(3)
    if space not in SPACE_TO_RAS:
        raise VolumeError(f"{path}: NRRD space '{space}' is not supported (RAS, LAS, LPS or a 3D space)")
    if space not in ANATOMICAL and space not in ("ras", "las", "lps"):
        logger.warning("%s: NRRD space '%s' is not anatomical; its axes are taken as RAS", path, space)
    return np.asarray(SPACE_TO_RAS[space], dtype=np.float64)


def _check_size(header: dict, fh, path: str) -> None:
    sizes = [int(s) for s in header["sizes"]]
    if any(s <= 0 for s in sizes):
        raise VolumeError(f"{path}: a dimension has size zero or less (sizes {sizes})")
    nvox = int(np.prod(np.asarray(sizes, dtype=object)))
    if nvox > MAX_VOXELS:
        raise VolumeError(f"{path}: header announces {nvox} voxels, more than the {MAX_VOXELS} accepted")
    try:
        import nrrd.reader

        itemsize = nrrd.reader._determine_datatype(header).itemsize
    except Exception:  # noqa: BLE001 - a private helper of pynrrd; its own error comes with the read
        itemsize = 1
    data_file = header.get("data file") or header.get("datafile")
    if data_file:
        target = data_file if os.path.isabs(data_file) else os.path.join(os.path.dirname(path), data_file)
        if not os.path.isfile(target):
            raise VolumeError(f"{path}: the detached data file {target} is missing")
        have = os.path.getsize(target)
    else:
        have = os.path.getsize(path) - fh.tell()
    need = nvox * itemsize
    encoding = str(header.get("encoding", "raw")).lower()
    if encoding == "raw" and have < need:
        raise VolumeError(f"{path}: file is truncated: {need} data bytes announced, {have} present")
    if encoding in ("gzip", "gz", "bzip2", "bz2") and need > MAX_DEFLATE_RATIO * max(have, 1):
        raise VolumeError(f"{path}: file is truncated or its header is corrupt: {have} compressed bytes "
                          f"cannot hold the {need} bytes announced")
    # pynrrd's decoded buffer plus the array (and its float32 copy): about three times the voxels
    check_memory(3 * need, f"{path}: reading {' x '.join(map(str, sizes))} voxels", VolumeError)


def _axes(header: dict, path: str) -> tuple[list[int], int | None, np.ndarray]:
    """Spatial file axes, the channel file axis, and each spatial axis' vector (file space)."""
    dim = int(header["dimension"])
    if "space directions" in header:
        dirs = np.asarray(header["space directions"], dtype=np.float64)
        spatial = [a for a in range(dim) if np.all(np.isfinite(dirs[a]))]
        vectors = dirs[spatial]
    else:
        spacings = np.asarray(header.get("spacings", [1.0] * dim), dtype=np.float64)
        spatial = [a for a in range(dim) if np.isfinite(spacings[a])]
        vectors = np.diag(np.abs(spacings[spatial]))
    others = [a for a in range(dim) if a not in spatial]
    if len(spatial) not in (2, 3) or len(others) > 1 or (others and len(spatial) != 3):
        raise VolumeError(f"{path}: NRRD with {len(spatial)} spatial and {len(others)} other axes is not "
                          "supported (2D, 3D, or 3D plus one channel axis)")
    if vectors.shape[1] == 2:
        vectors = np.pad(vectors, ((0, 0), (0, 1)))
    if vectors.shape[1] != 3:
        raise VolumeError(f"{path}: space dimension {vectors.shape[1]} is not supported (2 or 3)")
    return spatial, (others[0] if others else None), vectors


def _affine(vectors: np.ndarray, origin: np.ndarray, flips: np.ndarray, path: str) -> np.ndarray:
    aff = np.eye(4)
    for m, v in enumerate(vectors):
        aff[:3, m] = flips * v
    if len(vectors) == 2:
        normal = np.cross(aff[:3, 0], aff[:3, 1])
        aff[:3, 2] = normal / (np.linalg.norm(normal) or 1.0)
    aff[:3, 3] = flips * origin
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: space directions/origin are not finite or not independent")
    return aff


def _plain(value):
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@foreign_errors_as("the NRRD file")
def read_nrrd(path: str | os.PathLike) -> Volume:
    """Read a ``.nrrd``/``.nhdr`` file (napari order, RAS+ affine; see the module docstring).

    Raises:
        VolumeError: missing, not NRRD, truncated or corrupt, unsupported axes or space.
    """
    import nrrd

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VolumeError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            _check_size(header, fh, path)
            spatial, channel, vectors = _axes(header, path)
            data = nrrd.read_data(header, fh, path, index_order="C")
    except VolumeError:
        raise
    except (nrrd.NRRDError, *_ERRORS) as exc:
        raise VolumeError(f"{path}: not a readable NRRD file ({type(exc).__name__}: {exc})") from exc
    dim = int(header["dimension"])
    if channel is not None:  # file axis a is array axis dim-1-a (C order)
        data = np.moveaxis(data, dim - 1 - channel, 0)
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    elif data.dtype.kind not in "biuf":
        raise VolumeError(f"{path}: voxel type {data.dtype} is not supported")
    origin = np.asarray(header.get("space origin", np.zeros(vectors.shape[1])), dtype=np.float64)
    origin = np.pad(origin, (0, 3 - origin.size)) if origin.size < 3 else origin
    affine = _affine(vectors, origin, _flips(header, path), path)
    spacing = tuple(float(np.linalg.norm(v)) for v in vectors[::-1])
    fields = {"space": header.get("space"), "space_directions": _plain(header.get("space directions")),
              "space_origin": _plain(header.get("space origin")), "kinds": header.get("kinds"),
              "measurement_frame": _plain(header.get("measurement frame")), "space_units": header.get("space units"),
              "channel_file_axis": channel, "spatial_file_axes": spatial}
    geom = {"format": "nrrd", "dtype": str(header.get("type")), "nrrd": fields}
    vol = Volume(np.ascontiguousarray(data), spacing, affine, geom, 0 if channel is not None else None, path)
    vol.header = geometry_from_volume(vol)
    return vol


def _stored_fields(geom: dict, nsp: int) -> dict | None:
    """The source NRRD's fields when they still describe ``geom["affine"]``."""
    fields = geom.get("nrrd") if geom.get("format") == "nrrd" else None
    if not fields or not fields.get("space_directions") or len(fields.get("spatial_file_axes") or []) != nsp:
        return None
    dirs = np.array([[np.nan if v is None else v for v in row] for row in fields["space_directions"]], float)
    vectors = dirs[fields["spatial_file_axes"]]
    origin = np.asarray(fields.get("space_origin") or [0.0] * vectors.shape[1], float)
    try:
        flips = _flips({"space": fields.get("space")}, "geometry")
        implied = _affine(np.pad(vectors, ((0, 0), (0, 3 - vectors.shape[1]))),
                          np.pad(origin, (0, 3 - origin.size)), flips, "geometry")
    except VolumeError:
        return None
    return fields if np.allclose(implied, np.asarray(geom["affine"], float), atol=1e-6) else None


def _header_for(geom: dict, arr_shape: Sequence[int], nsp: int, channels: bool) -> dict:
    affine = np.asarray(geom["affine"], dtype=np.float64)
    fields = _stored_fields(geom, nsp)
    space = (fields or {}).get("space") or (geom.get("nrrd") or {}).get("space") or "left-posterior-superior"
    if str(space).lower() not in SPACE_TO_RAS:
        space = "left-posterior-superior"
    flips = np.asarray(SPACE_TO_RAS[str(space).lower()], dtype=np.float64)
    rows = [flips * affine[:3, m] for m in range(nsp)]
    origin = flips * affine[:3, 3]
    if fields is not None:
        stored = [[np.nan if v is None else v for v in row] for row in fields["space_directions"]]
        rows = [np.asarray(stored[a], float) for a in fields["spatial_file_axes"]]
        origin = np.asarray(fields.get("space_origin") or origin, float)
    width = max(len(r) for r in rows)
    directions = [np.pad(r, (0, width - len(r))) for r in rows] + ([np.full(width, np.nan)] if channels else [])
    header = {"space": space, "space directions": np.array(directions), "space origin": origin[:width],
              "kinds": ["domain"] * nsp + (["list"] if channels else []), "encoding": "gzip", "endian": "little"}
    source = geom.get("nrrd") or {}
    if source.get("measurement_frame"):
        header["measurement frame"] = np.asarray(source["measurement_frame"], dtype=np.float64)
    if source.get("space_units") and len(source["space_units"]) == width:
        header["space units"] = list(source["space_units"])
    return header


def write_nrrd(
    path: str | os.PathLike,
    data: np.ndarray,
    geometry: dict | Volume | None = None,
    *,
    spacing: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    is_label: bool = False,
) -> str:
    """Write ``data`` (napari order; channels first when 4D) as a gzip ``.nrrd`` file, atomically.

    Args:
        path: Target ``.nrrd`` file.
        data: ``(y, x)``, ``(z, y, x)`` or ``(C, z, y, x)``.
        geometry: Source geometry dict or :class:`Volume` (see the module docstring).
        spacing, translate: Napari-order voxel size and origin when there is no geometry.
        is_label: Integer labels (uint8/uint16/int32 as the values need).

    Raises:
        VolumeError: bad name, unconvertible data, or the file cannot be written.
    """
    import nrrd

    path = os.fspath(path)
    if not path.lower().endswith(".nrrd"):
        raise VolumeError(f"{path}: output name must end with .nrrd")
    data = np.asarray(data)
    if data.ndim not in (2, 3, 4):
        raise VolumeError(f"{path}: data must have 2, 3 or 4 axes (napari order), got {data.shape}")
    nsp = 3 if data.ndim == 4 else data.ndim
    geom = geometry_from_volume(geometry) if isinstance(geometry, Volume) else geometry
    if geom is None:
        try:
            geom = {"affine": affine_from_spacing(spacing or [1.0] * nsp, translate).tolist()}
        except ValueError as exc:
            raise VolumeError(f"{path}: {exc}") from exc
    dtype = label_dtype(data, path) if is_label else image_dtype(data, path)
    header = _header_for(geom, data.shape, nsp, data.ndim == 4)
    arr = data.astype(dtype, copy=False)
    try:
        with atomic_path(path) as tmp:
            nrrd.write(tmp, np.ascontiguousarray(arr), header, index_order="C")
    except AtomicWriteError as exc:
        raise VolumeError(str(exc)) from exc
    except (nrrd.NRRDError, *_ERRORS) as exc:
        raise VolumeError(f"{path}: NRRD write failed ({type(exc).__name__}: {exc})") from exc
    return path
