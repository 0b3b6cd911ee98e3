"""Evaluation: Dice and HD95 per class and case, model selection across runs and ensembles
(nnU-Net's find-best), class-prior calibration (:func:`fit_class_weights`), and the model facts
the library shows (parameters, CPU time)."""

from napari_medseg.engine.evaluation.calibration import class_volumes, fit_class_weights
from napari_medseg.engine.evaluation.metrics import (
    EvaluationError,
    dice_per_class,
    evaluate_case,
    evaluate_folder,
    format_table,
    hd95,
    mask_surface,
    surface_distances,
)
from napari_medseg.engine.evaluation.selection import SelectionError, find_best
from napari_medseg.engine.evaluation.timing import (
    cached_cpu_time,
    default_parameter_count,
    default_patch,
    measure_cpu_time,
)

__all__ = [
    "EvaluationError",
    "SelectionError",
    "cached_cpu_time",
    "class_volumes",
    "default_parameter_count",
    "default_patch",
    "dice_per_class",
    "evaluate_case",
    "evaluate_folder",
    "find_best",
    "fit_class_weights",
    "format_table",
    "hd95",
    "mask_surface",
    "measure_cpu_time",
    "surface_distances",
]
