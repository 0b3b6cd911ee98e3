"""Find DICOM files, read their headers (never the pixels) and group the slices into series.

A *slice record* is one 2D image in patient space: a single-frame file, or one frame of an
enhanced multi-frame file (its position, orientation, pixel spacing and rescale come from the
per-frame or shared functional groups). Records are grouped by ``SeriesInstanceUID``; DICOM-SEG
objects are kept apart (they become label volumes), other objects without an image plane
(structured reports, RT structure sets, presentation states) and localiser/scout images are
skipped with the reason recorded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .volume import VolumeError

logger = logging.getLogger(__name__)

__all__ = ["SEG_SOP_CLASSES", "Series", "SliceRecord", "find_dicom_files", "looks_like_dicom", "scan_series"]

MAX_FILES = 200_000
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
LOCALIZER_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVEY")


@dataclass
class SliceRecord:
    """One 2D image plane (a single-frame file or one frame of a multi-frame file)."""

    path: str
    frame: int | None
    sop_instance_uid: str
    sop_class_uid: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    instance_number: int | None
    transfer_syntax: str
    samples_per_pixel: int


@dataclass
class Series:
    """The slices of one ``SeriesInstanceUID`` and a representative header."""

    uid: str
    header: Dataset
    records: list[SliceRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        """``SeriesDescription``, else modality and series number."""
        text = str(self.header.get("SeriesDescription", "") or "").strip()
        if text:
            return text
        number = self.header.get("SeriesNumber", "")
        return f"{self.header.get('Modality', 'DICOM')} series {number}".strip()


def looks_like_dicom(path: str) -> bool:
    """True for a file with the ``DICM`` magic at byte 128, or a ``.dcm``-named file starting
    with a group 0002/0008 tag (DICOM without the preamble). Reads at most 132 bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return path.lower().endswith(DICOM_SUFFIXES) and head[:2] in (b"\x02\x00", b"\x08\x00")


def find_dicom_files(path: str | os.PathLike | list, *, limit: int = MAX_FILES) -> list[str]:
    """DICOM files in a folder (recursively, hidden entries skipped) or among a list of paths."""
    items = [os.fspath(p) for p in path] if isinstance(path, (list, tuple)) else [os.fspath(path)]
    found: list[str] = []
    for item in items:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    full = os.path.join(root, name)
                    if not name.startswith(".") and looks_like_dicom(full):
                        found.append(full)
                    if len(found) > limit:
                        raise VolumeError(f"{item}: more than {limit} DICOM files; open one series folder")
        elif os.path.isfile(item) and looks_like_dicom(item):
            found.append(item)
    return found


def folder_has_dicom(folder: str, *, max_entries: int = 400) -> bool:
    """Cheap check for napari's reader hook: a DICOM file among the first entries (depth <= 2)."""
    seen = 0
    for root, dirs, files in os.walk(folder):
        if root[len(folder):].count(os.sep) >= 2:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            seen += 1
            if seen > max_entries:
                return False
            if not name.startswith(".") and looks_like_dicom(os.path.join(root, name)):
                return True
    return False


def read_header(path: str) -> Dataset:
    """The header of one DICOM file, pixel data not read.

    Raises:
        VolumeError: not a readable DICOM file.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types (struct.error too) on corrupt files
        raise VolumeError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def dicom_floats(value, n: int, what: str, path: str) -> np.ndarray:
    """``value`` (a DICOM multi-value attribute) as ``n`` finite float64 numbers, or a
    :class:`VolumeError` naming the file and the attribute."""
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{path}: {what} is missing or not numeric ({value!r})") from exc
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{path}: {what} must be {n} finite numbers, got {value!r}")
    return arr


def functional_value(ds: Dataset, frame_item: Dataset | None, seq: str, attr: str):
    """An attribute from the per-frame functional group item, else the shared one, else ``None``."""
    for item in (frame_item, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if item is not None and seq in item and len(item[seq].value) and attr in item[seq].value[0]:
            return item[seq].value[0].get(attr)
    return None


def _is_localizer(ds: Dataset) -> bool:
    words = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return any(w in LOCALIZER_WORDS for w in words)


def _record(ds: Dataset, path: str, frame: int | None, values: dict) -> SliceRecord:
    if values["position"] is None or values["orientation"] is None or values["spacing"] is None:
        missing = [k for k in ("position", "orientation", "spacing") if values[k] is None]
        raise VolumeError(f"{path}: no image plane ({', '.join(missing)} missing): not a cross-sectional image")
    orientation = dicom_floats(values["orientation"], 6, "ImageOrientationPatient", path)
    spacing = dicom_floats(values["spacing"], 2, "PixelSpacing", path)
    if np.any(spacing <= 0):
        raise VolumeError(f"{path}: PixelSpacing {list(spacing)} must be positive")
    slope = float(values["slope"]) if values["slope"] not in (None, "") else 1.0
    intercept = float(values["intercept"]) if values["intercept"] not in (None, "") else 0.0
    number = ds.get("InstanceNumber")
    return SliceRecord(
        path=path, frame=frame, sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        position=dicom_floats(values["position"], 3, "ImagePositionPatient", path), orientation=orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])), rows=int(ds.Rows), columns=int(ds.Columns),
        slope=slope, intercept=intercept, instance_number=int(number) if number not in (None, "") else None,
        transfer_syntax=str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
    )


def slice_records(ds: Dataset, path: str) -> list[SliceRecord]:
    """The image planes of one file: one for a single-frame image, one per frame otherwise.

    Raises:
        VolumeError: no pixel data attributes or no image plane (position/orientation/spacing).
    """
    if "Rows" not in ds or "Columns" not in ds or "SOPInstanceUID" not in ds:
        raise VolumeError(f"{path}: not an image (no Rows/Columns/SOPInstanceUID)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        if frames > 1:
            raise VolumeError(f"{path}: a legacy multi-frame image ({frames} frames without functional "
                              "groups) has no per-frame positions; napari-medseg cannot place it in space")
        values = {"position": ds.get("ImagePositionPatient"), "orientation": ds.get("ImageOrientationPatient"),
                  "spacing": ds.get("PixelSpacing"), "slope": ds.get("RescaleSlope"),
                  "intercept": ds.get("RescaleIntercept")}
        return [_record(ds, path, None, values)]
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if per_frame and len(per_frame) != frames:
        raise VolumeError(f"{path}: {len(per_frame)} per-frame functional groups for {frames} frames")
    records = []
    for f in range(frames):
        item = per_frame[f] if per_frame else None
        values = {
            "position": functional_value(ds, item, "PlanePositionSequence", "ImagePositionPatient"),
            "orientation": functional_value(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"),
            "spacing": functional_value(ds, item, "PixelMeasuresSequence", "PixelSpacing"),
            "slope": functional_value(ds, item, "PixelValueTransformationSequence", "RescaleSlope"),
            "intercept": functional_value(ds, item, "PixelValueTransformationSequence", "RescaleIntercept"),
        }
        records.append(_record(ds, path, f, values))
    return records


def _scan_one(path: str, series: dict[str, Series], segs: list) -> None:
    ds = read_header(path)
    if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES:
        segs.append((path, ds))
        return
    uid = str(ds.get("SeriesInstanceUID", "") or f"(no SeriesInstanceUID) {path}")
    records = None if _is_localizer(ds) else slice_records(ds, path)
    entry = series.setdefault(uid, Series(uid, ds))
    if records is None:
        entry.skipped.append(f"{path}: localiser/scout image skipped")
        return
    if not entry.records:
        entry.header = ds  # an image, not a skipped localiser, represents the series
    entry.records.extend(records)


def scan_series(files: list[str]) -> tuple[list[Series], list[tuple[str, Dataset]], list[str]]:
    """Read the headers of ``files`` and group them.

    Returns:
        ``(series, segs, problems)``: image series in the order first seen, DICOM-SEG files
        ``(path, header)``, and one message per file that was skipped entirely.
    """
    series: dict[str, Series] = {}
    segs: list[tuple[str, Dataset]] = []
    problems: list[str] = []
    for path in files:
        try:
            _scan_one(path, series, segs)
        except VolumeError as exc:
            problems.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - pydicom parses values lazily: corrupt ones fail here
            problems.append(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})")
    empty = [s for s in series.values() if not s.records]
    for s in empty:
        problems.extend(s.skipped or [f"series {s.uid}: no images"])
    return [s for s in series.values() if s.records], segs, problems
