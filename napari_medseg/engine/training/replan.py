"""Fine-tuning on data the parent checkpoint was not planned for.

A checkpoint's plan fixes a voxel spacing, a patch, an intensity normalisation and a label set
for *its* data. Fine-tuning the shipped 1-2 mm T1 brain model on a 3 mm abdominal CT with that
plan resamples the CT 27x finer, normalises Hounsfield units as MRI and keeps brain label names.
So before fine-tuning, :func:`parent_misfit` compares the parent's plan with the new data, and
when it does not fit, :func:`replan_for_data` plans again from the data (nnU-Net's planner, the
parent's configuration) while keeping what the weights need: the parent's architecture (pooling
and kernels: the patch is rounded to fit them) and its mirroring axes. The weights then carry over
where their shapes allow (all but the head when the classes differ;
:func:`~napari_medseg.engine.checkpoints.load_weights_for_finetune`).

What is compared:

* **spacing**: the data's median spacing is coarser than the plan's by more than 1.5x on an axis
  (finer data are resampled onto the parent's grid, as prediction does: the weights keep the
  scale they learnt; re-planning the shipped 2 mm model for a 1 mm T1 showed it structures twice
  as large and halved its Dice after a minute of fine-tuning);
* **intensities**: the data lies outside the parent's recorded domain
  (:func:`~napari_medseg.engine.inference.domain.check_domain`: e.g. CT into an MRI model);
* **labels**: the data's label names differ from the parent's: the user's names replace the
  parent's and the head gets the user's number of classes (this alone needs no new plan).

A fine-tune on the parent's own classes is a *correction* (:mod:`.correction`).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import Any

import numpy as np

from napari_medseg.engine.checkpoints import Checkpoint
from napari_medseg.engine.inference.domain import check_domain
from napari_medseg.engine.jobs import Message
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.runtime.devices import resolve_device

#: Largest ratio between the data's and the plan's spacing (per axis) kept without re-planning.
SPACING_TOLERANCE = 1.5


def labels_differ(source: Checkpoint, label_names: dict[int, str]) -> bool:
    """Whether the run's label names are not the parent's (another task, not a correction)."""
    parent = {int(k): str(v) for k, v in (source.label_names or {}).items()}
    mine = {int(k): str(v) for k, v in label_names.items()}
    return bool(mine) and mine != parent


def parent_misfit(plan: Plan, source: Checkpoint, inputs) -> list[str]:
    """One line per reason why ``plan`` (the parent's) does not fit the run's data (``[]``: it fits)."""
    reasons = []
    spacings, first = [], None
    for i in range(len(inputs)):
        image, spacing, _ = inputs.read(i)
        spacings.append(spacing)
        if first is None:
            first = (image, spacing)
    n = len(plan.spacing)
    median = np.median(np.asarray([s[-n:] for s in spacings], float), axis=0)
    ratio = median / np.asarray(plan.spacing, float)
    if np.any(ratio > SPACING_TOLERANCE):  # finer data go onto the parent's grid, as at inference
        reasons.append(f"spacing {tuple(round(float(s), 2) for s in median)} mm vs the parent's "
                       f"{tuple(round(float(s), 2) for s in plan.spacing)} mm")
    if first is not None:
        reasons += [f"intensities: {r}" for r in check_domain(first[0], first[1], source)]
    return reasons


def _strides(patch, pool_kernels) -> np.ndarray:
    return np.prod(np.asarray(pool_kernels, int), axis=0) if len(pool_kernels) else np.ones(len(patch), int)


def fit_patch(patch, pool_kernels) -> tuple[int, ...]:
    """``patch`` rounded up per axis to a multiple of the pooling's total stride."""
    return tuple(int(max(s, int(np.ceil(p / s)) * s)) for p, s in zip(patch, _strides(patch, pool_kernels)))


def cap_patch(patch, pool_kernels, max_voxels: int) -> tuple[int, ...]:
    """``patch`` with its largest axes halved (to multiples of the pooling's stride) until at most ``max_voxels``."""
    patch, strides = [int(p) for p in patch], _strides(patch, pool_kernels)
    while int(np.prod(patch)) > max_voxels:
        for a in sorted(range(len(patch)), key=lambda a: -patch[a]):
            s = int(strides[a])
            smaller = max(s, int(np.ceil(patch[a] / 2 / s)) * s)
            if smaller < patch[a]:
                patch[a] = smaller
                break
        else:
            break  # every axis at its stride: as small as the architecture allows
    return tuple(patch)


#: Largest patch (voxels) of a time-budgeted run on the CPU unless the user sets one: a 3D plan
#: sized for a GPU's memory (e.g. 112x112x128) takes ~20 s a step on 2 cores, 15 steps in 5 minutes.
CPU_BUDGET_PATCH_VOXELS = 64**3


def cap_for_cpu_budget(config, plan: Plan) -> str | None:
    """Cap a time-budgeted CPU run's patch at :data:`CPU_BUDGET_PATCH_VOXELS` (in place); what to tell the user."""
    try:
        on_cpu = resolve_device(config.device).type == "cpu"
    except Exception:  # noqa: BLE001 - an unavailable device is reported when the run starts
        return None
    capped = cap_patch(plan.patch_size, plan.pool_kernels, CPU_BUDGET_PATCH_VOXELS)
    if not on_cpu or tuple(capped) == tuple(plan.patch_size):
        return None
    note = (f"A {config.minutes:g}-minute run on the CPU: patch {tuple(plan.patch_size)} -> {tuple(capped)}, so "
            "that it takes many steps instead of a few (set a patch size to override).")
    plan.patch_size = list(capped)
    return note


def replan_for_data(
    config, inputs, parent: Plan, reasons: list[str], plan_from_data
) -> Generator[Any, None, tuple[Plan, dict]]:
    """A plan for the run's data that keeps the parent's architecture.

    Args:
        config: The run's ``TrainConfig``.
        inputs: The run's ``CaseInputs``.
        parent: The parent checkpoint's plan.
        reasons: What did not fit (:func:`parent_misfit`), told to the user.
        plan_from_data: ``(config, inputs) -> generator returning (plan, fingerprint)``: the
            planner the run would use without a parent.
    """
    run_config = replace(config, configuration=parent.configuration)
    plan, fingerprint = yield from plan_from_data(run_config, inputs)
    plan.pool_kernels = [list(k) for k in parent.pool_kernels]
    plan.conv_kernels = [list(k) for k in parent.conv_kernels]
    plan.patch_size = fit_patch(plan.patch_size, parent.pool_kernels)
    yield Message(
        "Re-planned for this data (" + "; ".join(reasons) + f"): spacing {tuple(plan.spacing)} mm, patch "
        f"{tuple(plan.patch_size)}, {plan.normalization[0]} normalisation; the parent's architecture "
        "and the weights that fit are kept."
    )
    return plan, fingerprint


__all__ = ["CPU_BUDGET_PATCH_VOXELS", "SPACING_TOLERANCE", "cap_for_cpu_budget", "cap_patch", "fit_patch", "labels_differ", "parent_misfit", "replan_for_data"]
