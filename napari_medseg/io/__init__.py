"""File input/output: volumes <-> :class:`Volume` (array + geometry). No torch, no Qt, no napari.

Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``),
DICOM series (a folder, or a file standing for its series; enhanced multi-frame too) and DICOM-SEG.
:func:`read_volume` / :func:`write_volume` choose by name. Every reader returns the voxel-to-world
affine in RAS+ mm; see ``docs/formats.md`` for the geometry guarantees and
:mod:`napari_medseg.io.world` for how napari layers show it (axis order: napari order = file voxel
axes reversed).
"""

from .dispatch import (
    VOLUME_EXTENSIONS,
    WRITE_EXTENSIONS,
    is_volume_path,
    read_dicom_seg,
    read_dicom_series,
    read_metaimage,
    read_nrrd,
    read_volume,
    volume_format,
    volume_stem,
    write_dicom_seg,
    write_metaimage,
    write_nrrd,
    write_volume,
)
from .nifti import MAX_VOXELS, NIFTI_EXTENSIONS, is_nifti_path, read_nifti, write_nifti
from .outputs import OutputError, check_output, check_outputs
from .volume import NiftiError, Volume, VolumeError, affine_from_spacing, geometry_from_volume
from .world import affine_from_napari, layer_transform, napari_matrix, voxel_to_world

__all__ = [
    "OutputError",
    "check_output",
    "check_outputs",
    "MAX_VOXELS",
    "NIFTI_EXTENSIONS",
    "VOLUME_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "NiftiError",
    "Volume",
    "VolumeError",
    "affine_from_napari",
    "affine_from_spacing",
    "geometry_from_volume",
    "is_nifti_path",
    "is_volume_path",
    "layer_transform",
    "napari_matrix",
    "read_dicom_seg",
    "read_dicom_series",
    "read_metaimage",
    "read_nifti",
    "read_nrrd",
    "read_volume",
    "volume_format",
    "volume_stem",
    "voxel_to_world",
    "write_dicom_seg",
    "write_metaimage",
    "write_nifti",
    "write_nrrd",
    "write_volume",
]
