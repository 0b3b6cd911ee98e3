"""Read and write NIfTI-1/2 files (``.nii``, ``.nii.gz``) as :class:`Volume` objects.

Reading (:func:`read_nifti`):

- Axes are reversed into napari order: ``(i, j, k) -> (z, y, x)``; a 4D file ``(i, j, k, t)``
  becomes channels first ``(C, z, y, x)``; a 2D file gives ``(y, x)``.
- A 4D file with a single volume (``t == 1``) is squeezed to 3D. A 5D file is accepted only when
  it squeezes to at most 4D: ``(i, j, k, 1, C)`` (the NIfTI vector layout) or ``(i, j, k, T, 1)``
  gives ``C``/``T`` channels; anything else is refused. The geometry records ``"squeezed"``.
- Scaled data (``scl_slope``) and float64 data come back as float32; unscaled integers keep their
  on-disk dtype (recorded as ``geometry["dtype"]``).
- NaN voxels are kept (napari shows them as transparent/black) and reported with a logging
  warning; the engine's preprocessing is responsible for replacing them.
- The header is checked before any voxel is read: zero-size or over-large dimensions (more than
  ``MAX_VOXELS``), non-finite or zero spacing, a non-finite affine, a ``.nii`` shorter than its
  header announces, a ``.nii.gz`` too small to hold it even at deflate's best ratio, or more memory
  than is available for the voxels (:func:`~napari_medseg.io.limits.check_memory`) all raise
  :class:`NiftiError`, so a corrupt header or a decompression bomb never makes the reader allocate
  gigabytes.
- A ``.nii.gz`` is read to the end of its gzip stream, so its CRC-32 and length are checked: a
  damaged file raises instead of giving wrong voxels.
- Spacing and affine are in mm whatever ``xyzt_units`` says (metres and microns are converted;
  unknown is mm); the geometry keeps the unit, so the writer puts the file's own values back.
- float64 values beyond float32's range are refused, not turned into infinities.

Writing (:func:`write_nifti`) puts the source geometry back unchanged (the same qform and sform
matrices and codes, zooms and units). Without a source geometry the affine is built from napari
order ``spacing`` and ``translate`` (:func:`~napari_medseg.io.volume.affine_from_spacing`) and set
as both qform and sform with code 1 (scanner). Writes are atomic: a temporary file in the target
folder, ``fsync``, then ``os.replace``.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import time
import zlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from nibabel.fileholders import FileHolder
from nibabel.openers import ImageOpener

from ._dtypes import image_dtype, label_dtype, to_float32
from .atomic import AtomicWriteError, atomic_path
from .limits import check_memory
from .volume import NiftiError, Volume, affine_from_spacing, geometry_from_volume
from .world import check_affine

__all__ = ["MAX_VOXELS", "NIFTI_EXTENSIONS", "is_nifti_path", "read_nifti", "write_nifti"]

logger = logging.getLogger(__name__)

MAX_VOXELS = 2**31
MAX_DEFLATE_RATIO = 1100  # deflate cannot compress better than ~1032:1, whatever the data
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
#: Millimetres per spatial unit of ``xyzt_units`` (bits 0-2): 1 metre, 2 mm, 3 micron; 0 (unknown)
#: is read as mm, as every tool does.
UNIT_TO_MM = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}
_UNIT_NAMES = {1: "metres", 3: "microns"}
_READ_ERRORS = (
    OSError, EOFError, ValueError, OverflowError, struct.error, zlib.error, gzip.BadGzipFile,
    nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
)


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when the name ends with ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return os.fspath(path).lower().endswith(NIFTI_EXTENSIONS)


def unit_to_mm(xyzt_units: int) -> float:
    """Millimetres per unit of a NIfTI ``xyzt_units`` code (its spatial bits; unknown codes: mm)."""
    return UNIT_TO_MM.get(int(xyzt_units) & 0x07, 1.0)


def _matrix(m: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.asarray(m, dtype=np.float64)]


def _spatial_and_channels(shape: tuple[int, ...], path: str) -> tuple[tuple[int, ...], str | None]:
    """Decide the array shape to use (F-order reshape of the on-disk shape) and what was squeezed."""
    if len(shape) <= 3:
        return shape, None
    if len(shape) == 4:
        return (shape[:3], "t") if shape[3] == 1 else (shape, None)
    if len(shape) == 5:
        t, c = shape[3], shape[4]
        if t == 1 and c == 1:
            return shape[:3], "t,c"
        if t == 1:
            return (*shape[:3], c), "t"
        if c == 1:
            return (*shape[:3], t), "c"
        raise NiftiError(
            f"{path}: 5D NIfTI with shape {shape} (time {t} and vector {c} both > 1) is not "
            "supported; only volumes that squeeze to 3D or 4D (channels) can be opened"
        )
    raise NiftiError(f"{path}: {len(shape)}D NIfTI (shape {shape}) is not supported (2D-5D only)")


def _raw_pixdim(img: nib.Nifti1Image, path: str) -> np.ndarray:
    """``pixdim`` as stored on disk (nibabel's loader silently replaces zero spacing by 1)."""
    try:
        with ImageOpener(path) as fobj:
            raw = type(img.header).from_fileobj(fobj, check=False)
    except _READ_ERRORS as exc:
        raise NiftiError(f"{path}: header could not be read ({exc})") from exc
    return np.asarray(raw["pixdim"], dtype=np.float64)


def _check_header(img: nib.Nifti1Image, path: str) -> tuple[int, ...]:
    """Sanity-check the header before any voxel is read; return the on-disk shape."""
    hdr = img.header
    shape = tuple(int(s) for s in hdr.get_data_shape())
    if len(shape) < 2:
        raise NiftiError(f"{path}: NIfTI has {len(shape)} dimension(s) (shape {shape}); need 2D-5D")
    if any(s <= 0 for s in shape):
        raise NiftiError(f"{path}: a dimension has size zero (shape {shape}); the file holds no voxels")
    nvox = int(np.prod(np.asarray(shape, dtype=object)))
    if nvox > MAX_VOXELS:
        raise NiftiError(
            f"{path}: header announces {nvox} voxels (shape {shape}), more than the "
            f"{MAX_VOXELS} this reader accepts; the header is probably corrupt"
        )
    nsp = min(len(shape), 3)
    zooms = [float(z) for z in _raw_pixdim(img, path)[1 : 1 + nsp]]
    if not np.all(np.isfinite(zooms)) or 0.0 in zooms:
        raise NiftiError(f"{path}: voxel spacing (pixdim) {zooms} must be finite and non-zero")
    if not np.all(np.isfinite(img.affine)):
        raise NiftiError(f"{path}: the affine (qform/sform) contains non-finite values")
    if hdr.get_data_dtype().fields is not None:
        raise NiftiError(f"{path}: RGB/structured voxel type {hdr.get_data_dtype()} is not supported")
    itemsize = hdr.get_data_dtype().itemsize
    need = int(hdr.get_data_offset()) + nvox * itemsize
    have = os.path.getsize(path)
    if not path.lower().endswith(".gz") and have < need:
        raise NiftiError(f"{path}: file is truncated: header announces {need} bytes, file has {have}")
    if path.lower().endswith(".gz") and need > MAX_DEFLATE_RATIO * have:
        raise NiftiError(
            f"{path}: file is truncated or its header is corrupt: {have} compressed bytes cannot "
            f"hold the {need} bytes the header announces"
        )
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    scaled = np.isfinite(slope) and slope != 0 and (slope != 1 or (np.isfinite(inter) and inter != 0))
    converted = scaled or (itemsize == 8 and hdr.get_data_dtype().kind == "f")
    # Peak: the voxels as stored, plus the float64 scaled copy and the float32 result when converted.
    peak = nvox * itemsize + (nvox * 12 if converted else 0)
    check_memory(peak, f"{path}: reading {'x'.join(map(str, shape))} {hdr.get_data_dtype()} voxels", NiftiError,
                 "The header may be corrupt (or the file a decompression bomb).")
    return shape


def _geometry_from_header(img: nib.Nifti1Image, shape: tuple[int, ...]) -> dict:
    hdr = img.header
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    return {
        "format": "nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1",
        "affine": _matrix(img.affine),
        "qform": _matrix(hdr.get_qform()),
        "qform_code": int(qcode),
        "sform": _matrix(hdr.get_sform()),
        "sform_code": int(scode),
        "quatern": [float(hdr["quatern_b"]), float(hdr["quatern_c"]), float(hdr["quatern_d"])],
        "qoffset": [float(hdr["qoffset_x"]), float(hdr["qoffset_y"]), float(hdr["qoffset_z"])],
        "qfac": float(hdr["pixdim"][0]),
        "zooms": [float(z) for z in hdr.get_zooms()],
        "xyzt_units": int(hdr["xyzt_units"]),
        "dtype": np.dtype(hdr.get_data_dtype()).name,
        "shape": list(shape),
        "intent_code": int(hdr["intent_code"]),
    }


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a ``.nii``/``.nii.gz`` file into a :class:`Volume` (napari axis order).

    Args:
        path: File to read.

    Returns:
        The volume; ``volume.header`` is the JSON-able geometry needed to write it back.

    Raises:
        NiftiError: The file is missing, not NIfTI, truncated or corrupt, has an unsupported
            shape (zero-size, too large, 6D+, non-squeezable 5D) or invalid spacing/affine.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NiftiError(f"{path}: no such file")
    if not is_nifti_path(path):
        raise NiftiError(f"{path}: not a NIfTI file (expected a .nii or .nii.gz name)")
    try:
        img = nib.load(path, mmap=False)
    except _READ_ERRORS as exc:
        raise NiftiError(f"{path}: not a readable NIfTI file (header could not be read: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NiftiError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    try:
        return _read_checked(img, path)
    except NiftiError:
        raise
    except _READ_ERRORS as exc:  # nibabel's own complaints about a corrupt header (fuzzing finds them)
        raise NiftiError(f"{path}: the NIfTI header is corrupt ({type(exc).__name__}: {exc})") from exc


def _read_voxels(img: nib.Nifti1Image, path: str) -> np.ndarray:
    """The voxel array (scaled as nibabel scales it). A ``.nii.gz`` is read through one gzip stream
    to its end, so that gzip checks the CRC-32 and the length of the data in its trailer: a flipped
    bit raises instead of becoming a wrong voxel (nibabel alone stops reading at the last voxel,
    before the trailer). The check costs no second pass: the stream computes the CRC as it inflates."""
    if not path.lower().endswith(".gz"):
        return np.asanyarray(img.dataobj)
    with gzip.open(path, "rb") as stream:
        holder = FileHolder(fileobj=stream)
        data = np.asanyarray(type(img).from_file_map({"header": holder, "image": holder}).dataobj)
        while stream.read(1 << 20):  # the rest (extensions, padding) and the trailer's CRC and length
            pass
    return data


def _read_checked(img: nib.Nifti1Image, path: str) -> Volume:
    shape = _check_header(img, path)
    new_shape, squeezed = _spatial_and_channels(shape, path)
    try:
        data = _read_voxels(img, path)
    except NiftiError:
        raise
    except gzip.BadGzipFile as exc:
        if "CRC" in str(exc) or "length" in str(exc).lower():
            raise NiftiError(f"{path}: the compressed data fail their gzip checksum ({exc}): the file is "
                             "damaged (a changed byte on disk or in a copy); use another copy") from exc
        raise NiftiError(f"{path}: voxel data is truncated or corrupt ({exc})") from exc
    except _READ_ERRORS as exc:
        raise NiftiError(f"{path}: voxel data is truncated or corrupt ({exc})") from exc
    if data.shape != shape:
        raise NiftiError(f"{path}: read {data.shape} voxels, header announces {shape}")
    if squeezed:
        data = data.reshape(new_shape, order="F")
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = to_float32(data, path, NiftiError)
    elif data.dtype.kind not in "biuf":
        raise NiftiError(f"{path}: voxel type {data.dtype} is not supported")
    data = data.T  # (i, j, k[, t]) -> ([t,] k, j, i); F-ordered on disk, so C-contiguous here
    if data.dtype.kind == "f":
        n_nan = int(np.count_nonzero(np.isnan(data)))
        if n_nan:
            logger.warning("%s: %d of %d voxels are NaN; they are kept as NaN", path, n_nan, data.size)
    channel_axis = 0 if data.ndim == 4 else None
    nsp = data.ndim - (1 if channel_axis == 0 else 0)
    geom = _geometry_from_header(img, shape)
    geom["squeezed"] = squeezed
    # World coordinates and spacing in mm whatever the file's unit (xyzt_units); the header keeps
    # the unit and the raw matrices, so that the writer puts the file's own values back.
    to_mm = unit_to_mm(geom["xyzt_units"])
    affine = np.array(img.affine, dtype=np.float64)
    if to_mm != 1.0:
        affine[:3, :] *= to_mm
        logger.info("%s: spatial unit is %s; converted to mm", path, _UNIT_NAMES.get(int(geom["xyzt_units"]) & 7))
    spacing = tuple(abs(float(z)) * to_mm for z in img.header.get_zooms()[:nsp][::-1])
    vol = Volume(data, spacing, affine, geom, channel_axis, path)
    vol.header = geometry_from_volume(vol)
    return vol


# ----------------------------------------------------------------------------------- writing
def _label_dtype(data: np.ndarray, path: str) -> np.dtype:
    return label_dtype(data, path, NiftiError)


def _image_dtype(data: np.ndarray, path: str) -> np.dtype:
    return image_dtype(data, path, NiftiError)


def _fallback_affine(zooms: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_zooms(zooms)
    return hdr.get_base_affine()


def _build_header(geom: dict, arr_shape: tuple[int, ...], dtype: np.dtype, nsp: int) -> nib.Nifti1Header:
    """Header with the geometry's qform/sform/zooms/units for an on-disk array of ``arr_shape``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(arr_shape)
    hdr.set_data_dtype(dtype)
    affine = np.array(geom["affine"], dtype=np.float64)
    affine[:3, :] /= unit_to_mm(int(geom.get("xyzt_units", 2)))  # mm -> the source file's unit
    old_zooms = [abs(float(z)) for z in geom.get("zooms", [])]
    spatial_zooms = (list(old_zooms[:nsp]) if len(old_zooms) >= nsp
                     else [float(z) for z in np.linalg.norm(affine[:3, :nsp], axis=0)])
    extra = [old_zooms[3] if len(old_zooms) > 3 and len(arr_shape) > 3 else 1.0]
    zooms = (spatial_zooms + extra * (len(arr_shape) - nsp))[: len(arr_shape)]
    qcode, scode = int(geom.get("qform_code", 1)), int(geom.get("sform_code", 1))
    qform = np.asarray(geom.get("qform", affine), dtype=np.float64)
    sform = np.asarray(geom.get("sform", affine), dtype=np.float64)
    best = sform if scode > 0 else qform if qcode > 0 else _fallback_affine(zooms, arr_shape)
    raw_ok = "quatern" in geom and np.allclose(best, affine, atol=1e-6)
    if not raw_ok:  # affine changed or unknown header: rebuild both forms (and zooms) from it
        logger.debug("rebuilding qform/sform from the affine")
        qcode, scode = qcode or 1, scode or 1
        zooms[:nsp] = [float(z) for z in np.linalg.norm(affine[:3, :nsp], axis=0)]
        hdr.set_qform(affine, code=qcode)
        hdr.set_sform(affine, code=scode)
    else:
        hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = geom["quatern"]
        hdr["qoffset_x"], hdr["qoffset_y"], hdr["qoffset_z"] = geom["qoffset"]
        hdr["qform_code"] = qcode
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
        hdr["sform_code"] = scode
    pixdim = hdr["pixdim"]
    pixdim[0] = float(geom.get("qfac", pixdim[0])) if raw_ok else pixdim[0]
    pixdim[1 : 1 + len(zooms)] = zooms
    hdr["pixdim"] = pixdim
    hdr["xyzt_units"] = int(geom.get("xyzt_units", 2))  # 2 = mm
    return hdr


def _atomic_save(img: nib.Nifti1Image, path: str) -> None:
    """Save through :func:`~napari_medseg.io.atomic.atomic_path` (temp file, fsync, rename)."""
    try:
        with atomic_path(path) as tmp:
            nib.save(img, tmp)
            delay = os.environ.get("MEDSEG_TEST_SAVE_DELAY")  # tests widen the write -> rename window
            if delay:
                time.sleep(float(delay))
    except AtomicWriteError as exc:
        raise NiftiError(str(exc)) from exc


def write_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    geometry: dict | Volume | None = None,
    *,
    spacing: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    is_label: bool = False,
) -> str:
    """Write ``data`` (napari order) to ``path`` atomically, in the given geometry.

    Args:
        path: Target ``.nii`` or ``.nii.gz`` file; an existing file is replaced only on success.
        data: ``(y, x)``, ``(z, y, x)`` or channels first ``(C, z, y, x)``.
        geometry: A geometry dict (``metadata["medseg_geometry"]``, :func:`geometry_from_volume`)
            or a :class:`Volume`; its affine, qform/sform (matrices and codes), zooms and units are
            written back unchanged. When given, ``spacing``/``translate`` are ignored.
        spacing: Napari-order voxel size used when there is no geometry (default 1 mm).
        translate: Napari-order world position of the first voxel when there is no geometry.
        is_label: Write integer labels: uint8 when the maximum is <= 255, else uint16, else int32;
            negative or non-integer values raise. Images are written as float32 when floating,
            else in their integer type.

    Returns:
        The written path.

    Raises:
        NiftiError: Bad name, unconvertible data, or the file cannot be written (the message says
            why); any previous file at ``path`` is left intact and no temporary file remains.
    """
    path = os.fspath(path)
    if not is_nifti_path(path):
        raise NiftiError(f"{path}: output name must end with .nii or .nii.gz")
    data = np.asarray(data)
    if data.ndim not in (2, 3, 4):
        raise NiftiError(f"{path}: data must have 2, 3 or 4 axes (napari order), got {data.shape}")
    nsp = 3 if data.ndim == 4 else data.ndim
    if isinstance(geometry, Volume):
        geometry = geometry_from_volume(geometry)
    if geometry is None:
        sp = [1.0] * nsp if spacing is None else list(spacing)
        try:
            affine = affine_from_spacing(sp, translate)
        except ValueError as exc:
            raise NiftiError(f"{path}: {exc}") from exc
        if len(sp) != nsp:
            raise NiftiError(f"{path}: spacing {sp} does not match {nsp} spatial axes of {data.shape}")
        geometry = {"affine": _matrix(affine), "spacing": [float(s) for s in sp], "xyzt_units": 2}
    else:
        if not isinstance(geometry, dict) or "affine" not in geometry:
            raise NiftiError(f"{path}: geometry dict has no 'affine'")
        try:
            check_affine(geometry["affine"], path)
        except (TypeError, ValueError) as exc:
            raise NiftiError(f"{exc}; nothing was written") from exc
        gshape = geometry.get("spatial_shape")
        spatial = tuple(data.shape[-nsp:])
        if gshape is not None and len(gshape) != nsp:
            raise NiftiError(f"{path}: data {data.shape} has {nsp} spatial axes, geometry has {len(gshape)}")
        if gshape is not None and tuple(gshape) != spatial:
            logger.warning("%s: data shape %s differs from the source grid %s", path, spatial, gshape)
        if spacing is not None and not np.allclose(spacing, geometry.get("spacing", spacing)):
            logger.warning("%s: spacing %s ignored; the source geometry is used", path, spacing)
    dtype = _label_dtype(data, path) if is_label else _image_dtype(data, path)
    arr = np.asarray(data.astype(dtype, copy=False).T)  # napari -> NIfTI axis order (F-contiguous)
    hdr = _build_header(geometry, arr.shape, dtype, nsp)
    img = nib.Nifti1Image(arr, None, header=hdr)
    if is_label:
        img.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    img.header.set_slope_inter(1.0, 0.0)
    _atomic_save(img, path)
    logger.info("wrote %s %s %s", path, arr.shape, dtype)
    return path
