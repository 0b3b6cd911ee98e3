"""Synthetic DICOM series from an array and a voxel-to-RAS affine (tests and the shipped sample).

Not a clinical DICOM exporter: the files carry the attributes a reader needs to rebuild the
volume (UIDs, ``ImagePositionPatient``, ``ImageOrientationPatient``, ``PixelSpacing``, rescale),
and synthetic patient/study attributes. The ``k`` axis of the affine becomes the slice step, so a
step that is not perpendicular to the slices writes a tilted (gantry-tilt-like) series.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from .world import RAS_FROM_LPS

__all__ = ["SOP_CLASSES", "uid_from", "write_dicom_series"]

SOP_CLASSES = {
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR-enhanced": "1.2.840.10008.5.1.4.1.1.4.1",
    "CT-enhanced": "1.2.840.10008.5.1.4.1.1.2.1",
}
_NAMESPACE = uuid.UUID("5b0f8a2e-0d0c-4c47-9a55-6d6564736567")


def uid_from(*parts: object) -> str:
    """A deterministic UUID-derived UID (``2.25.<uuid>``, PS3.5 B.2) from ``parts``, so synthetic
    data reproduces byte for byte."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '|'.join(str(p) for p in parts)).int}"


def _ds(values: Sequence[float]) -> list:
    return [DSfloat(float(v), auto_format=True) for v in values]


def _geometry(affine_ras: np.ndarray) -> tuple[np.ndarray, list, list, np.ndarray]:
    lps = RAS_FROM_LPS @ np.asarray(affine_ras, dtype=np.float64)
    ci, cj = lps[:3, 0], lps[:3, 1]
    si, sj = float(np.linalg.norm(ci)), float(np.linalg.norm(cj))
    if abs(ci @ cj) > 1e-6 * si * sj:
        raise ValueError("DICOM needs perpendicular row and column directions (no in-plane shear)")
    iop = _ds(np.concatenate([ci / si, cj / sj]))
    return lps, iop, _ds([sj, si]), lps[:3, 2]


def _base(info: dict, sop_class: str, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = info.get("transfer_syntax", ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientName, ds.PatientID = info.get("patient_name", "Synthetic^Phantom"), info.get("patient_id", "SYNTH001")
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = info["study_uid"], info["series_uid"]
    ds.FrameOfReferenceUID = info["for_uid"]
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality = info["modality"]
    ds.SeriesDescription, ds.SeriesNumber = info["description"], info.get("series_number", 1)
    ds.Manufacturer = "napari-medseg synthetic"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if info["stored"].kind == "i" else 0
    return ds


def _stored(data: np.ndarray, slope, intercept, dtype: np.dtype) -> np.ndarray:
    raw = np.round((np.asarray(data, np.float64) - intercept) / slope)
    info = np.iinfo(dtype)
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        raise ValueError(f"values do not fit {dtype} with slope {slope} and intercept {intercept}")
    return raw.astype(dtype)


def write_dicom_series(
    folder: str | os.PathLike,
    data: np.ndarray,
    affine_ras: np.ndarray,
    *,
    modality: str = "MR",
    description: str = "synthetic series",
    study_uid: str | None = None,
    series_uid: str | None = None,
    for_uid: str | None = None,
    series_number: int = 1,
    slope: float | Sequence[float] = 1.0,
    intercept: float | Sequence[float] = 0.0,
    stored_dtype: type = np.int16,
    shuffle_seed: int | None = None,
    multiframe: bool = False,
    seed: str = "series",
    prefix: str = "slice",
) -> list[str]:
    """Write ``data`` (napari order ``(k, rows, columns)``) as a DICOM series in ``folder``.

    Args:
        folder: Target folder (created).
        data: Voxel values after rescale, napari order.
        affine_ras: Voxel ``(i, j, k)`` -> RAS+ mm; columns ``i`` and ``j`` must be perpendicular.
        modality: ``"MR"`` or ``"CT"``.
        description: ``SeriesDescription``.
        study_uid, series_uid, for_uid: UIDs (made from ``seed`` when ``None``).
        series_number: ``SeriesNumber``.
        slope, intercept: Rescale per series or per slice; stored = (value - intercept) / slope.
        stored_dtype: int16 or uint16.
        shuffle_seed: Write the files (names and ``InstanceNumber``) in a shuffled order.
        multiframe: One enhanced multi-frame file (frames shuffled too) instead of one file per slice.
        seed: Makes the UIDs (the same seed gives the same UIDs).
        prefix: File name prefix.

    Returns:
        The written files.
    """
    os.makedirs(folder, exist_ok=True)
    data = np.asarray(data)
    n = data.shape[0]
    lps, iop, spacing, step = _geometry(affine_ras)
    slopes = np.broadcast_to(np.asarray(slope, np.float64), (n,))
    inters = np.broadcast_to(np.asarray(intercept, np.float64), (n,))
    info = {"study_uid": study_uid or uid_from(seed, "study"), "series_uid": series_uid or uid_from(seed, "series"),
            "for_uid": for_uid or uid_from(seed, "for"), "modality": modality, "description": description,
            "series_number": series_number, "stored": np.dtype(stored_dtype)}
    order = np.arange(n)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(n)
    positions = [lps @ np.array([0.0, 0.0, float(k), 1.0]) for k in range(n)]
    stored = [_stored(data[k], slopes[k], inters[k], info["stored"]) for k in range(n)]
    if multiframe:
        return [_write_enhanced(folder, info, order, positions, stored, iop, spacing, step, slopes, inters, prefix)]
    files = []
    for rank, k in enumerate(order):
        ds = _base(info, SOP_CLASSES[modality], uid_from(seed, "sop", k))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(rank + 1)
        ds.ImagePositionPatient = _ds(positions[k][:3])
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing, ds.SliceThickness = spacing, DSfloat(float(np.linalg.norm(step)), auto_format=True)
        ds.RescaleSlope, ds.RescaleIntercept = _ds([slopes[k]])[0], _ds([inters[k]])[0]
        ds.Rows, ds.Columns = stored[k].shape
        ds.PixelData = stored[k].tobytes()
        path = os.path.join(folder, f"{prefix}_{rank:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _write_enhanced(folder, info, order, positions, stored, iop, spacing, step, slopes, inters, prefix) -> str:
    sop_class = SOP_CLASSES[info["modality"] + "-enhanced"]
    ds = _base(info, sop_class, uid_from(info["series_uid"], "enhanced"))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber, ds.NumberOfFrames = 1, len(order)
    ds.Rows, ds.Columns = stored[0].shape
    shared, measures, orient = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = spacing
    measures.SliceThickness = DSfloat(float(np.linalg.norm(step)), auto_format=True)
    orient.ImageOrientationPatient = iop
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orient]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for k in order:
        item, pos, pvt = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = _ds(positions[k][:3])
        pvt.RescaleSlope, pvt.RescaleIntercept = _ds([slopes[k]])[0], _ds([inters[k]])[0]
        pvt.RescaleType = "US"
        item.PlanePositionSequence, item.PixelValueTransformationSequence = [pos], [pvt]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = np.stack([stored[k] for k in order]).tobytes()
    path = os.path.join(folder, f"{prefix}_enhanced.dcm")
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
