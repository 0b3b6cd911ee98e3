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
    """float32 for floating data, the integer type itself (64-bit narrowed when the values fit)."""
    kind, dt = data.dtype.kind, data.dtype
    if kind == "b":
        return np.dtype(np.uint8)
    if kind == "f":
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
