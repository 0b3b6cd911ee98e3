"""MetaImage (``.mha``, ``.mhd`` + raw data) <-> :class:`Volume`, with SimpleITK (ITK's own MetaIO).

Reading: the text header is parsed first (dimensions, element type, channels, compression, data
file) and checked against ``MAX_VOXELS`` and the bytes the data can hold, so a corrupt header never
makes the reader allocate gigabytes; then SimpleITK reads the voxels. ITK's geometry is LPS:
``direction @ diag(spacing)`` and ``origin`` give the voxel-to-LPS matrix, converted to RAS+.
Vector pixels (``ElementNumberOfChannels``) and 4D images become channels first.

Writing (atomic): spacing, origin and direction (columns of the affine, normalised, in LPS) from the
geometry; ``.mha`` is one file; ``.mhd`` writes the compressed ``.zraw`` data file first, then the
header, each atomically (the pair is consistent once the header is in place).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
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
from .world import RAS_FROM_LPS

logger = logging.getLogger(__name__)

__all__ = ["METAIMAGE_EXTENSIONS", "read_metaimage", "write_metaimage"]

METAIMAGE_EXTENSIONS = (".mha", ".mhd")
ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                 "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                 "MET_DOUBLE": 8}
MAX_HEADER = 1 << 16


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FILE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_BOOLS = ("BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData")
_NUMBERS = {"ElementSpacing": 1, "ElementSize": 1, "Offset": 1, "Position": 1, "Origin": 1,
            "CenterOfRotation": 1, "TransformMatrix": 2, "Rotation": 2, "Orientation": 2}


def _parse_header(path: str) -> tuple[dict, int]:
    """Key/value pairs up to ``ElementDataFile`` and the byte offset where the data begin.

    Strict on purpose: ITK's MetaIO crashes the process on some malformed headers, so every line
    must be a printable ``Key = Value`` pair before SimpleITK sees the file.
    """
    with open(path, "rb") as fh:
        blob = fh.read(MAX_HEADER)
    fields: dict[str, str] = {}
    offset = 0
    for line in blob.split(b"\n"):
        offset += len(line) + 1
        text = line.rstrip(b"\r")
        if not text.strip():
            continue
        if any(c < 0x20 or c > 0x7E for c in text):
            raise VolumeError(f"{path}: not a MetaImage header (non-text bytes in line {text[:40]!r})")
        key, sep, value = text.decode("ascii").partition("=")
        if not sep or not _KEY.match(key.strip()):
            raise VolumeError(f"{path}: not a MetaImage header (line {text[:40]!r})")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, offset
    raise VolumeError(f"{path}: not a MetaImage file (no ElementDataFile within {MAX_HEADER} bytes)")


def _check_values(fields: dict, ndims: int, path: str) -> None:
    for key in _BOOLS:
        if key in fields and fields[key].lower() not in ("true", "false"):
            raise VolumeError(f"{path}: MetaImage {key} must be True or False, not {fields[key]!r}")
    for key, power in _NUMBERS.items():
        if key not in fields:
            continue
        try:
            values = [float(v) for v in fields[key].split()]
        except ValueError as exc:
            raise VolumeError(f"{path}: MetaImage {key} is not numeric ({fields[key]!r})") from exc
        if len(values) != ndims**power or not np.all(np.isfinite(values)):
            raise VolumeError(f"{path}: MetaImage {key} needs {ndims ** power} finite numbers")
    for key in ("HeaderSize", "CompressedDataSize", "ElementNumberOfChannels"):
        if key in fields and not re.fullmatch(r"-?\d+", fields[key]):
            raise VolumeError(f"{path}: MetaImage {key} must be an integer, not {fields[key]!r}")


def _check_header(path: str) -> dict:
    fields, offset = _parse_header(path)
    try:
        sizes = [int(v) for v in fields["DimSize"].split()]
        ndims = int(fields.get("NDims", len(sizes)))
        channels = int(fields.get("ElementNumberOfChannels", 1))
    except (KeyError, ValueError) as exc:
        raise VolumeError(f"{path}: MetaImage header without valid NDims/DimSize ({exc})") from exc
    if len(sizes) != ndims or ndims not in (2, 3, 4) or any(s <= 0 for s in sizes) or not 0 < channels <= 64:
        raise VolumeError(f"{path}: unsupported MetaImage dimensions (NDims {ndims}, DimSize {sizes}, "
                          f"{channels} channel(s)); 2D-4D images only")
    _check_values(fields, ndims, path)
    nvox = int(np.prod(np.asarray(sizes, dtype=object))) * channels
    if nvox > MAX_VOXELS:
        raise VolumeError(f"{path}: header announces {nvox} voxels, more than the {MAX_VOXELS} accepted")
    element = fields.get("ElementType", "")
    if element not in ELEMENT_BYTES:
        raise VolumeError(f"{path}: element type '{element}' is not supported")
    data_file = fields["ElementDataFile"]
    if data_file.upper() == "LOCAL":
        have = os.path.getsize(path) - offset
    elif _FILE.match(data_file):
        target = os.path.join(os.path.dirname(path), data_file)
        if not os.path.isfile(target):
            raise VolumeError(f"{path}: the data file {target} is missing")
        have = os.path.getsize(target)
    else:
        raise VolumeError(f"{path}: ElementDataFile '{data_file[:60]}' is not supported (LOCAL or one file "
                          "beside the header; per-slice file lists are not read)")
    have -= max(int(fields.get("HeaderSize", 0)), 0)
    need = nvox * ELEMENT_BYTES[element]
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if not compressed and have < need:
        raise VolumeError(f"{path}: file is truncated: {need} data bytes announced, {have} present")
    if compressed and need > MAX_DEFLATE_RATIO * max(have, 1):
        raise VolumeError(f"{path}: file is truncated or its header is corrupt: {have} compressed bytes cannot "
                          f"hold the {need} bytes announced")
    # SimpleITK's image plus the numpy copy (float32 for other floats): about three times the voxels
    check_memory(3 * need, f"{path}: reading {' x '.join(map(str, sizes))} {element} voxels", VolumeError)
    return fields


@foreign_errors_as("the MetaImage file")
def read_metaimage(path: str | os.PathLike) -> Volume:
    """Read a ``.mha``/``.mhd`` file (napari order, RAS+ affine; see the module docstring).

    Raises:
        VolumeError: missing, not MetaImage, truncated or corrupt, or unsupported dimensions.
    """
    import SimpleITK as sitk

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VolumeError(f"{path}: no such file")
    try:
        fields = _check_header(path)
        reader = sitk.ImageFileReader()
        reader.SetImageIO("MetaImageIO")
        reader.SetFileName(path)
        image = reader.Execute()
        data = sitk.GetArrayFromImage(image)
    except VolumeError:
        raise
    except (RuntimeError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise VolumeError(f"{path}: not a readable MetaImage file ({type(exc).__name__}: {exc})") from exc
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing_ijk = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    nsp = min(dim, 3)
    lps = np.eye(4)
    lps[:nsp, :nsp] = direction[:nsp, :nsp] @ np.diag(spacing_ijk[:nsp])
    lps[:nsp, 3] = origin[:nsp]
    if nsp == 2:
        lps[2, 2] = 1.0
    channel_axis = None
    if image.GetNumberOfComponentsPerPixel() > 1:
        data, channel_axis = np.moveaxis(data, -1, 0), 0
    elif dim == 4:
        channel_axis = 0
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    if not np.all(np.isfinite(lps)) or abs(np.linalg.det(lps[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: spacing/direction/origin are not finite or not independent")
    meta = {"direction": direction.tolist(), "origin": origin.tolist(), "spacing": spacing_ijk.tolist(),
            "dimension": dim, "components": image.GetNumberOfComponentsPerPixel(),
            "element_type": fields.get("ElementType"), "anatomical_orientation": fields.get("AnatomicalOrientation")}
    geom = {"format": "metaimage", "dtype": data.dtype.name, "metaimage": meta}
    vol = Volume(np.ascontiguousarray(data), tuple(spacing_ijk[:nsp][::-1]), RAS_FROM_LPS @ lps, geom,
                 channel_axis, path)
    vol.header = geometry_from_volume(vol)
    return vol


def _image(arr: np.ndarray, geom: dict, nsp: int):
    import SimpleITK as sitk

    lps = RAS_FROM_LPS @ np.asarray(geom["affine"], dtype=np.float64)
    cols = lps[:nsp, :nsp]
    spacing = np.linalg.norm(cols, axis=0)
    direction = cols / spacing
    four_d = arr.ndim == 4 and (geom.get("metaimage") or {}).get("dimension") == 4
    if arr.ndim == 4 and not four_d:
        image = sitk.GetImageFromArray(np.moveaxis(arr, 0, -1), isVector=True)
    else:
        image = sitk.GetImageFromArray(arr)
    dim = image.GetDimension()
    full_dir, full_sp, full_origin = np.eye(dim), np.ones(dim), np.zeros(dim)
    full_dir[:nsp, :nsp], full_sp[:nsp], full_origin[:nsp] = direction, spacing, lps[:nsp, 3]
    image.SetSpacing([float(v) for v in full_sp])
    image.SetOrigin([float(v) for v in full_origin])
    image.SetDirection([float(v) for v in full_dir.ravel()])
    return image


def _write(image, target: str) -> None:
    import SimpleITK as sitk

    writer = sitk.ImageFileWriter()
    writer.SetImageIO("MetaImageIO")
    writer.SetFileName(target)
    writer.SetUseCompression(True)
    writer.Execute(image)


def write_metaimage(
    path: str | os.PathLike,
    data: np.ndarray,
    geometry: dict | Volume | None = None,
    *,
    spacing: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    is_label: bool = False,
) -> str:
    """Write ``data`` (napari order; channels first when 4D) as ``.mha`` or ``.mhd``, atomically.

    Args:
        path: Target ``.mha`` (one file) or ``.mhd`` (header + ``.zraw`` beside it).
        data: ``(y, x)``, ``(z, y, x)`` or ``(C, z, y, x)``.
        geometry: Source geometry dict or :class:`Volume`; its affine is written.
        spacing, translate: Napari-order voxel size and origin when there is no geometry.
        is_label: Integer labels (uint8/uint16/int32 as the values need).

    Raises:
        VolumeError: bad name, unconvertible data, or the file cannot be written.
    """
    path = os.fspath(path)
    if not path.lower().endswith(METAIMAGE_EXTENSIONS):
        raise VolumeError(f"{path}: output name must end with .mha or .mhd")
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
    try:
        image = _image(data.astype(dtype, copy=False), geom, nsp)
        if path.lower().endswith(".mha"):
            with atomic_path(path) as tmp:
                _write(image, tmp)
        else:
            _write_mhd(image, path)
    except AtomicWriteError as exc:
        raise VolumeError(str(exc)) from exc
    except (RuntimeError, ValueError, OSError) as exc:
        raise VolumeError(f"{path}: MetaImage write failed ({type(exc).__name__}: {exc})") from exc
    return path


def _write_mhd(image, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AtomicWriteError(f"{path}: cannot write: the parent folder {folder} does not exist")
    staging = tempfile.mkdtemp(prefix=".medseg-mhd-", dir=folder)
    try:
        base = os.path.basename(path)
        _write(image, os.path.join(staging, base))
        names = sorted(os.listdir(staging), key=lambda n: n == base)  # the data file first, the header last
        for name in names:
            with atomic_path(os.path.join(folder, name)) as tmp:
                os.replace(os.path.join(staging, name), tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
