"""Build a :class:`Volume` from the slices of one DICOM series, or say clearly why not.

Geometry (DICOM PS3.3 C.7.6.2): each slice's ``ImageOrientationPatient`` gives the row and column
directions (LPS), their cross product the slice normal ``n``. Slices are sorted by the projection
of ``ImagePositionPatient`` on ``n`` (ascending, so the third voxel axis points along ``n``), and
the slice spacing comes from those positions, never from ``SliceThickness``. The voxel-to-LPS
matrix has columns ``row_dir * column_spacing``, ``col_dir * row_spacing``, ``n * spacing`` and the
first slice's position as origin; ``Volume.affine`` is that matrix in RAS+ (x and y negated).

Refused with a :class:`VolumeError` that says where: mixed orientations, slices of different
size or pixel spacing, several slices at one position (echoes, phases), missing slices (a gap
of more than 1.5 spacings), uneven spacing (a slice more than 2 % of a spacing off the regular
grid), and stacks that are not perpendicular to their planes (gantry tilt: the in-plane drift
over the stack exceeds 5 % of a pixel), compressed transfer syntaxes with no installed decoder
(the message names the package to install).

Voxels: ``RescaleSlope``/``RescaleIntercept`` are applied per slice (Hounsfield units for CT);
integers stay integers (int16, else int32) when every slope is 1 and every intercept an integer,
otherwise float32.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pydicom
from pydicom.uid import UID

from .dicom_scan import Series, SliceRecord
from .nifti import MAX_VOXELS
from .volume import Volume, VolumeError, geometry_from_volume
from .world import RAS_FROM_LPS

logger = logging.getLogger(__name__)

__all__ = ["build_series_volume", "check_decoders", "series_affine_lps", "sort_slices"]

ORIENTATION_TOL = 1e-4
MISSING_RATIO = 1.5
SPACING_TOL = 0.02
INPLANE_TOL = 0.05
DUPLICATE_MM = 1e-3
PIP_NAMES = {"gdcm": "python-gdcm", "pylibjpeg": "pylibjpeg", "pyjpegls": "pyjpegls",
             "pillow": "pillow", "numpy": "numpy"}


def _label(r: SliceRecord) -> str:
    where = os.path.basename(r.path) + (f" frame {r.frame + 1}" if r.frame is not None else "")
    return f"{where} (InstanceNumber {r.instance_number})" if r.instance_number is not None else where


def normal_of(orientation: np.ndarray) -> np.ndarray:
    """Unit slice normal ``row_dir x col_dir`` of an ``ImageOrientationPatient``."""
    n = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise VolumeError(f"ImageOrientationPatient {list(orientation)} has parallel row and column directions")
    return n / norm


def _check_uniform(records: list[SliceRecord], where: str) -> None:
    """Same orientation, matrix size and pixel spacing for every slice."""
    groups: dict[tuple, list[SliceRecord]] = {}
    for r in records:
        key = next((k for k in groups if np.allclose(k, r.orientation, atol=ORIENTATION_TOL)), None)
        groups.setdefault(key if key is not None else tuple(r.orientation), []).append(r)
    if len(groups) > 1:
        parts = [f"{len(v)} slices with ({', '.join(f'{x:.4g}' for x in k)})" for k, v in groups.items()]
        raise VolumeError(f"{where}: mixed slice orientations (ImageOrientationPatient): {'; '.join(parts)}. "
                          "Put each orientation in its own series, or drop the localisers")
    sizes = {(r.rows, r.columns) for r in records}
    if len(sizes) > 1:
        raise VolumeError(f"{where}: slices of different sizes (Rows x Columns {sorted(sizes)})")
    spacings = np.array([r.pixel_spacing for r in records])
    if np.ptp(spacings, axis=0).max() > 1e-4 * spacings.max():
        raise VolumeError(f"{where}: slices with different PixelSpacing ({np.unique(spacings, axis=0).tolist()})")
    if any(r.samples_per_pixel != 1 for r in records):
        raise VolumeError(f"{where}: colour images (SamplesPerPixel > 1) are not supported; greyscale only")


def _check_gaps(recs: list[SliceRecord], d: np.ndarray, where: str) -> float:
    """Refuse duplicated positions, missing slices and uneven spacing; return the slice spacing."""
    diffs = np.diff(d)
    dup = np.nonzero(diffs < DUPLICATE_MM)[0]
    if dup.size:
        i = int(dup[0])
        raise VolumeError(
            f"{where}: {dup.size} position(s) hold more than one slice (e.g. {_label(recs[i])} and {_label(recs[i + 1])} at {d[i]:.3f} mm along the normal): "
            "the series holds several volumes (echoes, time points or repeated acquisitions); split it first")
    med = float(np.median(diffs))
    gaps = np.nonzero(diffs > MISSING_RATIO * med)[0]
    if gaps.size:
        parts = [f"between {_label(recs[i])} at {d[i]:.3f} mm and {_label(recs[i + 1])} at {d[i + 1]:.3f} mm "
                 f"along the slice normal (a {diffs[i]:.3f} mm gap, about {round(diffs[i] / med) - 1} slice(s) "
                 "missing)" for i in gaps[:5]]
        more = f" and {gaps.size - 5} more gaps" if gaps.size > 5 else ""
        raise VolumeError(f"{where}: missing slices " + "; ".join(parts) + more
                          + f"; elsewhere the spacing is {med:.3f} mm")
    step = float((d[-1] - d[0]) / (len(d) - 1))
    dev = d - (d[0] + step * np.arange(len(d)))
    worst = int(np.argmax(np.abs(dev)))
    if abs(dev[worst]) > SPACING_TOL * step:
        raise VolumeError(
            f"{where}: uneven slice spacing: gaps from {diffs.min():.3f} to {diffs.max():.3f} mm; "
            f"{_label(recs[worst])} lies {dev[worst]:+.3f} mm off a regular {step:.3f} mm grid "
            "(napari-medseg does not resample irregular stacks)")
    return step


def _check_perpendicular(recs: list[SliceRecord], d: np.ndarray, normal: np.ndarray, where: str,
                         tilt_tag: float | None) -> None:
    """Refuse stacks whose slice origins drift in-plane (gantry tilt, sheared stacks)."""
    p = np.array([r.position for r in recs])
    rel = p - p[0]
    inplane = rel - np.outer(rel @ normal, normal)
    drift = np.linalg.norm(inplane, axis=1)
    tol = INPLANE_TOL * min(recs[0].pixel_spacing)
    if drift.max() <= tol:
        return
    along = d[-1] - d[0]
    angle = float(np.degrees(np.arctan2(drift[-1], abs(along)))) if along else 90.0
    tag = f"; GantryDetectorTilt is {tilt_tag:g} degrees" if tilt_tag else ""
    raise VolumeError(
        f"{where}: the slices are not stacked perpendicular to their planes (gantry tilt or a sheared "
        f"stack: the stack leans {angle:.2f} degrees off the slice normal{tag}; slice origins drift up to "
        f"{drift.max():.2f} mm in-plane, e.g. {_label(recs[int(np.argmax(drift))])}). A volume on a "
        "rectangular grid would misplace voxels, so napari-medseg refuses it; resample the series first "
        "(e.g. dcm2niix corrects gantry tilt)")


def sort_slices(records: list[SliceRecord], where: str, tilt_tag: float | None = None
                ) -> tuple[list[SliceRecord], np.ndarray, float]:
    """Sort along the normal and check the stack.

    Returns:
        ``(sorted records, unit normal (LPS), slice spacing in mm)``.

    Raises:
        VolumeError: irregular series (see the module docstring), naming where.
    """
    _check_uniform(records, where)
    normal = normal_of(records[0].orientation)
    key = [(float(r.position @ normal), r.instance_number or 0) for r in records]
    order = sorted(range(len(records)), key=lambda i: key[i])
    recs = [records[i] for i in order]
    d = np.array([key[i][0] for i in order])
    if len(recs) == 1:
        return recs, normal, 0.0
    step = _check_gaps(recs, d, where)
    _check_perpendicular(recs, d, normal, where, tilt_tag)
    return recs, normal, step


def series_affine_lps(first: SliceRecord, normal: np.ndarray, step: float) -> np.ndarray:
    """Voxel ``(i, j, k)`` -> LPS mm for slices sorted along ``normal`` ``step`` mm apart."""
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    aff = np.eye(4)
    aff[:3, 0] = row_dir / np.linalg.norm(row_dir) * first.pixel_spacing[1]  # i runs along a row
    aff[:3, 1] = col_dir / np.linalg.norm(col_dir) * first.pixel_spacing[0]  # j runs down a column
    aff[:3, 2] = normal * step
    aff[:3, 3] = first.position
    return aff


def check_decoders(records: list[SliceRecord], where: str) -> None:
    """Refuse compressed pixel data that no installed pydicom decoder can read, naming the package."""
    from pydicom.pixels import get_decoder

    for ts in sorted({r.transfer_syntax for r in records if r.transfer_syntax}):
        uid = UID(ts)
        if not uid.is_transfer_syntax:
            raise VolumeError(f"{where}: '{ts}' is not a known transfer syntax (corrupt file meta information)")
        if not uid.is_compressed:
            continue
        count = sum(r.transfer_syntax == ts for r in records)
        try:
            decoder = get_decoder(uid)
        except NotImplementedError as exc:
            raise VolumeError(f"{where}: {count} slice(s) use transfer syntax {uid.name} ({ts}), which "
                              "pydicom cannot decode at all") from exc
        if decoder.is_available:
            continue
        options = []
        for text in decoder.missing_dependencies:
            plugin, _, need = text.partition(" - requires ")
            pkgs = [PIP_NAMES.get(w.split(">")[0], w.split(">")[0]) for w in need.split(" and ")]
            options.append(f"`pip install {' '.join(pkgs)}` ({plugin})")
        raise VolumeError(f"{where}: {count} slice(s) are compressed with {uid.name} ({ts}) and no installed "
                          f"decoder reads it; install one: {' or '.join(options)}")


def _frames_of(path: str) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path, force=True)
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; report them as one
        raise VolumeError(f"{path}: pixel data could not be decoded ({type(exc).__name__}: {exc})") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return arr.reshape((frames, *arr.shape[-2:])) if arr.ndim == 2 or frames == 1 else arr


def load_pixels(recs: list[SliceRecord], where: str) -> np.ndarray:
    """Stack the slices' stored values with the rescale applied, shape ``(k, rows, columns)``."""
    total = len(recs) * recs[0].rows * recs[0].columns
    if total > MAX_VOXELS:
        raise VolumeError(f"{where}: {total} voxels, more than the {MAX_VOXELS} napari-medseg reads")
    check_decoders(recs, where)
    cache: dict[str, np.ndarray] = {}
    slopes = np.array([r.slope for r in recs])
    inters = np.array([r.intercept for r in recs])
    exact = bool(np.all(slopes == 1.0) and np.all(inters == np.round(inters)))
    planes = []
    for r in recs:
        if r.path not in cache:
            cache = {r.path: _frames_of(r.path)}  # files are grouped, so one multi-frame file stays cached
        frames = cache[r.path]
        plane = frames[r.frame or 0]
        if plane.shape != (r.rows, r.columns):
            raise VolumeError(f"{r.path}: pixel data of shape {plane.shape}, header says {(r.rows, r.columns)}")
        planes.append(plane)
    stored = np.stack(planes)
    if exact and stored.dtype.kind in "iu":
        out = stored.astype(np.int64) + inters.astype(np.int64)[:, None, None]
        lo, hi = (int(out.min()), int(out.max())) if out.size else (0, 0)
        dtype = np.int16 if -(2**15) <= lo and hi < 2**15 else np.int32
        return out.astype(dtype)
    return (stored.astype(np.float32) * slopes[:, None, None].astype(np.float32)
            + inters[:, None, None].astype(np.float32))


def _text(ds, key: str) -> str:
    value = ds.get(key, "")
    return "" if value is None else str(value)


def _dicom_header(series: Series, recs: list[SliceRecord], step: float) -> dict:
    ds = series.header
    thickness = ds.get("SliceThickness")
    return {
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "series_instance_uid": series.uid,
        "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID"),
        "sop_class_uid": recs[0].sop_class_uid,
        "modality": _text(ds, "Modality"),
        "series_description": series.description,
        "series_number": int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
        "specific_character_set": _text(ds, "SpecificCharacterSet") or None,
        "patient": {k: _text(ds, k) for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")},
        "study": {k: _text(ds, k) for k in ("StudyID", "StudyDate", "StudyTime", "AccessionNumber",
                                            "ReferringPhysicianName", "StudyDescription")},
        "image_orientation_patient": [float(v) for v in recs[0].orientation],
        "pixel_spacing": list(recs[0].pixel_spacing),
        "slice_thickness": float(thickness) if thickness not in (None, "") else None,
        "spacing_between_slices": float(step) if step else None,
        "rows": recs[0].rows,
        "columns": recs[0].columns,
        "multiframe": recs[0].frame is not None,
        "instances": [{"sop_instance_uid": r.sop_instance_uid, "file": os.path.abspath(r.path),
                       "frame": r.frame, "position": [float(v) for v in r.position]} for r in recs],
        "skipped": list(series.skipped),
    }


def build_series_volume(series: Series, where: str) -> Volume:
    """Sort, check and load one series.

    Args:
        series: Its slice records (from :func:`~napari_medseg.io.dicom_scan.scan_series`).
        where: How to name it in messages (the folder and the series description).

    Raises:
        VolumeError: an irregular or undecodable series (the message says what and where).
    """
    tilt = series.header.get("GantryDetectorTilt")
    try:
        tilt_value = float(tilt) if tilt not in (None, "") else None
    except (TypeError, ValueError):
        tilt_value = None
    recs, normal, step = sort_slices(series.records, where, tilt_value)
    if not step:  # one slice: the thickness (or 1 mm) stands for the spacing
        thick = series.header.get("SpacingBetweenSlices") or series.header.get("SliceThickness") or 1.0
        step = abs(float(thick)) or 1.0
    data = load_pixels(recs, where)
    affine = RAS_FROM_LPS @ series_affine_lps(recs[0], normal, step)
    spacing = (step, recs[0].pixel_spacing[0], recs[0].pixel_spacing[1])
    header = {"format": "dicom", "dtype": data.dtype.name, "dicom": _dicom_header(series, recs, step)}
    folder = os.path.dirname(os.path.abspath(recs[0].path))
    vol = Volume(data, spacing, affine, header, None, folder)
    vol.header = geometry_from_volume(vol)
    logger.info("%s: %d slices %s, spacing %s mm", where, len(recs), data.shape[1:], spacing)
    return vol
