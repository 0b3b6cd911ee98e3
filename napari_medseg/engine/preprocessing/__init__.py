"""Preprocessing (nnU-Net v1): crop to the nonzero region, transpose, resample to the plan's
spacing, normalise; and the exact inverse that puts predictions back on the source grid. Before all
that, :mod:`.orientation` reorients a volume to the orientation its model was trained in
(permutations and flips only) and back."""

from napari_medseg.engine.preprocessing.cropping import bbox_of, bbox_slices, nonzero_mask
from napari_medseg.engine.preprocessing.normalization import (
    ChannelNorm,
    LazyNormalizedImage,
    PreprocessingError,
    guess_modality,
    normalization_params,
    normalize,
)
from napari_medseg.engine.preprocessing.orientation import (
    OrientationError,
    Reorientation,
    check_codes,
    orientation_codes,
    reorient,
    reorientation,
)
from napari_medseg.engine.preprocessing.preprocess import (
    DUMMY_SPACING,
    CaseProperties,
    is_resampled,
    preprocess_case,
    restore_labels,
    restore_probabilities,
    target_spacing_for,
)
from napari_medseg.engine.preprocessing.resampling import (
    ResamplingError,
    compute_new_shape,
    get_do_separate_z,
    get_lowres_axis,
    resample_image,
    resample_to_shape,
    resize_segmentation,
    separate_z_axis,
)

__all__ = [
    "DUMMY_SPACING",
    "CaseProperties",
    "ChannelNorm",
    "LazyNormalizedImage",
    "OrientationError",
    "PreprocessingError",
    "Reorientation",
    "ResamplingError",
    "guess_modality",
    "bbox_of",
    "bbox_slices",
    "check_codes",
    "compute_new_shape",
    "get_do_separate_z",
    "get_lowres_axis",
    "is_resampled",
    "nonzero_mask",
    "normalization_params",
    "normalize",
    "orientation_codes",
    "preprocess_case",
    "reorient",
    "reorientation",
    "resample_image",
    "resample_to_shape",
    "resize_segmentation",
    "restore_labels",
    "restore_probabilities",
    "separate_z_axis",
    "target_spacing_for",
]
