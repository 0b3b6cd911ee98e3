"""Make the shipped DICOM sample: the Colin27 crop re-stored as an oblique DICOM series + DICOM-SEG.

Synthetic: the T1 crop (``data/colin27_t1_deepgm.nii.gz``) is resampled (trilinear) onto an
oblique, anisotropic grid (tilted 18 degrees about the left-right axis and 10 degrees about the
vertical axis, 1.2 x 1.2 mm pixels, 2 mm slices, LPS row/column directions as scanners write) and
written as single-frame MR files with rescale slope 0.1; its labels are resampled (nearest) onto
the same grid and written as a DICOM-SEG that references the series. Run
``python -m napari_medseg.io._sample_dicom`` to regenerate them (deterministic UIDs).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from scipy import ndimage

from ._dicom_synth import write_dicom_series
from .dicom import read_dicom
from .dicom_seg import write_dicom_seg
from .nifti import read_nifti

SERIES_FOLDER = "colin27_dicom"
SEG_FILE = "colin27_dicom_labels_seg.dcm"
PIXEL_MM, SLICE_MM = 1.2, 2.0


def _rotation(pitch_deg: float, yaw_deg: float) -> np.ndarray:
    a, b = np.radians(pitch_deg), np.radians(yaw_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def oblique_grid(source_affine: np.ndarray, source_shape_ijk, pitch: float = 18.0, yaw: float = 10.0):
    """``(affine, shape_kji)`` of an oblique grid covering the source box (RAS+ affine)."""
    rot = _rotation(pitch, yaw)
    axes = rot @ np.diag([-PIXEL_MM, -PIXEL_MM, SLICE_MM])  # i towards patient left, j posterior (LPS rows)
    corners = np.array([[i, j, k, 1.0] for i in (0, source_shape_ijk[0] - 1) for j in (0, source_shape_ijk[1] - 1)
                        for k in (0, source_shape_ijk[2] - 1)]) @ np.asarray(source_affine).T
    local = np.linalg.solve(axes, corners[:, :3].T).T  # corner positions in target voxel units
    lo, hi = np.floor(local.min(axis=0)), np.ceil(local.max(axis=0))
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = axes @ lo
    shape_ijk = (hi - lo + 1).astype(int)
    return affine, tuple(int(s) for s in shape_ijk[::-1])


def resample(vol, affine: np.ndarray, shape_kji, order: int) -> np.ndarray:
    """``vol`` (napari order) sampled on the grid ``affine``/``shape`` (napari order)."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape_kji], indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=0).reshape(4, -1)
    src = np.linalg.inv(vol.affine) @ affine @ ijk  # target voxel -> world -> source voxel (i, j, k)
    coords = src[:3][::-1]  # napari order (k, j, i) of the source array
    out = ndimage.map_coordinates(np.asarray(vol.data, np.float32), coords, order=order, cval=0.0)
    return out.reshape(shape_kji)


def make_sample(data_dir: str) -> tuple[str, str]:
    """Write the series folder and the SEG file into ``data_dir``; returns their paths."""
    t1 = read_nifti(os.path.join(data_dir, "colin27_t1_deepgm.nii.gz"))
    labels = read_nifti(os.path.join(data_dir, "colin27_deepgm_labels.nii.gz"))
    affine, shape = oblique_grid(t1.affine, t1.spatial_shape[::-1])
    image = np.round(resample(t1, affine, shape, order=1) * 10) / 10
    lab = np.round(resample(labels, affine, shape, order=0)).astype(np.uint8)
    folder = os.path.join(data_dir, SERIES_FOLDER)
    shutil.rmtree(folder, ignore_errors=True)
    write_dicom_series(folder, image, affine, modality="MR", description="Colin27 T1 oblique (synthetic)",
                       slope=0.1, stored_dtype=np.int16, seed="napari-medseg colin27 dicom sample",
                       series_number=3, prefix="MR")
    series = read_dicom(folder)
    with open(os.path.join(data_dir, "labels.json")) as fh:
        names = {int(k): v for k, v in json.load(fh)["labels"].items()}
    seg = write_dicom_seg(os.path.join(data_dir, SEG_FILE), lab, series.header, names,
                          series_description="Colin27 deep GM labels (DICOM-SEG)")
    return folder, seg


if __name__ == "__main__":  # pragma: no cover - a maintenance script
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    print(make_sample(here))
