"""The in-memory volume (array + geometry) that every reader returns and every writer takes.

Axis convention (``docs/interfaces.md``, ``docs/formats.md``): arrays are in *napari order*, the
file's voxel axes reversed, ``(k, j, i)`` written ``(z, y, x)``; multi-channel data is channels first
``(C, z, y, x)``; a 2D file gives ``(y, x)``. ``spacing`` is per spatial axis in napari order
(the zooms reversed). ``affine`` is the 4x4 ``(i, j, k, 1) -> (x, y, z, 1)`` voxel to world matrix
in RAS+ millimetres, whatever the format: NIfTI's affine exactly as in the file; DICOM, NRRD and
MetaImage geometry (LPS or another space) converted to RAS+.

The geometry travels as a plain, JSON-able dict (what napari layers keep in
``metadata["medseg_geometry"]``), so that a label map saved from napari lands on the source scan in
any other viewer.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from napari_medseg.errors import MedsegError

__all__ = ["NiftiError", "Volume", "VolumeError", "affine_from_spacing", "geometry_from_volume"]


class VolumeError(MedsegError, ValueError):
    """A volume file (any format) cannot be read or written; the message names the file and the problem."""


class NiftiError(VolumeError):
    """A NIfTI file cannot be read or written; the message names the file and the problem."""


def foreign_errors_as(what: str) -> Callable:
    """Decorator for a reader ``f(path, ...)``: any exception other than :class:`VolumeError` (a
    parser's ``struct.error``, ``NotImplementedError`` on a corrupt value, ...) becomes a
    :class:`VolumeError` that names the path, ``what`` was being read and the original error."""

    def wrap(func: Callable) -> Callable:
        @functools.wraps(func)
        def inner(path, *args, **kwargs):
            try:
                return func(path, *args, **kwargs)
            except VolumeError:
                raise
            except Exception as exc:  # noqa: BLE001 - the boundary where foreign errors become ours
                where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else f"{len(path)} paths"
                raise VolumeError(f"{where}: {what} is corrupt or unsupported ({type(exc).__name__}: {exc})") from exc

        return inner

    return wrap


@dataclass
class Volume:
    """An image or label map with the geometry needed to write it back.

    Attributes:
        data: ``(z, y, x)``, ``(C, z, y, x)`` when ``channel_axis == 0``, or ``(y, x)`` for 2D files.
        spacing: Voxel size per spatial axis, napari order, in mm.
        affine: 4x4 float64 voxel ``(i, j, k)`` to world (RAS+ mm) matrix.
        header: Plain JSON-able geometry dict (see :func:`geometry_from_volume`).
        channel_axis: ``0`` when ``data`` has a leading channel axis, else ``None``.
        path: Source file, when the volume was read from disk.
    """

    data: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray
    header: dict = field(default_factory=dict)
    channel_axis: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {self.affine.shape}")
        if self.channel_axis not in (None, 0):
            raise ValueError(f"channel_axis must be 0 or None, got {self.channel_axis!r}")
        if len(self.spacing) != self.ndim_spatial:
            raise ValueError(
                f"spacing has {len(self.spacing)} entries but data has {self.ndim_spatial} "
                f"spatial axes (data shape {self.data.shape}, channel_axis={self.channel_axis})"
            )

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes, napari order."""
        shape = tuple(int(s) for s in self.data.shape)
        return shape[1:] if self.channel_axis == 0 else shape

    @property
    def ndim_spatial(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.spatial_shape)

    @property
    def num_channels(self) -> int:
        """Number of channels (1 when there is no channel axis)."""
        return int(self.data.shape[0]) if self.channel_axis == 0 else 1

    @property
    def translate(self) -> tuple[float, ...]:
        """World position of voxel ``(0, 0, 0)``, napari order (the affine's offset reversed)."""
        n = self.ndim_spatial
        return tuple(float(v) for v in self.affine[:n, 3][::-1])


def affine_from_spacing(
    spacing: Sequence[float], translate: Sequence[float] | None = None
) -> np.ndarray:
    """Build a NIfTI affine from napari-order spacing and translate.

    The world axes follow the voxel axes: ``affine = diag(spacing[::-1], 1)`` with the origin
    ``translate[::-1]`` in the last column. A 2D spacing ``(dy, dx)`` gives a 1 mm third axis.

    Args:
        spacing: Voxel size per spatial axis, napari order (2 or 3 entries), finite and > 0.
        translate: World position of the first voxel, napari order; zeros when ``None``.

    Returns:
        4x4 float64 affine.

    Raises:
        ValueError: When spacing or translate have the wrong length or are not finite/positive.
    """
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.size not in (2, 3):
        raise ValueError(f"spacing needs 2 or 3 entries (napari order), got {list(sp)}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be finite and > 0, got {list(sp)}")
    tr = np.zeros(sp.size) if translate is None else np.asarray(translate, np.float64).ravel()
    if tr.size != sp.size or not np.all(np.isfinite(tr)):
        raise ValueError(f"translate must be {sp.size} finite numbers, got {list(tr)}")
    affine = np.eye(4)
    n = sp.size
    affine[np.arange(n), np.arange(n)] = sp[::-1]
    affine[:n, 3] = tr[::-1]
    return affine


def geometry_from_volume(vol: Volume) -> dict:
    """Return the plain-dict geometry of ``vol`` (what goes in ``metadata["medseg_geometry"]``).

    The dict is a deep copy of ``vol.header`` (what the source format's writer needs: for NIfTI the
    qform, sform and their codes, zooms, xyzt_units, on-disk dtype; for DICOM the ``"dicom"`` UIDs,
    instances and positions; for NRRD the ``"nrrd"`` space, directions, origin and measurement
    frame; for MetaImage the ``"metaimage"`` LPS direction and origin; ``"format"`` names the
    source) with ``affine``, ``spacing``, ``spatial_shape`` and ``channel_axis`` refreshed from the
    volume. A volume built in memory
    (empty header) gets a geometry made from its affine and spacing alone. Every value is a JSON
    type (nested lists, floats, ints, strings, ``None``).
    """
    geom = copy.deepcopy(dict(vol.header))
    geom.pop("layer_axes", None)  # a volume's data is always in its own (file) order
    geom["affine"] = [[float(v) for v in row] for row in vol.affine]
    geom["spacing"] = [float(s) for s in vol.spacing]
    geom["spatial_shape"] = [int(s) for s in vol.spatial_shape]
    geom["channel_axis"] = vol.channel_axis
    geom.setdefault("zooms", [float(s) for s in vol.spacing[::-1]])
    return geom
