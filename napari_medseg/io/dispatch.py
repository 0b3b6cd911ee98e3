"""One entry point per direction: :func:`read_volume` and :func:`write_volume` choose the format.

Format libraries are imported on first use (pydicom/highdicom for DICOM, pynrrd for NRRD,
SimpleITK for MetaImage), so ``import napari_medseg.io`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .nifti import NIFTI_EXTENSIONS, is_nifti_path, read_nifti, write_nifti
from .volume import Volume, VolumeError, geometry_from_volume
from .world import check_affine, to_volume_order

__all__ = [
    "VOLUME_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "is_volume_path",
    "read_dicom_seg",
    "read_dicom_series",
    "read_metaimage",
    "read_nrrd",
    "read_volume",
    "volume_format",
    "write_dicom_seg",
    "write_metaimage",
    "write_nrrd",
    "volume_stem",
    "write_volume",
]

NRRD_EXTENSIONS = (".nrrd", ".nhdr")
METAIMAGE_EXTENSIONS = (".mha", ".mhd")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
#: File name endings :func:`read_volume` opens (a folder of DICOM files opens too).
VOLUME_EXTENSIONS = NIFTI_EXTENSIONS + NRRD_EXTENSIONS + METAIMAGE_EXTENSIONS + DICOM_EXTENSIONS
#: File name endings :func:`write_volume` writes (``.dcm`` is DICOM-SEG, for labels).
WRITE_EXTENSIONS = NIFTI_EXTENSIONS + (".nrrd",) + METAIMAGE_EXTENSIONS + (".dcm",)


def volume_stem(path: str | os.PathLike) -> str:
    """The file (or folder) name of ``path`` without its volume extension (the longest of
    :data:`VOLUME_EXTENSIONS` it ends with, any case): ``case_0000.nii.gz`` -> ``case_0000``."""
    base = os.path.basename(os.path.normpath(os.fspath(path)))
    for ext in sorted(VOLUME_EXTENSIONS, key=len, reverse=True):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def volume_format(path: str | os.PathLike) -> str | None:
    """``"nifti"``, ``"nrrd"``, ``"metaimage"`` or ``"dicom"`` from the name (a folder or an
    extension-less file with the DICOM magic is ``"dicom"``); ``None`` otherwise. No voxel is read."""
    p = os.fspath(path)
    lower = p.lower()
    if is_nifti_path(lower):
        return "nifti"
    if lower.endswith(NRRD_EXTENSIONS):
        return "nrrd"
    if lower.endswith(METAIMAGE_EXTENSIONS):
        return "metaimage"
    if lower.endswith(DICOM_EXTENSIONS):
        return "dicom"
    from .dicom_scan import folder_has_dicom, looks_like_dicom

    if os.path.isdir(p):
        return "dicom" if folder_has_dicom(p) else None
    if os.path.isfile(p) and looks_like_dicom(p):
        return "dicom"
    return None


def is_volume_path(path: str | os.PathLike) -> bool:
    """True for a file this package reads (by name, or the DICOM magic) or a folder holding DICOM files."""
    try:
        p = os.fspath(path)
    except TypeError:
        return False
    if not isinstance(p, str) or not os.path.exists(p):
        return False
    if os.path.isdir(p):
        return volume_format(p) == "dicom"
    return volume_format(p) is not None


def read_volume(path: str | os.PathLike) -> Volume:
    """Read any supported volume: NIfTI, NRRD, MetaImage, one DICOM series or a DICOM-SEG.

    Args:
        path: A ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd`` file, a DICOM folder
            holding one series, a DICOM file standing for its series, or a DICOM-SEG file.

    Returns:
        The volume in napari order with its RAS+ affine and source geometry.

    Raises:
        VolumeError: unknown format, unreadable file, irregular DICOM series, or a folder with
            several series (the message lists them; use :func:`read_dicom_series`).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeError(f"{path}: no such file or folder")
    fmt = volume_format(path)
    if fmt == "nifti":
        return read_nifti(path)
    if fmt == "nrrd":
        return read_nrrd(path)
    if fmt == "metaimage":
        return read_metaimage(path)
    if fmt == "dicom":
        from .dicom import read_dicom

        return read_dicom(path)
    what = "folder holds no DICOM files" if os.path.isdir(path) else "is not a supported volume"
    raise VolumeError(f"{path}: {what} (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, MetaImage .mha/.mhd, "
                      "a DICOM series folder or file, or a DICOM-SEG file)")


def write_volume(
    path: str | os.PathLike,
    data: np.ndarray,
    geometry: dict | Volume | None,
    *,
    is_label: bool = False,
    label_names: dict | None = None,
    spacing: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
) -> str:
    """Write ``data`` (napari order) in the format its name says, in the given geometry, atomically.

    Args:
        path: ``.nii``/``.nii.gz``, ``.nrrd``, ``.mha``/``.mhd``, or ``.dcm`` (DICOM-SEG: labels on a
            DICOM series' grid only).
        data: ``(y, x)``, ``(z, y, x)`` or channels first ``(C, z, y, x)``.
        geometry: ``metadata["medseg_geometry"]`` of a layer, or a :class:`Volume`; ``None`` builds
            an axis-aligned geometry from ``spacing``/``translate``. A layer geometry that carries
            ``"layer_axes"`` means ``data`` is the layer's (transposed) array: it is transposed back
            to the source layout first (:func:`~napari_medseg.io.world.to_volume_order`).
        is_label: Integer labels (the smallest unsigned type that holds them).
        label_names: ``{value: name}``; DICOM-SEG segment labels (other formats ignore them).
        spacing, translate: Napari-order voxel size and origin when there is no geometry.

    Returns:
        The written path.

    Raises:
        VolumeError: unknown extension, DICOM-SEG without a DICOM geometry or for an image,
            unconvertible data, or the file cannot be written (the previous file stays intact).
    """
    path = os.fspath(path)
    lower = path.lower()
    geometry = _checked_geometry(path, geometry)
    try:
        data, geometry = to_volume_order(data, geometry)
    except ValueError as exc:
        raise VolumeError(f"{path}: {exc}") from exc
    if is_nifti_path(lower):
        return write_nifti(path, data, geometry, spacing=spacing, translate=translate, is_label=is_label)
    if lower.endswith(".nrrd"):
        return write_nrrd(path, data, geometry, spacing=spacing, translate=translate, is_label=is_label)
    if lower.endswith(METAIMAGE_EXTENSIONS):
        return write_metaimage(path, data, geometry, spacing=spacing, translate=translate, is_label=is_label)
    if lower.endswith(".dcm"):
        if not is_label:
            raise VolumeError(f"{path}: only label maps can be saved as DICOM (DICOM-SEG); save images as "
                              ".nii.gz, .nrrd or .mha")
        return write_dicom_seg(path, data, geometry, label_names)
    raise VolumeError(f"{path}: unknown output format; use one of {', '.join(WRITE_EXTENSIONS)}")


def _checked_geometry(path: str, geometry: dict | Volume | None) -> dict | None:
    """The geometry as a dict, refusing one without a finite, invertible affine (before writing)."""
    if isinstance(geometry, Volume):
        geometry = geometry_from_volume(geometry)
    if geometry is None:
        return None
    if not isinstance(geometry, dict) or "affine" not in geometry:
        raise VolumeError(f"{path}: the geometry must be a dict with an 'affine' (or a Volume), got "
                          f"{type(geometry).__name__}; nothing was written")
    try:
        check_affine(geometry["affine"], path)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{exc}; nothing was written") from exc
    return geometry


def read_dicom_series(path, *, strict: bool = False) -> list[Volume]:
    """Every series in a DICOM folder or list of files (see :mod:`napari_medseg.io.dicom`)."""
    from .dicom import read_dicom_series as impl

    return impl(path, strict=strict)


def read_dicom_seg(path, reference=None) -> Volume:
    """A DICOM-SEG file as a label volume (see :mod:`napari_medseg.io.dicom_seg_read`)."""
    from .dicom_seg_read import read_dicom_seg as impl

    return impl(path, reference)


def write_dicom_seg(path, labels, geometry, label_names=None, **kwargs) -> str:
    """Labels on a DICOM series' grid as DICOM-SEG (see :mod:`napari_medseg.io.dicom_seg`)."""
    from .dicom_seg import write_dicom_seg as impl

    return impl(path, labels, geometry, label_names, **kwargs)


def read_nrrd(path) -> Volume:
    """An NRRD file (see :mod:`napari_medseg.io.nrrd_io`)."""
    from .nrrd_io import read_nrrd as impl

    return impl(path)


def write_nrrd(path, data, geometry=None, **kwargs) -> str:
    """An NRRD file (see :mod:`napari_medseg.io.nrrd_io`)."""
    from .nrrd_io import write_nrrd as impl

    return impl(path, data, _checked_geometry(os.fspath(path), geometry), **kwargs)


def read_metaimage(path) -> Volume:
    """A MetaImage file (see :mod:`napari_medseg.io.metaimage`)."""
    from .metaimage import read_metaimage as impl

    return impl(path)


def write_metaimage(path, data, geometry=None, **kwargs) -> str:
    """A MetaImage file (see :mod:`napari_medseg.io.metaimage`)."""
    from .metaimage import write_metaimage as impl

    return impl(path, data, _checked_geometry(os.fspath(path), geometry), **kwargs)
