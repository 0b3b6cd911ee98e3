"""The data room: raw datasets, preprocessed cases (with their cache), patch sampling, augmentation.

* :mod:`.dataset` -- a dataset folder in the nnU-Net raw format and reading a case's files;
* :mod:`.cases` -- preprocessing cases onto a plan's grid (from files or arrays), cached on disk;
* :mod:`.sampling` -- random training patches with foreground oversampling;
* :mod:`.augmentation` -- nnU-Net's spatial and intensity augmentation on batches, on the device;
* :mod:`.synth` -- domain randomisation: images painted from full label maps (SynthSeg-style).
"""

from napari_medseg.engine.data.augmentation import AugmentationError, Augmenter, enlarged_patch_size
from napari_medseg.engine.data.cases import (
    Case,
    case_from_arrays,
    iter_preprocess_dataset,
    load_case,
)
from napari_medseg.engine.data.dataset import (
    DATASET_FILE_ENDINGS,
    DatasetError,
    RawCase,
    RawDataset,
    load_raw_dataset,
    parse_labels,
    read_case_label,
    read_image,
    read_label,
    read_raw_case,
    verify_dataset,
)
from napari_medseg.engine.data.sampling import PatchSampler
from napari_medseg.engine.data.synth import LabelSynthesizer, SynthConfig

__all__ = [
    "DATASET_FILE_ENDINGS",
    "AugmentationError", "Augmenter", "Case", "DatasetError", "LabelSynthesizer", "PatchSampler", "RawCase", "RawDataset",
    "case_from_arrays", "enlarged_patch_size", "iter_preprocess_dataset", "load_case", "load_raw_dataset", "parse_labels",
    "SynthConfig", "read_case_label", "read_image", "read_label", "read_raw_case", "verify_dataset",
]
