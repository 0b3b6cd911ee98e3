"""On-disk voxel types shared by the writers (NIfTI, NRRD, MetaImage, DICOM-SEG)."""

from __future__ import annotations

import numpy as np

from .volume import VolumeError


def label_dtype(data: np.ndarray, path: str, error: type[VolumeError] = VolumeError) -> np.dtype:
    """The smallest of uint8/uint16/int32 that holds a label map; refuse what is not labels.

    Raises:
        error: NaN/infinite, non-integer or negative values, or values above int32.
    """
    if data.dtype.kind == "b":
        return np.dtype(np.uint8)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise error(f"{path}: label map contains NaN or infinite values")
        if data.size and not np.array_equal(data, np.round(data)):
            raise error(f"{path}: label map has non-integer values; labels must be integers")
    elif data.dtype.kind not in "iu":
        raise error(f"{path}: cannot write a label map of type {data.dtype}")
    lo = data.min() if data.size else 0
    hi = data.max() if data.size else 0
    if lo < 0:
        raise error(f"{path}: label map has negative values (min {lo}); labels must be >= 0")
    for dt in (np.uint8, np.uint16, np.int32):
        if hi <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise error(f"{path}: label value {hi} does not fit in int32")


def image_dtype(data: np.ndarray, path: str, error: type[VolumeError] = VolumeError) -> np.dtype:
    """float32 for floating data, the integer type itself (64-bit narrowed when the values fit).

    Raises:
        error: float64 values beyond float32's range (they would be written as infinities), complex data.
    """
    kind, dt = data.dtype.kind, data.dtype
    if kind == "b":
        return np.dtype(np.uint8)
    if kind == "f":
        check_float32_range(data, path, error)  # never write infinities for large float64 values
        return np.dtype(np.float32)
    if kind in "iu":
        if dt.itemsize < 8:
            return dt
        lo, hi = (data.min(), data.max()) if data.size else (0, 0)
        for cand in (np.int16, np.int32):
            if np.iinfo(cand).min <= lo and hi <= np.iinfo(cand).max:
                return np.dtype(cand)
        return np.dtype(np.float64)
    raise error(f"{path}: cannot write voxel type {dt}")


#: The largest finite float32 value: float64 data beyond it would become infinite in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_overflow(data: np.ndarray) -> tuple[int, float] | None:
    """``(count, largest magnitude)`` of the finite values of float ``data`` that float32 cannot
    hold (they would become +-inf); ``None`` when there are none (or ``data`` is not float64+)."""
    data = np.asarray(data)
    if data.dtype.kind != "f" or data.dtype.itemsize <= 4 or not data.size:
        return None
    lo, hi = float(data.min()), float(data.max())  # two passes, no temporary: the common case
    if -FLOAT32_MAX <= lo and hi <= FLOAT32_MAX:
        return None
    with np.errstate(invalid="ignore"):
        big = np.abs(data) > FLOAT32_MAX
        n = int(np.count_nonzero(big & np.isfinite(data)))
    if not n:
        return None
    return n, float(np.nanmax(np.where(np.isfinite(data), np.abs(data), 0.0)))


def check_float32_range(data: np.ndarray, what: str, error: type[Exception] = VolumeError) -> None:
    """Refuse complex data (float32 would drop the imaginary part) and finite float64 values that
    float32 cannot hold (they would become infinities).

    Raises:
        error: naming ``what``, how many values are too large and the largest.
    """
    data = np.asarray(data)
    if data.dtype.kind == "c":
        raise error(f"{what}: complex voxel values ({data.dtype}) are not supported; take the magnitude "
                    "(or the real part) first")
    over = float32_overflow(data)
    if over is not None:
        raise error(
            f"{what}: {over[0]:,} voxel value(s) (largest magnitude {over[1]:.3g}) exceed float32's range "
            f"(+-{FLOAT32_MAX:.3g}) and would become infinite; rescale the image first"
        )


def to_float32(data: np.ndarray, what: str, error: type[Exception] = VolumeError) -> np.ndarray:
    """``data`` as float32 after :func:`check_float32_range` (no copy when it is float32 already)."""
    check_float32_range(data, what, error)
    return np.asarray(data).astype(np.float32, copy=False)
