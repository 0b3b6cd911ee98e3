"""Inference: from an image and trained checkpoints to a label map in the source geometry.

The pipeline, one module per step:

* :mod:`.config` -- :class:`PredictConfig` (the settings, shared by the CLI, the GUI and the API)
  and :class:`InferenceError`.
* :mod:`.tiling` -- tile starts, Gaussian tile weights, mirror combinations, coverage blending.
* :mod:`.sliding_window` -- the one sliding window over any predictor, and its speed levers.
* :mod:`.inferers` -- the :class:`Inferer` strategy, its registry (:func:`register_inferer`,
  :func:`select_inferer`) and what inferers read from a checkpoint.
* :mod:`.window_inferer` -- the default :class:`SlidingWindowInferer` and its input-stage extension
  point (:class:`InputStage`, :func:`register_input_stage`).
* :mod:`.predict` -- :func:`predict`: load checkpoints, pick the inferer, run it.
* :mod:`.postprocessing` -- softmax/argmax helpers, largest component, :class:`PredictionResult`.
* :mod:`.export` -- :func:`predict_file`: files in, label file (and probabilities) out.
* :mod:`.variants` -- patch-free models and the cascade, registered at import (bottom of this file).
"""

from napari_medseg.engine.inference.config import InferenceError, PredictConfig
from napari_medseg.engine.inference.export import (
    predict_file,
    probabilities_path,
    save_probabilities,
)
from napari_medseg.engine.inference.inferers import (
    Inferer,
    finish_ensemble,
    get_inferer,
    label_names_of,
    list_inferers,
    plan_of,
    register_inferer,
    select_inferer,
    tta_mirror_axes,
    unregister_inferer,
)
from napari_medseg.engine.inference.postprocessing import (
    PredictionResult,
    argmax_labels,
    argmax_relative,
    finish,
    keep_largest_component,
    softmax_inplace,
)
from napari_medseg.engine.inference.predict import predict
from napari_medseg.engine.inference.sliding_window import (
    Predictor,
    optimize_predictor,
    sliding_window,
)
from napari_medseg.engine.inference.tiling import (
    axis_weights,
    compute_tile_starts,
    count_tiles,
    full_patch_size,
    gaussian_importance,
    mirror_combos,
    normalise_by_coverage,
    outer_product,
)
from napari_medseg.engine.inference.window_inferer import (
    InputStage,
    PreparedInput,
    SlidingWindowInferer,
    input_stage_for,
    register_input_stage,
    unregister_input_stage,
)

# isort: split
from napari_medseg.engine.inference import variants  # noqa: E402  (last: importing registers the variants)

__all__ = [
    "InferenceError",
    "Inferer",
    "InputStage",
    "PredictConfig",
    "PredictionResult",
    "Predictor",
    "PreparedInput",
    "SlidingWindowInferer",
    "argmax_labels",
    "argmax_relative",
    "axis_weights",
    "compute_tile_starts",
    "count_tiles",
    "finish",
    "full_patch_size",
    "gaussian_importance",
    "get_inferer",
    "input_stage_for",
    "keep_largest_component",
    "finish_ensemble",
    "label_names_of",
    "list_inferers",
    "mirror_combos",
    "normalise_by_coverage",
    "optimize_predictor",
    "outer_product",
    "plan_of",
    "predict",
    "predict_file",
    "probabilities_path",
    "register_inferer",
    "register_input_stage",
    "save_probabilities",
    "select_inferer",
    "sliding_window",
    "softmax_inplace",
    "tta_mirror_axes",
    "unregister_inferer",
    "unregister_input_stage",
    "variants",
]
