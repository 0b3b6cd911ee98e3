"""``predict_file``: segment an image file and write the label map in the source geometry.

Any volume :func:`napari_medseg.io.read_volume` reads goes in (NIfTI, NRRD, MetaImage, DICOM);
the labels are written by :func:`napari_medseg.io.write_volume` in the format the output name says,
with the source's geometry, so they overlay it in any viewer. With ``save_probabilities`` the mean
softmax goes beside them as a compressed ``.npz`` (nnU-Net's convention), written atomically
through :func:`napari_medseg.io.atomic.atomic_path`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from napari_medseg.engine.inference.config import InferenceError, PredictConfig
from napari_medseg.engine.inference.postprocessing import PredictionResult
from napari_medseg.engine.inference.predict import CheckpointsArg, predict
from napari_medseg.engine.jobs import Progress
from napari_medseg.io import (
    WRITE_EXTENSIONS,
    check_outputs,
    read_volume,
    volume_format,
    volume_stem,
    write_volume,
)
from napari_medseg.io.atomic import atomic_path

logger = logging.getLogger(__name__)

PathArg = str | os.PathLike


def predict_file(
    path_in: PathArg | Sequence[PathArg],
    path_out: PathArg,
    checkpoints: CheckpointsArg,
    config: PredictConfig | dict | None = None,
    **overrides: Any,
) -> Generator[Progress, None, PredictionResult]:
    """Segment an image file (or one file per channel, nnU-Net style) and write the label map.

    Args:
        path_in: The image (any format :func:`~napari_medseg.io.read_volume` reads: a file, or a
            DICOM series folder), or one file per channel (``case_0000.nii.gz``, ``case_0001...``).
        path_out: Label file to write, in the format its name says (``.nii``/``.nii.gz``,
            ``.nrrd``, ``.mha``/``.mhd``, or ``.dcm`` for a DICOM-SEG of a DICOM input); its
            folder is created.
        checkpoints: As for :func:`~napari_medseg.engine.inference.predict`.
        config: A :class:`PredictConfig` (or a dict of its fields). With ``save_probabilities``
            the mean softmax is also written beside the labels as ``<name>.npz``
            (``probabilities`` float32 ``(K, z, y, x)``, ``spacing``, ``label_names`` as JSON), as
            nnU-Net does; an ``.npz`` keeps the output folder evaluable as label maps only.
        **overrides: :class:`PredictConfig` fields to change (``save_probabilities=True``,
            ``device="cpu"``, ...).

    Returns:
        The :class:`PredictionResult`.

    Raises:
        InferenceError: no input file, channel files of different shapes, or an output name
            :func:`~napari_medseg.io.write_volume` cannot write (checked before the compute).
        DomainError: the image lies far outside the training domain and ``force`` is not set
            (checked before the compute; nothing is written).
        OutputError: the output would replace an input, or an existing file without
            ``overwrite`` (checked before the compute).
    """
    cfg = PredictConfig.build(config, **overrides)
    paths = [path_in] if isinstance(path_in, (str, os.PathLike)) else list(path_in)
    if not paths:
        raise InferenceError("predict_file needs at least one input file.")
    path_out = _checked_output(os.fspath(path_out), paths)  # fail before the compute, not after
    check_outputs([path_out] + ([probabilities_path(path_out)] if cfg.save_probabilities else []), paths,
                  overwrite=cfg.overwrite)
    os.makedirs(os.path.dirname(os.path.abspath(path_out)), exist_ok=True)
    volumes = [read_volume(p) for p in paths]
    channels = [v.data if v.channel_axis == 0 else v.data[None] for v in volumes]
    shapes = {c.shape[1:] for c in channels}
    if len(shapes) > 1:
        raise InferenceError(f"The channel files of one case differ in shape: {sorted(shapes)}.")
    data = channels[0] if len(channels) == 1 else np.concatenate(channels, axis=0)
    # The file's affine lets predict reorient the image to the checkpoints' training orientation.
    result = yield from predict(data, volumes[0].spacing, checkpoints, cfg, affine=volumes[0].affine)
    write_volume(path_out, result.labels, volumes[0], is_label=True, label_names=result.label_names)
    logger.info("Wrote %s", path_out)
    if cfg.save_probabilities:
        save_probabilities(probabilities_path(path_out), result, volumes[0].spacing)
    return result


def _checked_output(path_out: str, paths: Sequence[PathArg]) -> str:
    lower = path_out.lower()
    if not lower.endswith(WRITE_EXTENSIONS):
        raise InferenceError(f"{path_out}: the output name must end with one of {', '.join(WRITE_EXTENSIONS)}.")
    if lower.endswith(".dcm") and volume_format(paths[0]) != "dicom":
        raise InferenceError(
            f"{path_out}: a DICOM-SEG output needs a DICOM input; write .nii.gz, .nrrd or .mha instead."
        )
    return path_out


def probabilities_path(label_path: str) -> str:
    """Where :func:`predict_file` writes the probabilities of ``label_path``: ``<name>.npz``
    (``case.nii.gz`` -> ``case.npz``)."""
    return os.path.join(os.path.dirname(label_path), volume_stem(label_path) + ".npz")


def save_probabilities(path: str | os.PathLike, result: PredictionResult, spacing: Sequence[float]) -> None:
    """Write ``result.probabilities`` as a compressed ``.npz``, atomically.

    The archive holds ``probabilities`` (float32 ``(K, *spatial)``), ``spacing`` (float64) and
    ``label_names`` (a JSON object, class index -> name, as a 0-d string array).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez adds no suffix
        np.savez_compressed(
            fh, probabilities=result.probabilities, spacing=np.asarray(spacing, np.float64),
            label_names=np.asarray(json.dumps({str(k): v for k, v in result.label_names.items()})),
        )
    logger.info("Wrote %s", os.fspath(path))


__all__ = ["predict_file", "probabilities_path", "save_probabilities"]
