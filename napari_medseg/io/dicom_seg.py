"""DICOM Segmentation (DICOM-SEG) out and in.

Writing (:func:`write_dicom_seg`) uses highdicom (the encoder TotalSegmentator and MONAI Label use):
a BINARY segmentation that references the source series, one segment per label value ``1..max``
(segment number = label value, named from ``label_names``, else ``label N``), frames on the source
slices (empty frames omitted, as highdicom does by default). The source images' headers are read
from the files recorded in the geometry when they are still there and unchanged; otherwise
stand-in headers are rebuilt from the stored UIDs, positions and patient/study attributes, so the
references stay exact. The write is atomic (:func:`~napari_medseg.io.atomic.atomic_path`).

Reading (:func:`read_dicom_seg`) rebuilds a label volume (value = segment number) from the frames'
plane positions. When every frame names its source image and the referenced instances are listed
in slice order (as this writer does), the full source grid comes back, empty slices included;
otherwise the grid spans the frames present. Either way every voxel sits at its world position.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ._dtypes import label_dtype
from .atomic import AtomicWriteError, atomic_path
from .dicom_seg_read import read_dicom_seg
from .volume import Volume, VolumeError, geometry_from_volume

logger = logging.getLogger(__name__)

__all__ = ["read_dicom_seg", "write_dicom_seg"]

MAX_SEGMENTS = 65535


def _version() -> str:
    try:
        return metadata.version("napari-medseg")
    except metadata.PackageNotFoundError:
        return "0"


def _dicom_info(geometry: dict | Volume | None, path: str) -> tuple[dict, dict]:
    geom = geometry_from_volume(geometry) if isinstance(geometry, Volume) else geometry
    info = (geom or {}).get("dicom") if isinstance(geom, dict) else None
    if not isinstance(info, dict) or (geom or {}).get("format") != "dicom" or not info.get("instances"):
        source = (geom or {}).get("format", "no file") if isinstance(geom, dict) else "no file"
        raise VolumeError(
            f"{path}: DICOM-SEG can only be written for labels on the grid of a DICOM series (this "
            f"layer's geometry comes from {source}); save it as .nii.gz, .nrrd or .mha instead")
    missing = [i for i, inst in enumerate(info["instances"]) if not inst.get("sop_instance_uid")]
    if missing:
        raise VolumeError(
            f"{path}: {len(missing)} slice(s) of this grid have no source image UID (the grid was rebuilt "
            "from a DICOM-SEG's frames alone), so a new DICOM-SEG cannot reference them; open the source "
            "series and save from its grid, or save as .nii.gz, .nrrd or .mha")
    return geom, info


def _set_common(ds: Dataset, info: dict) -> None:
    ds.SOPClassUID = info["sop_class_uid"] or "1.2.840.10008.5.1.4.1.1.7"
    ds.StudyInstanceUID = info["study_instance_uid"]
    ds.SeriesInstanceUID = info["series_instance_uid"]
    ds.FrameOfReferenceUID = info["frame_of_reference_uid"]
    ds.Modality = info.get("modality") or "OT"
    if info.get("specific_character_set"):
        ds.SpecificCharacterSet = info["specific_character_set"]
    for key, value in {**info.get("patient", {}), **info.get("study", {})}.items():
        setattr(ds, key, value or "")
    ds.Rows, ds.Columns = int(info["rows"]), int(info["columns"])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0


def _stand_ins(info: dict) -> list[Dataset]:
    """Source image headers rebuilt from the stored UIDs, geometry and patient/study attributes."""
    thickness = info.get("slice_thickness") or info.get("spacing_between_slices") or 1.0
    spacing = [float(v) for v in info["pixel_spacing"]]
    if not info.get("multiframe"):
        out = []
        for n, inst in enumerate(info["instances"]):
            ds = Dataset()
            _set_common(ds, info)
            ds.SOPInstanceUID = inst["sop_instance_uid"]
            ds.InstanceNumber = n + 1
            ds.ImagePositionPatient = [float(v) for v in inst["position"]]
            ds.ImageOrientationPatient = [float(v) for v in info["image_orientation_patient"]]
            ds.PixelSpacing, ds.SliceThickness = spacing, float(thickness)
            out.append(ds)
        return out
    ds = Dataset()
    _set_common(ds, info)
    ds.SOPInstanceUID = info["instances"][0]["sop_instance_uid"]
    frames = sorted(info["instances"], key=lambda inst: inst["frame"])
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    measures, orient = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = spacing, float(thickness)
    if info.get("spacing_between_slices"):
        measures.SpacingBetweenSlices = float(info["spacing_between_slices"])
    orient.ImageOrientationPatient = [float(v) for v in info["image_orientation_patient"]]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orient]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for inst in frames:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in inst["position"]]
        item.PlanePositionSequence = [pos]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    return [ds]


def _source_datasets(info: dict) -> list[Dataset]:
    """The source headers from disk when all files are present and unchanged, else stand-ins."""
    files = list(dict.fromkeys(inst.get("file") for inst in info["instances"]))
    if all(f and os.path.isfile(f) for f in files):
        try:
            headers = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in files]
        except Exception as exc:  # noqa: BLE001 - any unreadable file means: use the stored UIDs
            logger.warning("source DICOM files unreadable (%s); using the stored UIDs", exc)
            return _stand_ins(info)
        uids = [str(h.get("SOPInstanceUID", "")) for h in headers]
        if uids == list(dict.fromkeys(inst["sop_instance_uid"] for inst in info["instances"])):
            for h in headers:
                if "SliceThickness" not in h and not info.get("multiframe"):
                    h.SliceThickness = float(info.get("spacing_between_slices") or 1.0)
            return headers
        logger.warning("source DICOM files changed since they were read; using the stored UIDs")
    else:
        logger.info("source DICOM files are not all present; references rebuilt from the stored UIDs")
    return _stand_ins(info)


def _descriptions(count: int, names: dict[int, str]) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="napari-medseg", version=_version(), family=codes.cid7162.ArtificialIntelligence)
    out = []
    for value in range(1, count + 1):
        label = str(names.get(value) or f"label {value}")[:64]
        out.append(hd.seg.SegmentDescription(
            segment_number=value, segment_label=label,
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm, tracking_id=label, tracking_uid=hd.UID()))
    return out


def _frames_in_source_order(labels: np.ndarray, info: dict) -> np.ndarray:
    if not info.get("multiframe"):
        return labels
    order = np.argsort([inst["frame"] for inst in info["instances"]])
    return labels[order]


def write_dicom_seg(
    path: str | os.PathLike,
    labels: np.ndarray,
    geometry: dict | Volume,
    label_names: dict | None = None,
    *,
    series_description: str | None = None,
) -> str:
    """Write a label map (napari order, on a DICOM series' grid) as a DICOM Segmentation.

    Args:
        path: Target ``.dcm`` file; replaced only when the write succeeds.
        labels: Integer labels ``(k, rows, columns)``, the source series' grid (0 = background).
        geometry: The source series' geometry (``metadata["medseg_geometry"]`` of a layer read
            from DICOM) or its :class:`Volume`.
        label_names: ``{value: name}`` (int or str keys); unnamed values are called ``label N``.
        series_description: The SEG series' description (default: ``"<source> segmentation"``).

    Returns:
        The written path.

    Raises:
        VolumeError: not a ``.dcm`` name, no DICOM geometry, labels not on the source grid,
            negative/non-integer labels, or highdicom refused the content.
    """
    import highdicom as hd

    path = os.fspath(path)
    if not path.lower().endswith(".dcm"):
        raise VolumeError(f"{path}: a DICOM-SEG file name must end with .dcm")
    _geom, info = _dicom_info(geometry, path)
    labels = np.asarray(labels)
    grid = (len(info["instances"]), int(info["rows"]), int(info["columns"]))
    if labels.shape != grid:
        raise VolumeError(f"{path}: labels of shape {labels.shape} are not on the source series' grid {grid}")
    label_dtype(labels, path)  # refuses negative, non-integer, NaN
    values = labels.astype(np.uint16 if labels.size and labels.max() > 255 else np.uint8)
    names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) > 0}
    count = max(int(values.max()) if values.size else 0, max(names, default=0), 1)
    if count > MAX_SEGMENTS:
        raise VolumeError(f"{path}: label value {count} is above the {MAX_SEGMENTS} segments DICOM-SEG allows")
    desc = series_description or f"{info.get('series_description') or 'DICOM'} segmentation"
    try:
        seg = hd.seg.Segmentation(
            source_images=_source_datasets(info), pixel_array=_frames_in_source_order(values, info),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(count, names),
            series_instance_uid=hd.UID(), series_number=int(info.get("series_number") or 0) + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="napari-medseg",
            manufacturer_model_name="napari-medseg", software_versions=_version(), device_serial_number="0",
            series_description=desc[:64], content_description="napari-medseg segmentation",
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise VolumeError(f"{path}: DICOM-SEG encoding failed ({type(exc).__name__}: {exc})") from exc
    try:
        with atomic_path(path) as tmp:
            seg.save_as(tmp)
    except AtomicWriteError as exc:
        raise VolumeError(str(exc)) from exc
    logger.info("wrote DICOM-SEG %s: %d segments, %d frames", path, count, int(seg.NumberOfFrames))
    return path
