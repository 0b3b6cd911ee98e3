"""File input/output: NIfTI files <-> :class:`Volume` (array + geometry). No torch, no Qt.

See ``docs/interfaces.md`` for the axis convention (napari order = NIfTI axes reversed).
"""

from .nifti import MAX_VOXELS, NIFTI_EXTENSIONS, is_nifti_path, read_nifti, write_nifti
from .volume import NiftiError, Volume, affine_from_spacing, geometry_from_volume

__all__ = [
    "MAX_VOXELS",
    "NIFTI_EXTENSIONS",
    "NiftiError",
    "Volume",
    "affine_from_spacing",
    "geometry_from_volume",
    "is_nifti_path",
    "read_nifti",
    "write_nifti",
]
