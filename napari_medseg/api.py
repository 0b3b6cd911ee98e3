"""The Python API: what a script needs, in blocking calls over the engine's generators.

Every long job of the engine is a generator of progress events (``engine.inference.predict``,
``engine.training.train``, ...) so that the widgets and the CLI can show progress and cancel it.
The functions here drive those generators to the end (``engine.jobs.drive``) and return the
result; pass ``on_event`` to see the events (``engine.jobs.Progress``, ``EpochEnd``, ``Message``).
Closing early (Ctrl-C) stops the job at its next event; training saves a resumable checkpoint.

Example::

    import napari_medseg as medseg

    result = medseg.predict_file("head.nii.gz", "head_labels.nii.gz", "colin27_deepgm_unet3d")
    config = medseg.TrainConfig(output_dir="runs/ft", init_checkpoint="colin27_deepgm_unet3d",
                                epochs=2, iterations_per_epoch=10)
    checkpoint = medseg.train(config, "my_dataset")      # an nnU-Net raw dataset folder
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from napari_medseg.engine import evaluation, inference, jobs, training
from napari_medseg.engine.annotation import fill_between_slices
from napari_medseg.engine.checkpoints import (
    Checkpoint,
    CheckpointError,
    CheckpointInfo,
    list_checkpoints,
    load_checkpoint,
    to_plain,
)
from napari_medseg.engine.data import (
    DatasetError,
    load_raw_dataset,
    parse_labels,
    read_label,
    read_raw_case,
)
from napari_medseg.engine.inference import PredictConfig, PredictionResult
from napari_medseg.engine.planning import (
    Plan,
    compute_fingerprint,
    plan_from_fingerprint,
    plans_to_json,
)
from napari_medseg.engine.training import TrainConfig
from napari_medseg.io import check_outputs
from napari_medseg.io.atomic import atomic_write_json
from napari_medseg.models import create_model, get_model_spec, list_models

EventCallback = Callable[[Any], None]
Checkpoints = str | os.PathLike | Checkpoint | Sequence[str | os.PathLike | Checkpoint]


def resolve_checkpoint(ref: str | os.PathLike | Checkpoint) -> str | Checkpoint:
    """A checkpoint file, a loaded :class:`Checkpoint`, or the name of a catalogued one.

    A name is looked up among the shipped and registered checkpoints (``list_checkpoints()``) by
    its catalogue name or its file name with or without ``.pt``, e.g. ``"colin27_deepgm_unet3d"``.

    Raises:
        CheckpointError: neither a file nor a known name (the known names are listed).
    """
    if isinstance(ref, Checkpoint) or os.path.isfile(os.fspath(ref)):
        return ref
    text = os.fspath(ref)
    known = list_checkpoints()
    for info in known:
        stem = os.path.splitext(os.path.basename(info.path))[0]
        if text in (info.name, stem, os.path.basename(info.path)):
            return info.path
    names = sorted({os.path.splitext(os.path.basename(i.path))[0] for i in known})
    raise CheckpointError(f"No checkpoint file or catalogued checkpoint named {text!r}; known names: {names}.")


def _checkpoints(refs: Checkpoints) -> list[str | Checkpoint]:
    if isinstance(refs, (str, os.PathLike, Checkpoint)):
        refs = [refs]
    return [resolve_checkpoint(r) for r in refs]


def predict(
    image: np.ndarray,
    spacing: Sequence[float],
    checkpoints: Checkpoints,
    config: PredictConfig | None = None,
    *,
    affine: np.ndarray | None = None,
    on_event: EventCallback | None = None,
    **settings: Any,
) -> PredictionResult:
    """Segment an image array with one checkpoint or an ensemble of them.

    Args:
        image: ``(z, y, x)`` or ``(C, z, y, x)`` (2D: ``(y, x)`` / ``(C, y, x)``), napari axis order.
        spacing: Voxel size per spatial axis in mm, same order.
        checkpoints: Checkpoint file(s), loaded checkpoints, or catalogue names.
        config: A :class:`PredictConfig`; ``settings`` override its fields (e.g. ``device="cpu"``,
            ``mirror=False``, ``largest_component=True``, ``return_probabilities=True``,
            ``force=True`` to segment an image far outside the model's training domain).
        affine: The image's 4x4 voxel-to-RAS+ matrix (``Volume.affine``); with it the image is
            reoriented to the orientation the checkpoints were trained in, and the result back.
        on_event: Called with every progress event.

    Returns:
        A :class:`PredictionResult` (``labels``, ``label_names``, and the probabilities or the
        uncertainty when asked for) on the image's own grid.

    Raises:
        DomainError: the image is far outside the training domain (before any compute; pass
            ``force=True`` to segment it anyway).
    """
    gen = inference.predict(image, spacing, _checkpoints(checkpoints), PredictConfig.build(config, **settings),
                            affine=affine)
    return jobs.drive(gen, on_event)


def predict_file(
    path_in: str | os.PathLike | Sequence[str | os.PathLike],
    path_out: str | os.PathLike,
    checkpoints: Checkpoints,
    config: PredictConfig | None = None,
    *,
    on_event: EventCallback | None = None,
    **settings: Any,
) -> PredictionResult:
    """Segment an image file and write the label map with the source file's geometry.

    The file's affine is used as in :func:`predict` (reorientation to the checkpoints' training
    orientation and back); the domain check and ``force`` too.

    Args:
        path_in: The image file (or one file per channel, nnU-Net's ``_0000`` style).
        path_out: The label file to write.
        checkpoints, config, on_event, settings: As for :func:`predict`.
    """
    gen = inference.predict_file(
        path_in, path_out, _checkpoints(checkpoints), PredictConfig.build(config, **settings)
    )
    return jobs.drive(gen, on_event)


def train(
    config: TrainConfig, data: Any, *, on_event: EventCallback | None = None
) -> str:
    """Train (or fine-tune, or resume) a model; return the final checkpoint's path.

    Args:
        config: A :class:`TrainConfig` (``output_dir``, ``model``, ``epochs``,
            ``iterations_per_epoch``, ``init_checkpoint`` to fine-tune, ``resume`` to continue ...).
            Its ``init_checkpoint`` and ``resume`` may be catalogue names.
        data: An nnU-Net raw dataset folder, or a list of ``(image, labels, spacing)`` arrays.
        on_event: Called with every progress event (``Progress``, ``EpochEnd``, ``Message``).
    """
    names = {f: getattr(config, f) for f in ("init_checkpoint", "resume")}
    resolved = {f: os.fspath(resolve_checkpoint(v)) for f, v in names.items() if v and not isinstance(v, Checkpoint)}
    return jobs.drive(training.train(dataclasses.replace(config, **resolved), data), on_event)


def plan(
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    memory_budget: float | None = None,
    on_case: EventCallback | None = None,
    overwrite: bool = False,
) -> dict[str, Plan]:
    """Fingerprint an nnU-Net raw dataset and plan its configurations (nnU-Net v1's planner).

    Writes ``plans.json`` (default: in the dataset folder) and ``fingerprint.json`` beside it.

    Args:
        dataset_dir: The dataset folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``).
        output: Where to write ``plans.json``.
        memory_budget: GPU memory in GB to plan for (default: nnU-Net's 8 GB reference).
        on_case: Called with each case's name as it is read.
        overwrite: Replace existing ``plans.json`` / ``fingerprint.json`` (the dataset's own files
            are never replaced).

    Raises:
        OutputError: an output would replace a dataset file, or an existing file without ``overwrite``.

    Returns:
        ``{configuration: Plan}``.
    """
    raw = load_raw_dataset(dataset_dir)
    out = os.fspath(output or os.path.join(dataset_dir, "plans.json"))
    fingerprint_path = os.path.join(os.path.dirname(os.path.abspath(out)), "fingerprint.json")
    dataset_files = [os.path.join(dataset_dir, "dataset.json")] + [
        p for rc in raw.cases for p in (*rc.image_paths, rc.label_path) if p
    ]
    check_outputs([out, fingerprint_path], dataset_files, overwrite=overwrite)

    def cases():
        for rc in raw.cases:
            if on_case is not None:
                on_case(rc.name)
            yield read_raw_case(rc)

    fingerprint = compute_fingerprint(cases())
    plans = plan_from_fingerprint(
        fingerprint, modality=tuple(raw.modality), memory_budget=memory_budget,
        num_classes=max(raw.num_classes, int(fingerprint.get("num_classes") or 2)),
    )
    plans_to_json(plans, out)
    atomic_write_json(fingerprint_path, to_plain(fingerprint))
    return plans


def dataset_label_names(dataset_json: str | os.PathLike) -> dict[int, str]:
    """``{value: name}`` from a ``dataset.json`` (either ``{"name": value}`` or ``{"value": "name"}``)."""
    try:
        with open(dataset_json, encoding="utf-8") as fh:
            meta = json.load(fh)
        labels = meta.get("labels") if isinstance(meta, dict) else None
        return parse_labels(labels, consecutive=False) if labels else {}
    except (OSError, ValueError, TypeError) as err:  # JSONDecodeError and DatasetError are ValueErrors
        raise DatasetError(f"{os.fspath(dataset_json)}: {err}") from err


def evaluate(
    predictions: str | os.PathLike,
    reference: str | os.PathLike,
    labels: Mapping[int, str] | None = None,
    *,
    summary_json: str | os.PathLike | None = None,
) -> dict:
    """Dice and HD95 (mm) per class and case of a folder of predictions against reference labels.

    Args:
        predictions: Folder of predicted label files.
        reference: Folder of reference label files with the same names.
        labels: ``{value: name}``; default: ``dataset.json`` beside ``reference``, else the values
            found in the first reference file.
        summary_json: Where to write the result as JSON (default: ``PREDICTIONS/summary.json``).
    """
    if labels is None:
        labels = _reference_labels(os.fspath(reference))
    result = evaluation.evaluate_folder(predictions, reference, labels)
    atomic_write_json(summary_json or os.path.join(predictions, "summary.json"), to_plain(result))
    return result


def _reference_labels(reference: str) -> dict[int, str]:
    candidate = os.path.join(os.path.dirname(os.path.abspath(reference)), "dataset.json")
    if os.path.isfile(candidate):
        names = dataset_label_names(candidate)
        if names:
            return names
    files = sorted(f for f in os.listdir(reference) if not f.startswith("."))
    if not files:
        raise evaluation.EvaluationError(f"No reference label files in {reference}.")
    values = np.unique(read_label(os.path.join(reference, files[0]))[0])
    return {0: "background", **{int(v): f"class_{int(v)}" for v in values if int(v) != 0}}


def find_best(
    dataset_dir: str | os.PathLike, runs: Mapping[str, str], *, device: str = "auto", mirror: bool = True,
    on_event: EventCallback | None = None,
) -> dict:
    """Score trained runs and their pairwise ensembles on their common validation cases
    (nnU-Net's find-best); see :func:`napari_medseg.engine.evaluation.find_best`."""
    return jobs.drive(evaluation.find_best(os.fspath(dataset_dir), dict(runs), device=device, mirror=mirror), on_event)


def describe_models() -> list[dict]:
    """One plain dict per registered architecture: name, family, dims, parameters (its default
    kwargs, 1 channel, 2 classes, its highest dimensionality; an ``"error: ..."`` text when it
    cannot be built), description, paper."""
    rows = []
    for name in list_models():
        spec = get_model_spec(name)
        try:
            params: int | str = evaluation.default_parameter_count(name)
        except Exception as err:  # a model that cannot build is reported, not hidden
            params = f"error: {err}"
        rows.append({
            "name": name, "family": spec.family, "dims": list(spec.spatial_dims), "parameters": params,
            "description": spec.description, "paper": spec.paper,
        })
    return rows


__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "PredictConfig",
    "PredictionResult",
    "TrainConfig",
    "create_model",
    "describe_models",
    "evaluate",
    "fill_between_slices",
    "find_best",
    "list_checkpoints",
    "list_models",
    "load_checkpoint",
    "plan",
    "predict",
    "predict_file",
    "resolve_checkpoint",
    "train",
]
