"""napari-medseg: medical image segmentation inside napari, and the same engine from Python.

The package is split into compute (``io``, ``models``, ``engine``, ``api``, ``cli``), which never
imports Qt or napari, and ``widgets``, the thin Qt layer over the engine.

The Python API (see :mod:`napari_medseg.api`)::

    import napari_medseg as medseg
    result = medseg.predict_file("head.nii.gz", "labels.nii.gz", "colin27_deepgm_unet3d")
    medseg.train(medseg.TrainConfig(output_dir="runs/ft", init_checkpoint="colin27_deepgm_unet3d"), "dataset")

Names: predict, predict_file, train, plan, evaluate, find_best, create_model, list_models,
describe_models, load_checkpoint, list_checkpoints, resolve_checkpoint, TrainConfig, PredictConfig,
PredictionResult, read_volume, write_volume, fill_between_slices (interpolate a label map painted
every few slices, no model). They are imported on first use, so that importing the package (as
napari does for its plugin manifest) stays fast and does not import torch. ``MedsegError`` is the
base of the package's errors (:mod:`napari_medseg.errors`): catch it for any failure the package
explains.
"""

__version__ = "0.1.0"

_API_NAMES = (
    "Checkpoint", "CheckpointInfo", "PredictConfig", "PredictionResult", "TrainConfig", "create_model",
    "describe_models", "evaluate", "fill_between_slices", "find_best", "list_checkpoints", "list_models",
    "load_checkpoint", "plan", "predict", "predict_file", "resolve_checkpoint", "train",
)
_IO_NAMES = ("read_volume", "write_volume")

from napari_medseg.errors import MedsegError  # noqa: E402 - imports nothing

__all__ = ["MedsegError", "__version__", *_API_NAMES, *_IO_NAMES]


def __getattr__(name: str):
    if name in _API_NAMES:
        from napari_medseg import api

        return getattr(api, name)
    if name in _IO_NAMES:
        from napari_medseg import io

        return getattr(io, name)
    raise AttributeError(f"module 'napari_medseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
