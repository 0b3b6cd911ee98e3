"""From a dataset (folder, ``RawDataset`` or arrays) to preprocessed, checked, split training cases.

:func:`prepare_data` runs, in order:

1. :func:`case_inputs` -- what the cases are (files or arrays), their label names and channels;
2. :func:`plan_training` -- the plan: the resumed checkpoint's, the fine-tuning checkpoint's (so that
   preprocessing matches the weights), or the automatic planner's on this data's fingerprint, with
   the run's patch and batch size applied;
3. the trainer class for this config and plan (:func:`~napari_medseg.engine.training.registry.trainer_for`),
   whose :meth:`~napari_medseg.engine.training.trainer.Trainer.prepare_cases` hook preprocesses the
   cases (a variant may add input channels there);
4. :func:`check_labels` and :func:`split_cases` (validation fraction, seeded).

Cases whose files (or arrays, given with an affine) carry a geometry are reoriented on reading to
one training orientation (:attr:`CaseInputs.orientation`: the resumed or fine-tuned checkpoint's,
else the first case's), and every case read adds to the training domain
(:meth:`CaseInputs.domain`); both go into the run's checkpoints (:class:`TrainingData`).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_medseg.engine.checkpoints import Checkpoint, load_checkpoint
from napari_medseg.engine.data import (
    Case,
    RawCase,
    RawDataset,
    case_from_arrays,
    load_raw_dataset,
)
from napari_medseg.engine.data.cases import CaseArrays, check_label_values, orient_arrays, read_case
from napari_medseg.engine.data.painted import hold_out_slices
from napari_medseg.engine.inference.domain import case_domain_stats, summarise_domain
from napari_medseg.engine.jobs import Message, Progress
from napari_medseg.engine.planning import (
    Plan,
    compute_fingerprint,
    get_pool_and_conv_props,
    plan_from_fingerprint,
)
from napari_medseg.engine.preprocessing import guess_modality, orientation_codes
from napari_medseg.engine.training.config import TrainConfig, TrainingError, resolve_recipe
from napari_medseg.engine.training.correction import from_parent
from napari_medseg.engine.training.registry import (
    derived_configuration,
    register_derived_configuration,
    trainer_for,
)
from napari_medseg.engine.training.replan import (
    cap_for_cpu_budget,
    labels_differ,
    parent_misfit,
    replan_for_data,
)


@dataclass
class TrainingData:
    """Preprocessed cases plus what the checkpoint must remember about them."""

    train_cases: list
    val_cases: list
    plan: Plan
    label_names: dict[int, str]
    fingerprint: dict = field(default_factory=dict)
    val_is_train: bool = False
    source: Checkpoint | None = None  # the resume / fine-tune checkpoint, loaded once
    orientation: str | None = None  # axis codes the cases were reoriented to (None: unknown geometry)
    domain: dict | None = None  # the training domain (engine.inference.domain), for the checkpoints
    validation: str = ""  # "held-out slices" / "none" when a painted case was split; "" = by the split
    extra: dict = field(default_factory=dict)  # checkpoint extras kept from the parent (correction.inherited_extra)


@dataclass
class CaseInputs:
    """The training cases before preprocessing: raw files or in-memory arrays.

    Attributes:
        raw_cases: The dataset's cases on disk (``None`` for arrays).
        arrays: ``(image (C, *spatial), label, spacing)`` per case (empty for raw cases).
        label_names: Class names by value (from ``dataset.json``, else the config's, else empty).
        num_channels: Image channels.
        modality: Modality per channel (``"CT"``, ``"MRI"``, ...).
        orientation: The training orientation (axis codes) cases with a geometry are reoriented to;
            ``None`` until known: then the first case read with a geometry sets it.
        affines: The 4x4 RAS+ affine per array case (``None``: unknown, no reorientation).
        modality_known: Whether ``modality`` came from the data (``dataset.json``), not a default.
        domain_stats: :func:`~napari_medseg.engine.inference.domain.case_domain_stats` of each case read.
    """

    raw_cases: list[RawCase] | None
    arrays: list[tuple]
    label_names: dict[int, str]
    num_channels: int
    modality: tuple[str, ...]
    orientation: str | None = None
    affines: list = field(default_factory=list)
    modality_known: bool = False
    domain_stats: dict[int, dict] = field(default_factory=dict)
    _codes: dict[int, str | None] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.raw_cases) if self.raw_cases is not None else len(self.arrays)

    def name(self, i: int) -> str:
        """The name of case ``i`` (the file's case name, or ``case_{i}`` for arrays)."""
        return self.raw_cases[i].name if self.raw_cases is not None else f"case_{i}"

    def _arrays(self, i: int) -> CaseArrays:
        """Case ``i`` in the training orientation; fixes the orientation at the first case with a geometry."""
        if self.raw_cases is not None:
            arrays = read_case(self.raw_cases[i], self.orientation, self._codes.get(i))
            self._codes[i] = arrays.source  # the file's geometry is read once per case
        else:
            image, label, spacing = self.arrays[i]
            affine = self.affines[i] if i < len(self.affines) else None
            codes = orientation_codes(affine, len(spacing)) if affine is not None else None
            arrays = orient_arrays(image, spacing, label, codes, self.orientation)
        if self.orientation is None and arrays.orientation is not None:
            self.orientation = arrays.orientation
        label, generation = arrays.label, self.raw_cases[i].generation_values if self.raw_cases is not None else ()
        if label is not None and generation:  # generation-only classes are not the model's foreground
            label = np.where(np.isin(label, generation), 0, label)
        self.domain_stats[i] = case_domain_stats(arrays.image, label, arrays.spacing, i)
        return arrays

    def read(self, i: int) -> tuple[np.ndarray, tuple[float, ...], np.ndarray | None]:
        """Case ``i`` before preprocessing, in the training orientation (:attr:`orientation`):
        ``(image (C, *spatial) float32, spacing, label)``."""
        arrays = self._arrays(i)
        return arrays.image, arrays.spacing, arrays.label

    def load(self, i: int, plan: Plan, ignore_label: int | None = None) -> Case:
        """Case ``i`` preprocessed with ``plan`` (files: label values checked against the plan;
        ``ignore_label``: the run's, so that shrinking keeps every painted voxel)."""
        arrays = self._arrays(i)
        if self.raw_cases is not None and arrays.label is not None:
            rc = self.raw_cases[i]
            values = set(range(plan.num_classes)) | (set(rc.generation_values) if rc.keep_generation else set())
            check_label_values(arrays.label, values, rc.label_path)
        return case_from_arrays(arrays.image, arrays.label, arrays.spacing, plan, name=self.name(i),
                                ignore_label=ignore_label)

    def domain(self) -> dict | None:
        """The training domain of the cases read so far (``None`` before any)."""
        modality = ", ".join(self.modality) if self.modality_known and self.modality else None
        return summarise_domain([self.domain_stats[i] for i in sorted(self.domain_stats)], modality)


def as_case_arrays(item) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    """Check one ``(image, label, spacing)`` item (or ``(image, label, spacing, affine)``); returns
    ``(image, label, spacing)`` with a channel axis and a float32 image.

    Raises:
        TrainingError: the image does not fit the spacing, or the labels not the image.
    """
    image, label, spacing = item[:3]
    image = np.asarray(image, dtype=np.float32)
    spacing = tuple(float(s) for s in spacing)
    if image.ndim == len(spacing):
        image = image[None]
    if image.ndim != len(spacing) + 1:
        raise TrainingError(f"Image of shape {image.shape} does not fit spacing {spacing}.")
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape[1:]:
            raise TrainingError(
                f"Labels of shape {label.shape} do not match the image's spatial shape {image.shape[1:]}."
            )
    return image, label, spacing


def case_inputs(config: TrainConfig, data: Any) -> CaseInputs:
    """What to train on: a dataset folder, a ``RawDataset`` or a list of ``(image, label, spacing)``
    (or ``(image, label, spacing, affine)`` with the image's 4x4 RAS+ affine: such cases are
    reoriented to the training orientation like files).

    The config's ``label_names``, when given, win over the dataset's.

    Raises:
        TrainingError: no cases, or images with different numbers of channels.
    """
    if isinstance(data, (str, os.PathLike)):
        data = load_raw_dataset(os.fspath(data))
    if isinstance(data, RawDataset):
        inputs = CaseInputs(
            list(data.cases), [], {int(k): v for k, v in data.labels.items()}, data.num_channels,
            tuple(data.modality),
        )
        inputs.modality_known = True
    else:
        data = list(data)
        arrays = [as_case_arrays(item) for item in data]
        if not arrays:
            raise TrainingError("No training cases were given.")
        num_channels = arrays[0][0].shape[0]
        if any(a[0].shape[0] != num_channels for a in arrays):
            raise TrainingError("All training images must have the same number of channels.")
        modality = tuple(guess_modality(channel) for channel in arrays[0][0])  # arrays say nothing: HU means CT
        inputs = CaseInputs(None, arrays, dict(config.label_names or {}), num_channels, modality)
        inputs.affines = [item[3] if len(item) > 3 else None for item in data]
    if config.label_names:
        inputs.label_names = {int(k): v for k, v in config.label_names.items()}
    return inputs


def source_checkpoint(config: TrainConfig, loaded: Checkpoint | None = None) -> Checkpoint | None:
    """The checkpoint a run resumes or fine-tunes from (``loaded`` when it is that one), else None."""
    path = config.resume or config.init_checkpoint
    if not path:
        return None
    if loaded is not None and loaded.path and os.path.realpath(loaded.path) == os.path.realpath(path):
        return loaded
    return load_checkpoint(path, map_location="cpu")


# ------------------------------------------------------------------------------------------ planning
def _choose_plan(config: TrainConfig, plans: dict[str, Plan]) -> Generator[Message, None, Plan]:
    entry = derived_configuration(config.configuration) if config.configuration not in plans else None
    if entry is not None:
        derive, message = entry
        derived = derive(plans)
        if derived is not None:
            plans[config.configuration] = derived
            if message:
                yield Message(message)
    if config.configuration not in plans:
        raise TrainingError(
            f"Configuration {config.configuration!r} does not apply to this data; "
            f"the planner made {sorted(plans)}."
        )
    return plans[config.configuration]


def _plan_from_data(config: TrainConfig, inputs: CaseInputs) -> Generator[Any, None, tuple[Plan, dict]]:
    yield Progress("plan", 0, 1, "computing the dataset fingerprint")
    fingerprint = compute_fingerprint((inputs.read(i) for i in range(len(inputs))), ignore_label=config.ignore_label)
    num_classes = int(fingerprint.get("num_classes") or 2)
    if config.ignore_label is not None and config.ignore_label == num_classes - 1:
        num_classes -= 1  # the ignore label is not a class (partially annotated data)
    num_classes = max(num_classes, max(inputs.label_names, default=0) + 1, 2)
    plans = plan_from_fingerprint(fingerprint, modality=inputs.modality, num_classes=num_classes)
    plan = yield from _choose_plan(config, plans)
    yield Progress("plan", 1, 1, f"planned {config.configuration}")
    return plan, fingerprint


def _apply_patch_size(config: TrainConfig, plan: Plan) -> None:
    """Set the run's patch size on ``plan`` (new pooling and kernels unless weights are loaded)."""
    if len(config.patch_size) != len(plan.patch_size):
        raise TrainingError(
            f"patch_size {tuple(config.patch_size)} has {len(config.patch_size)} axes; this "
            f"configuration needs {len(plan.patch_size)}."
        )
    patch = tuple(int(p) for p in config.patch_size)
    if patch != tuple(plan.patch_size) and not (config.resume or config.init_checkpoint):
        # As nnU-Net: the pooling and kernels follow the patch (a checkpoint's stay fixed).
        _, pools, convs, padded, _ = get_pool_and_conv_props(plan.spacing[-len(patch):], patch)
        if tuple(padded) != patch:
            raise TrainingError(
                f"patch_size {patch} does not fit the network's pooling; use {tuple(padded)} "
                "(each axis a multiple of 2 to the number of poolings along it)."
            )
        plan.pool_kernels, plan.conv_kernels = pools, convs
    plan.patch_size = patch


def plan_training(
    config: TrainConfig, inputs: CaseInputs, source: Checkpoint | None
) -> Generator[Progress | Message, None, tuple[Plan, dict]]:
    """The run's plan and the data fingerprint it came from (``{}`` when it is the checkpoint's).

    Fills in ``inputs.label_names`` (``class_{c}``) when neither the data nor the config name them.

    Raises:
        TrainingError: the configuration does not apply, or the patch size does not fit.
    """
    fingerprint: dict = {}
    if source is not None:
        plan = Plan.from_dict(source.plan)
        reasons = parent_misfit(plan, source, inputs) if config.init_checkpoint and not config.resume else []
        if reasons:  # fine-tuning on another domain: plan for the data, keep the architecture
            plan, fingerprint = yield from replan_for_data(config, inputs, plan, reasons, _plan_from_data)
    else:
        plan, fingerprint = yield from _plan_from_data(config, inputs)
    if not inputs.label_names:
        inputs.label_names = {0: "background", **{c: f"class_{c}" for c in range(1, plan.num_classes)}}
    if source is not None and config.init_checkpoint and labels_differ(source, inputs.label_names):
        plan.num_classes = len(inputs.label_names)  # another task: the user's classes, a new head
    plan.num_classes = max(plan.num_classes, len(inputs.label_names))
    if config.patch_size is not None:
        _apply_patch_size(config, plan)
    elif config.minutes is not None:
        note = cap_for_cpu_budget(config, plan)
        if note:
            yield Message(note)
    if config.batch_size is not None:
        plan.batch_size = int(config.batch_size)
    return plan, fingerprint


# ------------------------------------------------------------------------------------ checks, split
def check_labels(
    cases, label_names: dict[int, str], ignore_label: int | None, need_foreground: bool = True,
    generation_values: set[int] | frozenset = frozenset(),
) -> None:
    """Check that every case has labels, only known values, and that something is labelled.

    ``generation_values``: generation-only label values a synthesising trainer kept (allowed,
    and not foreground).

    Raises:
        TrainingError: a case without labels or with unknown values; nothing labelled; or no
            foreground anywhere while ``need_foreground`` (fine-tuning may learn from background).
    """
    allowed = set(label_names) | ({ignore_label} if ignore_label is not None else set())
    any_fg = any_labelled = False
    for case in cases:
        if case.label is None:
            raise TrainingError(f"Case {case.name!r} has no labels; training needs labels.")
        values = set(np.unique(case.label).tolist())
        unknown = values - allowed - set(generation_values)
        values -= set(generation_values)
        if unknown:
            raise TrainingError(
                f"Case {case.name!r} has label values {sorted(unknown)} that are not among the "
                f"classes {sorted(label_names)}" + (f" or the ignore label {ignore_label}" if ignore_label is not None else "")
                + "."
            )
        labelled = values - ({ignore_label} if ignore_label is not None else set())
        any_labelled |= bool(labelled)
        any_fg |= bool(labelled - {0})
    if not any_labelled:
        raise TrainingError("No voxel is labelled: every voxel carries the ignore label.")
    if need_foreground and not any_fg:
        # Fine-tuning may learn from background-only corrections (erased false positives).
        raise TrainingError("The labels are empty: no case has any foreground voxel to learn from.")


def split_cases(cases: list, val_fraction: float, seed: int) -> tuple[list, list, bool]:
    """Seeded train / validation split: ``(train, validation, validation is the training set)``.

    At least one validation case when there are two or more cases and ``val_fraction > 0``; one
    case trains and validates on itself.
    """
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = int(round(val_fraction * len(cases))) if len(cases) > 1 else 0
    n_val = min(max(n_val, 1 if len(cases) > 1 and val_fraction > 0 else 0), len(cases) - 1)
    val_idx, train_idx = set(order[:n_val].tolist()), order[n_val:].tolist()
    train_cases = [cases[i] for i in train_idx]
    val_cases = [cases[i] for i in sorted(val_idx)] or train_cases
    return train_cases, val_cases, not val_idx


def prepare_data(
    config: TrainConfig, data: Any, trainer_cls: type | None = None
) -> Generator[Progress | Message, None, TrainingData]:
    """Turn a dataset folder, a ``RawDataset`` or in-memory arrays into preprocessed cases.

    Args:
        config: The run's settings.
        data: A path to an nnU-Net raw dataset, a ``RawDataset``, or a list of
            ``(image, label, spacing)`` tuples (image ``(z, y, x)`` or ``(C, z, y, x)``), optionally
            with the image's 4x4 RAS+ affine as a fourth item.
        trainer_cls: The trainer whose :meth:`prepare_cases` hook preprocesses the cases; default:
            the registered one for this config and plan.

    Yields:
        ``Progress`` (planning, preprocessing) and ``Message`` events.

    Returns:
        The split cases, the plan and what the checkpoint must remember about them.
    """
    config = resolve_recipe(config)
    inputs = case_inputs(config, data)
    source = source_checkpoint(config)
    if source is not None and source.orientation:
        inputs.orientation = source.orientation  # the weights' layout: fine-tuning data follows it
    plan, fingerprint = yield from plan_training(config, inputs, source)
    cls = trainer_cls or trainer_for(config, plan)
    cases = yield from cls.prepare_cases(config, inputs, plan)
    kept = {v for rc in inputs.raw_cases or () if rc.keep_generation for v in rc.generation_values}
    check_labels(cases, inputs.label_names, config.ignore_label, need_foreground=not config.init_checkpoint,
                 generation_values=kept)
    train_cases, val_cases, val_is_train = split_cases(cases, config.val_fraction, config.seed)
    validation = ""
    if val_is_train and config.ignore_label is not None and len(cases) == 1:
        # One partly painted case: hold out some painted slices, or say there is no validation.
        train_case, val_case, held = hold_out_slices(cases[0], config.ignore_label)
        if val_case is not None:
            yield Message(f"Validation on {len(held)} held-out painted slice(s) {held}; they are not trained on.")
        train_cases, val_cases = [train_case], [val_case] if val_case is not None else []
        val_is_train, validation = False, "held-out slices" if val_case is not None else "none"
    extra, domain = yield from from_parent(config, source, inputs)
    return TrainingData(
        train_cases, val_cases, plan, inputs.label_names, fingerprint, val_is_train=val_is_train, source=source,
        orientation=inputs.orientation, domain=domain, validation=validation, extra=extra,
    )


__all__ = [
    "CaseInputs", "TrainingData", "as_case_arrays", "case_inputs", "check_labels", "plan_training",
    "prepare_data", "register_derived_configuration", "source_checkpoint", "split_cases",
]
