"""Read a DICOM Segmentation into a label :class:`Volume` (value = segment number) in world space.

The frames' ``PlanePositionSequence`` positions are projected on the slice normal. The slice
spacing is the shared ``SpacingBetweenSlices`` (highdicom always writes it) or the smallest gap
between frame positions. When every frame names its source image (``DerivationImageSequence``)
and the positions agree with the order of the referenced instances (``ReferencedSeriesSequence``,
slice order for files this package writes), the grid is the full source series, so that the labels
come back on exactly the grid they were saved from; otherwise it spans the frames present.
BINARY, FRACTIONAL (a voxel belongs to a segment at >= half the maximum value) and LABELMAP
segmentations are read; frames on a tilted or irregular grid are refused with a clear message.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pydicom

from .dicom_scan import SEG_SOP_CLASSES, dicom_floats, functional_value
from .dicom_series import normal_of
from .nifti import MAX_VOXELS
from .volume import Volume, VolumeError, foreign_errors_as, geometry_from_volume
from .world import RAS_FROM_LPS

logger = logging.getLogger(__name__)

__all__ = ["read_dicom_seg"]

GRID_TOL = 0.1  # a frame may sit this fraction of a slice spacing off the grid


def _frame_table(ds, path: str) -> dict:
    """Per frame: position, segment number, source SOP UID; plus the shared plane geometry."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    per = list(ds.get("PerFrameFunctionalGroupsSequence") or [None] * frames)
    if len(per) != frames:
        raise VolumeError(f"{path}: {len(per)} per-frame functional groups for {frames} frames")
    iops = [functional_value(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient") for item in per]
    iop = dicom_floats(iops[0], 6, "ImageOrientationPatient", path)
    if any(not np.allclose(dicom_floats(o, 6, "ImageOrientationPatient", path), iop, atol=1e-4) for o in iops[1:]):
        raise VolumeError(f"{path}: frames with different orientations cannot form one label volume")
    spacing = dicom_floats(functional_value(ds, per[0], "PixelMeasuresSequence", "PixelSpacing"), 2, "PixelSpacing", path)
    between = functional_value(ds, per[0], "PixelMeasuresSequence", "SpacingBetweenSlices")
    thickness = functional_value(ds, per[0], "PixelMeasuresSequence", "SliceThickness")
    positions, segments, sources = [], [], []
    for item in per:
        positions.append(dicom_floats(functional_value(ds, item, "PlanePositionSequence", "ImagePositionPatient"), 3,
                              "ImagePositionPatient (PlanePositionSequence)", path))
        segments.append(functional_value(ds, item, "SegmentIdentificationSequence", "ReferencedSegmentNumber"))
        uid = None
        deriv = item.get("DerivationImageSequence") if item is not None else None
        if deriv and "SourceImageSequence" in deriv[0] and "ReferencedFrameNumber" not in deriv[0].SourceImageSequence[0]:
            uid = str(deriv[0].SourceImageSequence[0].get("ReferencedSOPInstanceUID", "")) or None
        sources.append(uid)
    return {"iop": iop, "pixel_spacing": spacing, "shape": (int(ds.Rows), int(ds.Columns)), "between": float(between) if between else None,
            "thickness": float(thickness) if thickness else None, "positions": np.array(positions),
            "segments": segments, "sources": sources}


def _referenced(ds) -> tuple[str, str | None, list[str]]:
    refs = list(ds.get("ReferencedSeriesSequence") or [])
    if len(refs) != 1:
        return "", None, []
    items = list(refs[0].get("ReferencedInstanceSequence") or [])
    cls = str(items[0].get("ReferencedSOPClassUID", "")) if items else None
    return str(refs[0].get("SeriesInstanceUID", "")), cls, [str(i.get("ReferencedSOPInstanceUID", "")) for i in items]


def _grid(table: dict, refs: list[str], path: str) -> tuple[np.ndarray, float, np.ndarray, int, list]:
    """``(slice index per frame, spacing, origin LPS, number of slices, uid per slice)``."""
    normal = normal_of(table["iop"])
    p = table["positions"]
    d = p @ normal
    uniq = np.unique(np.round(d, 4))
    step = table["between"] or (float(np.min(np.diff(uniq))) if uniq.size > 1 else table["thickness"] or 1.0)
    if step <= 0:
        raise VolumeError(f"{path}: SpacingBetweenSlices {step} must be positive")
    index = {uid: k for k, uid in enumerate(refs)}
    if refs and all(s in index for s in table["sources"]):
        idx = np.array([index[s] for s in table["sources"]])
        origins = p - np.outer(idx * step, normal)
        if np.allclose(origins, origins[0], atol=GRID_TOL * step):
            return idx, step, origins[0], len(refs), list(refs)
        logger.info("%s: referenced instances are not in slice order; the grid spans the frames", path)
    lo = int(np.argmin(d))
    rel = (d - d[lo]) / step
    idx = np.round(rel).astype(int)
    if np.max(np.abs(rel - idx)) > GRID_TOL:
        raise VolumeError(f"{path}: frame positions are not on a regular {step:.4g} mm grid along the slice normal")
    origin = p[lo]
    inplane = (p - origin) - np.outer((p - origin) @ normal, normal)
    if np.max(np.linalg.norm(inplane, axis=1)) > 0.05 * float(min(table["pixel_spacing"])):
        raise VolumeError(f"{path}: frames are not stacked perpendicular to their planes (tilted grid)")
    n = int(idx.max()) + 1
    uids: list = [None] * n
    for k, s in zip(idx, table["sources"]):
        uids[k] = s
    return idx, step, origin, n, uids


def _grid_on_reference(table: dict, reference: dict, path: str):
    """Frames placed on a known source grid (the series read beside the SEG), or ``None``."""
    info = reference.get("dicom") or {}
    insts = info.get("instances") or []
    if not insts or not np.allclose(info.get("image_orientation_patient", []), table["iop"], atol=1e-4):
        return None
    if (int(info.get("rows", -1)), int(info.get("columns", -1))) != tuple(table["shape"]):
        return None
    grid = np.array([inst["position"] for inst in insts], dtype=np.float64)
    step = float(info.get("spacing_between_slices") or table["between"] or 1.0)
    idx = []
    for p in table["positions"]:
        dist = np.linalg.norm(grid - p, axis=1)
        k = int(np.argmin(dist))
        if dist[k] > GRID_TOL * step:
            logger.info("%s: a frame lies off the referenced series' grid; the grid spans the frames", path)
            return None
        idx.append(k)
    return np.array(idx), step, grid[0], len(insts), insts


def _pixels(path: str, ds) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    total = frames * int(ds.Rows) * int(ds.Columns)
    if total > MAX_VOXELS:
        raise VolumeError(f"{path}: {total} voxels, more than the {MAX_VOXELS} napari-medseg reads")
    try:
        arr = pydicom.dcmread(path, force=True).pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise VolumeError(f"{path}: DICOM-SEG pixel data could not be decoded ({type(exc).__name__}: {exc})") from exc
    return arr.reshape(frames, int(ds.Rows), int(ds.Columns))


def _fill(ds, table: dict, idx: np.ndarray, n: int, pix: np.ndarray, path: str) -> np.ndarray:
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    numbers = [int(s.SegmentNumber) for s in ds.get("SegmentSequence") or []]
    top = max(numbers + [int(pix.max()) if seg_type == "LABELMAP" and pix.size else 0, 1])
    labels = np.zeros((n, pix.shape[1], pix.shape[2]), np.uint8 if top < 256 else np.uint16)
    threshold = 0.5 * float(ds.get("MaximumFractionalValue", 1) or 1) if seg_type == "FRACTIONAL" else 0.5
    overlap = 0
    for f, k in enumerate(idx):
        if seg_type == "LABELMAP":
            labels[k] = np.where(pix[f] > 0, pix[f], labels[k])
            continue
        if table["segments"][f] is None:
            raise VolumeError(f"{path}: frame {f + 1} names no segment (SegmentIdentificationSequence)")
        mask = pix[f] >= threshold
        overlap += int(np.count_nonzero(labels[k][mask]))
        labels[k][mask] = int(table["segments"][f])
    if overlap:
        logger.warning("%s: %d voxels belong to several segments; the highest segment number is kept", path, overlap)
    return labels


def _header(ds, path: str, table: dict, uids: list, origin: np.ndarray, step: float, normal: np.ndarray,
            series_uid: str, cls: str | None) -> dict:
    def text(key: str) -> str:
        return str(ds.get(key, "") or "")

    names = {int(s.SegmentNumber): str(s.get("SegmentLabel", "") or f"segment {s.SegmentNumber}")
             for s in ds.get("SegmentSequence") or []}
    instances = [dict(u) if isinstance(u, dict) else
                 {"sop_instance_uid": u, "file": None, "frame": None,
                  "position": [float(v) for v in origin + k * step * normal]} for k, u in enumerate(uids)]
    return {"format": "dicom", "label_names": {str(k): v for k, v in names.items()}, "dicom": {
        "study_instance_uid": text("StudyInstanceUID"), "series_instance_uid": series_uid,
        "frame_of_reference_uid": text("FrameOfReferenceUID"), "sop_class_uid": cls or "",
        "modality": "", "series_description": "", "series_number": None,
        "specific_character_set": text("SpecificCharacterSet") or None,
        "patient": {k: text(k) for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")},
        "study": {k: text(k) for k in ("StudyID", "StudyDate", "StudyTime", "AccessionNumber",
                                       "ReferringPhysicianName", "StudyDescription")},
        "image_orientation_patient": [float(v) for v in table["iop"]],
        "pixel_spacing": [float(v) for v in table["pixel_spacing"]], "slice_thickness": table["thickness"],
        "spacing_between_slices": float(step), "rows": int(ds.Rows), "columns": int(ds.Columns),
        "multiframe": False, "instances": instances, "skipped": [],
        "seg": {"sop_instance_uid": text("SOPInstanceUID"), "series_instance_uid": text("SeriesInstanceUID"),
                "series_description": text("SeriesDescription") or "DICOM-SEG", "file": os.path.abspath(path)},
    }}


@foreign_errors_as("the DICOM-SEG file")
def read_dicom_seg(path: str | os.PathLike, reference: dict | Volume | None = None) -> Volume:
    """Read a DICOM-SEG file as a label volume (napari order, RAS+ affine, value = segment number).

    ``header["label_names"]`` maps segment numbers (as strings) to segment labels; the geometry's
    ``"dicom"`` part describes the source grid, so the labels can be saved as DICOM-SEG again.

    Args:
        path: The SEG file.
        reference: The geometry (or volume) of the referenced series when it is at hand (a folder
            holding both): the labels then come back on exactly that grid, whatever the SEG holds.

    Raises:
        VolumeError: not a DICOM-SEG, frames without plane positions, frames off a regular
            perpendicular grid, or undecodable pixel data.
    """
    path = os.fspath(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt files
        raise VolumeError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if str(ds.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
        raise VolumeError(f"{path}: not a DICOM Segmentation (SOP class {ds.get('SOPClassUID', 'missing')})")
    try:
        table = _frame_table(ds, path)
        series_uid, cls, refs = _referenced(ds)
    except (AttributeError, KeyError, IndexError, TypeError) as exc:
        raise VolumeError(f"{path}: incomplete DICOM-SEG header ({type(exc).__name__}: {exc})") from exc
    if isinstance(reference, Volume):
        reference = reference.header
    placed = _grid_on_reference(table, reference, path) if reference else None
    idx, step, origin, n, uids = placed if placed is not None else _grid(table, refs, path)
    labels = _fill(ds, table, idx, n, _pixels(path, ds), path)
    normal = normal_of(table["iop"])
    row_dir, col_dir = table["iop"][:3], table["iop"][3:]
    lps = np.eye(4)
    lps[:3, 0] = row_dir / np.linalg.norm(row_dir) * table["pixel_spacing"][1]
    lps[:3, 1] = col_dir / np.linalg.norm(col_dir) * table["pixel_spacing"][0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = origin
    header = _header(ds, path, table, uids, origin, step, normal, series_uid, cls)
    if placed is not None:
        header["dicom"].update({k: reference["dicom"][k] for k in ("sop_class_uid", "modality", "series_description",
                                                                   "series_number", "slice_thickness", "multiframe")})
    spacing = (step, float(table["pixel_spacing"][0]), float(table["pixel_spacing"][1]))
    vol = Volume(labels, spacing, RAS_FROM_LPS @ lps, header, None, path)
    vol.header = geometry_from_volume(vol)
    return vol
