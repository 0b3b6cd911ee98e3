"""DICOM in: a folder (or files) becomes one :class:`Volume` per series; DICOM-SEG files become labels.

- :func:`read_dicom_series` reads every series among a folder's files (recursively) or a list of
  files: image series (see :mod:`~napari_medseg.io.dicom_series` for the geometry rules and the
  irregular series it refuses) and DICOM-SEG objects (label volumes). With ``strict=False`` a
  series that cannot be read is reported (logging and a ``UserWarning``) and the others are
  returned; with ``strict=True`` the first problem raises.
- :func:`read_dicom` returns exactly one volume: a folder holding one series, a single file
  standing for its series (its siblings in the same folder with the same ``SeriesInstanceUID``),
  an enhanced multi-frame file, or a DICOM-SEG file. A folder with several series raises a
  :class:`VolumeError` that lists them.

The volume's header keeps what a DICOM-SEG needs (``header["dicom"]``: Study, Series and Frame of
Reference UIDs, patient and study attributes, and per slice in volume order the SOP Instance UID,
file, frame and ``ImagePositionPatient``).
"""

from __future__ import annotations

import logging
import os
import warnings

from .dicom_scan import (
    SEG_SOP_CLASSES,
    Series,
    find_dicom_files,
    looks_like_dicom,
    read_header,
    scan_series,
)
from .dicom_seg_read import read_dicom_seg
from .dicom_series import build_series_volume
from .volume import Volume, VolumeError, foreign_errors_as

logger = logging.getLogger(__name__)

NON_IMAGE_MODALITIES = {"RTSTRUCT": "RT structure set contours are not supported yet", "SR": "a structured report",
                        "PR": "a presentation state", "KO": "a key object selection", "REG": "a registration"}

__all__ = ["dicom_volume_name", "is_dicom_seg_file", "read_dicom", "read_dicom_series"]


def is_dicom_seg_file(path: str) -> bool:
    """True when ``path`` is a DICOM file whose SOP class is Segmentation (binary/fractional or label map)."""
    if not (os.path.isfile(path) and looks_like_dicom(path)):
        return False
    try:
        return str(read_header(path).get("SOPClassUID", "")) in SEG_SOP_CLASSES
    except VolumeError:
        return False


def dicom_volume_name(vol: Volume) -> str:
    """A layer name: the series description (the SEG's own for a segmentation)."""
    info = vol.header.get("dicom") or {}
    seg = info.get("seg") or {}
    return str(seg.get("series_description") or info.get("series_description") or "DICOM series")


def _where(path: str, series: Series) -> str:
    return f"{path} [series '{series.description}']"


def _series_volumes(path: str, series: list[Series], segs: list, strict: bool,
                    problems: list[str]) -> tuple[list[Volume], list[str]]:
    volumes: list[Volume] = []
    errors: list[str] = []
    for s in series:
        try:
            volumes.append(build_series_volume(s, _where(path, s)))
        except VolumeError as exc:
            if problems:  # an unreadable file may be the missing slice: say so
                exc = VolumeError(f"{exc}. Note: {len(problems)} file(s) could not be read, e.g. {problems[0]}")
            if strict:
                raise exc from None
            errors.append(str(exc))
        for reason in s.skipped:
            logger.info("%s", reason)
    by_series = {v.header["dicom"]["series_instance_uid"]: v for v in volumes}
    for seg_path, ds in segs:
        refs = list(ds.get("ReferencedSeriesSequence") or [])
        source = by_series.get(str(refs[0].get("SeriesInstanceUID", ""))) if len(refs) == 1 else None
        try:
            volumes.append(read_dicom_seg(seg_path, reference=source))
        except VolumeError as exc:
            if strict:
                raise
            errors.append(str(exc))
    return volumes, errors


@foreign_errors_as("DICOM data")
def read_dicom_series(path: str | os.PathLike | list, *, strict: bool = False) -> list[Volume]:
    """Every series among the DICOM files of a folder (recursively) or a list of files.

    Args:
        path: A folder, a file, or a list of files/folders.
        strict: Raise on the first series that cannot be read instead of skipping it.

    Returns:
        Image volumes (one per series, in the order first seen), then DICOM-SEG label volumes.

    Raises:
        VolumeError: no DICOM file, or no series could be read (every reason is listed), or (strict)
            one series is irregular.
    """
    where = os.fspath(path) if not isinstance(path, (list, tuple)) else f"{len(path)} paths"
    files = find_dicom_files(path)
    if not files:
        raise VolumeError(f"{where}: no DICOM files found")
    series, segs, problems = scan_series(files)
    if strict and problems and not series and not segs:
        raise VolumeError(f"{where}: no readable DICOM image: " + "; ".join(problems[:5]))
    volumes, errors = _series_volumes(where, series, segs, strict, problems)
    if not volumes:
        reasons = errors + problems
        raise VolumeError(f"{where}: no DICOM series could be read: " + "; ".join(reasons[:5])
                          + (f" (and {len(reasons) - 5} more)" if len(reasons) > 5 else ""))
    for message in errors:
        logger.warning("%s", message)
        warnings.warn(message, UserWarning, stacklevel=2)
    if problems:
        logger.info("%s: %d file(s) skipped, e.g. %s", where, len(problems), problems[0])
    return volumes


def _siblings(path: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(path))
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    return [f for f in (os.path.join(folder, n) for n in names) if os.path.isfile(f) and looks_like_dicom(f)]


def _read_one_file(path: str) -> Volume:
    ds = read_header(path)
    if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES:
        return read_dicom_seg(path)
    if str(ds.get("Modality", "")) in NON_IMAGE_MODALITIES:
        raise VolumeError(f"{path}: a DICOM {ds.Modality} object holds no image "
                          f"({NON_IMAGE_MODALITIES[str(ds.Modality)]}); open the image series instead")
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    alone = int(ds.get("NumberOfFrames", 1) or 1) > 1 or not uid  # enhanced multi-frame: the file is the series
    series, _segs, problems = scan_series([path] if alone else _siblings(path))
    series = [s for s in series if alone or s.uid == uid]
    if not series:
        raise VolumeError(f"{path}: not a readable DICOM image: " + "; ".join(problems[:3]))
    return build_series_volume(series[0], _where(path, series[0]))


@foreign_errors_as("DICOM data")
def read_dicom(path: str | os.PathLike) -> Volume:
    """Exactly one volume from a DICOM folder or file (see the module docstring).

    Raises:
        VolumeError: nothing readable, an irregular series, or a folder holding several series
            (the message lists them; :func:`read_dicom_series` returns them all).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return _read_one_file(path)
    if not os.path.isdir(path):
        raise VolumeError(f"{path}: no such file or folder")
    files = find_dicom_files(path)
    if not files:
        raise VolumeError(f"{path}: no DICOM files found")
    series, segs, problems = scan_series(files)
    if len(series) + len(segs) > 1:
        listing = [f"'{s.description}' ({s.uid}, {len(s.records)} slices)" for s in series]
        listing += [f"DICOM-SEG {os.path.basename(p)}" for p, _ in segs]
        raise VolumeError(f"{path}: the folder holds {len(listing)} series: " + "; ".join(listing)
                          + ". Open one series' folder, or use read_dicom_series() to read them all")
    volumes, errors = _series_volumes(path, series, segs, True, problems)
    if not volumes:
        raise VolumeError(f"{path}: no DICOM image could be read: " + "; ".join((errors + problems)[:5]))
    return volumes[0]
