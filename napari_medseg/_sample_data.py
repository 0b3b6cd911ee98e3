"""napari sample data (npe2): the Colin27 deep-grey-matter crop (NIfTI, and re-stored as an
oblique DICOM series with a DICOM-SEG) and a synthetic phantom.

The Colin27 files ship in ``napari_medseg/data`` (made by ``scripts/make_sample_data.py``; the
DICOM series and its SEG by ``python -m napari_medseg.io._sample_dicom``; see
``data/ATTRIBUTION.md``). Label names go into ``metadata["medseg_label_names"]`` as
``{int: str}`` (background included). Every layer carries its world placement (``scale``,
``translate``, ``affine``), so the NIfTI and the oblique DICOM sample overlay in world space.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

from napari_medseg._reader import LayerData, volume_to_layer_data
from napari_medseg.io import (
    Volume,
    affine_from_spacing,
    geometry_from_volume,
    read_dicom_seg,
    read_nifti,
    read_volume,
)
from napari_medseg.io.phantom import make_phantom

COLIN_T1 = "colin27_t1_deepgm.nii.gz"
COLIN_LABELS = "colin27_deepgm_labels.nii.gz"
COLIN_DICOM = "colin27_dicom"
COLIN_DICOM_SEG = "colin27_dicom_labels_seg.dcm"
PHANTOM_SPACING = (2.0, 1.0, 1.0)


def data_path(name: str) -> str:
    """Absolute path of a file shipped in ``napari_medseg/data``."""
    path = resources.files("napari_medseg").joinpath("data", name)
    return str(path)


def colin27_label_names() -> dict[int, str]:
    """Class index -> name of the Colin27 sample labels (from ``data/labels.json``)."""
    with open(data_path("labels.json")) as fh:
        return {int(k): v for k, v in json.load(fh)["labels"].items()}


def colin27_deepgm() -> list[LayerData]:
    """Colin27 T1 (deep grey matter crop, 1 mm) and its 6-class AAL label map."""
    image = volume_to_layer_data(read_nifti(data_path(COLIN_T1)), as_labels=False, name="Colin27 T1")
    labels = volume_to_layer_data(
        read_nifti(data_path(COLIN_LABELS)), as_labels=True, name="Colin27 deep GM labels"
    )
    labels[0][1]["metadata"]["medseg_label_names"] = colin27_label_names()
    return image + labels


def colin27_dicom() -> list[LayerData]:
    """The Colin27 crop as a synthetic oblique DICOM series (MR, 1.2 x 1.2 x 2 mm) and its DICOM-SEG."""
    series = read_volume(data_path(COLIN_DICOM))
    seg = read_dicom_seg(data_path(COLIN_DICOM_SEG), reference=series)
    return (volume_to_layer_data(series, as_labels=False)
            + volume_to_layer_data(seg, as_labels=True, name="Colin27 deep GM labels (DICOM-SEG)"))


def phantom() -> list[LayerData]:
    """A synthetic 3-class phantom (two ellipsoids in noise), 2 x 1 x 1 mm voxels."""
    image, labels = make_phantom((32, 64, 64), num_classes=3, seed=0)
    affine = affine_from_spacing(PHANTOM_SPACING)
    out: list[LayerData] = []
    for data, name, as_labels in ((image, "phantom", False), (labels, "phantom labels", True)):
        vol = Volume(np.asarray(data), PHANTOM_SPACING, affine)
        vol.header = geometry_from_volume(vol)
        out += volume_to_layer_data(vol, as_labels=as_labels, name=name)
    out[-1][1]["metadata"]["medseg_label_names"] = {0: "background", 1: "ellipsoid 1", 2: "ellipsoid 2"}
    return out
