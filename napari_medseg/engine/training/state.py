"""The :class:`~napari_medseg.engine.training.trainer.Trainer`'s machinery around its hooks.

What a run reads and writes besides its batches: the device of this process, the architecture
(from the plan or the resume / fine-tune checkpoint), the initial weights, checkpoints and
``run.json`` (written atomically, by rank 0 only), the out-of-memory ladder and the distributed
set-up and final check. Functions take the trainer so that ``trainer.py`` stays a readable loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

import torch

from napari_medseg import __version__
from napari_medseg.engine.checkpoints import (
    Checkpoint,
    load_weights_for_finetune,
    save_checkpoint,
    to_plain,
)
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.runtime import distributed as ddp
from napari_medseg.engine.runtime.devices import resolve_device
from napari_medseg.engine.runtime.oom import (
    InsufficientMemoryError,
    pooling_divisors,
    release_memory,
)
from napari_medseg.engine.runtime.oom import (
    halve_batch_and_patch as halve_sizes,
)
from napari_medseg.engine.training.config import TrainConfig, TrainingError
from napari_medseg.engine.training.prepare import source_checkpoint
from napari_medseg.io.atomic import atomic_path
from napari_medseg.models import accepted_kwargs, get_model_spec

logger = logging.getLogger(__name__)


def process_device(device: str) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)`` of this process (``cuda:LOCAL_RANK`` under torchrun)."""
    ddp.require_process_group()
    rank, world_size = ddp.get_rank(), ddp.get_world_size()
    return rank, world_size, ddp.rank_device(device) if world_size > 1 else resolve_device(device)


def architecture_kwargs(
    model_name: str, plan: Plan, config: TrainConfig, source: Checkpoint | None = None
) -> dict:
    """Kwargs for ``create_model``: the plan's kernels where the model takes them, then the user's.

    ``source`` is the resume / fine-tune checkpoint when the caller has it loaded already; resuming
    or fine-tuning keeps the checkpoint's architecture (the user's kwargs still win).

    Raises:
        TrainingError: the checkpoint holds another model.
    """
    spec = get_model_spec(model_name)
    accepted = set(accepted_kwargs(model_name))
    kwargs: dict[str, Any] = {}
    ckpt = source_checkpoint(config, source)
    if ckpt is not None:
        if ckpt.model_name != model_name:
            raise TrainingError(
                f"The checkpoint {ckpt.path} holds a {ckpt.model_name!r} model; the run asks for {model_name!r}."
            )
        kwargs.update(ckpt.model_kwargs)
    elif spec.configurable_by_plan:
        kwargs["pool_kernels"] = [list(k) for k in plan.pool_kernels]
        kwargs["conv_kernels"] = [list(k) for k in plan.conv_kernels]
    if "deep_supervision" in accepted and not config.resume:
        kwargs["deep_supervision"] = bool(config.deep_supervision)
    kwargs.update(config.model_kwargs)
    return kwargs


def load_initial_weights(trainer) -> None:
    """Resume (weights, optimiser, history, epoch) or fine-tune (the weights that fit) the trainer's model."""
    cfg = trainer.config
    ckpt = source_checkpoint(cfg, trainer.data.source)
    trainer.data.source = None  # the weights are in the model now: let the loaded copy go
    if cfg.resume:
        if ckpt.model_name != cfg.model or ckpt.num_classes != trainer.num_classes:
            raise TrainingError(
                f"Cannot resume: the checkpoint is a {ckpt.model_name!r} with {ckpt.num_classes} "
                f"classes, the run is a {cfg.model!r} with {trainer.num_classes}."
            )
        trainer.model.load_state_dict(ckpt.state_dict)
        if ckpt.optimizer_state:
            trainer.optimizer.load_state_dict(ckpt.optimizer_state)
        trainer.start_epoch = int(ckpt.epoch) + 1
        trainer.history = list(ckpt.history or [])
        best = (ckpt.extra or {}).get("best_dice")  # None when saved before any validation (-inf)
        trainer.best_dice = float(best) if best is not None else -math.inf
        trainer.messages.append(f"Resumed from {cfg.resume} at epoch {trainer.start_epoch}.")
    elif cfg.init_checkpoint:
        skipped = load_weights_for_finetune(trainer.model, ckpt)
        parent_axes = (ckpt.train_config or {}).get("mirror_axes")
        if cfg.mirror_axes is None and parent_axes is not None:  # the parent's symmetry (TTA too)
            cfg.mirror_axes = tuple(int(a) for a in parent_axes)
        msg = f"Fine-tuning from {cfg.init_checkpoint}"
        if skipped:
            msg += f"; re-initialised {len(skipped)} tensor(s) that did not fit: {', '.join(skipped[:4])}"
        trainer.messages.append(msg + ".")
    keep_sides(trainer)


_SIDE = re.compile(r"(?:^|[^a-z])(?:left|right|lt|rt|l|r)(?:[^a-z]|$)", re.IGNORECASE)


def sided_classes(label_names: dict | None) -> list[str]:
    """The class names that name a body side (``kidney_left``, ``Left-Putamen``, ``lung R``)."""
    return [str(n) for n in (label_names or {}).values() if _SIDE.search(str(n))]


def left_right_patch_axis(orientation: str | None, spatial_dims: int, ndim: int = 3) -> int | None:
    """The patch axis that runs left-right, or ``None`` when no patch axis does.

    ``orientation`` is the training orientation's axis codes (``"SAR"``: axis 2 runs to the
    right); unknown (arrays without a geometry), the last axis, napari's x of an axial volume. A
    2D configuration's patches are the last two axes.
    """
    if orientation:
        found = [i for i, c in enumerate(orientation.upper()) if c in "LR"]
        volume_axis = found[0] if found else None
    else:
        volume_axis = ndim - 1
    if volume_axis is None:
        return None
    axis = volume_axis - (ndim - spatial_dims)
    return axis if axis >= 0 else None


def keep_sides(trainer) -> None:
    """No left-right mirroring (training and test-time) when classes name a body side.

    A mirrored ``kidney_left`` is a right kidney labelled left: nnU-Net mirrors every axis
    regardless, TotalSegmentator turns mirroring off; we drop only the left-right axis. Called
    after the parent's mirroring axes are inherited, so a parent's ``[2]`` goes too.
    """
    cfg, names = trainer.config, trainer.data.label_names
    sided = sided_classes(names)
    axis = left_right_patch_axis(getattr(trainer.data, "orientation", None), trainer.spatial_dims)
    if not sided or axis is None:
        return
    axes = tuple(range(trainer.spatial_dims)) if cfg.mirror_axes is None else tuple(cfg.mirror_axes)
    if axis in axes:
        cfg.mirror_axes = tuple(a for a in axes if a != axis)
        trainer.messages.append(
            f"Classes name a side ({', '.join(sided[:3])}{' ...' if len(sided) > 3 else ''}): no mirroring "
            f"along the left-right axis (patch axis {axis}), in training or at test time."
        )


def setup_distributed(trainer) -> None:
    """Check that all ranks prepared the same data, then wrap the model in DDP.

    Wrapping broadcasts rank 0's weights. Each rank trains on its own batches of the plan's batch
    size, so the global batch is ``world_size x batch_size`` (as nnU-Net v2).
    """
    data, plan = trainer.data, trainer.plan
    ddp.check_same_on_all_ranks(
        {
            "plan": plan.to_dict(), "model_kwargs": trainer.model_kwargs,
            "train": [c.name for c in data.train_cases], "val": [c.name for c in data.val_cases],
        },
        "plan, model or train/validation split",
    )
    trainer.model = ddp.wrap_model(trainer.model, trainer.device)
    trainer.initial_fingerprint = ddp.replica_fingerprint(trainer.unwrapped_model)
    backend = torch.distributed.get_backend()
    trainer.messages.append(
        f"Distributed training on {trainer.world_size} processes ({backend}): {plan.batch_size} "
        f"patches per process, global batch {trainer.world_size * plan.batch_size}."
    )


def finish_distributed(trainer) -> str | None:
    """Compare the replicas' weights across ranks; write the per-rank report if asked.

    Returns:
        A warning when the replicas differ (they never should), else ``None``.
    """
    final = ddp.replica_fingerprint(trainer.unwrapped_model)
    differ = ddp.ranks_disagreeing(final)
    ddp.write_rank_report({
        "rank": trainer.rank, "world_size": trainer.world_size, "device": str(trainer.device),
        "initial_fingerprint": trainer.initial_fingerprint, "final_fingerprint": final,
        "train_losses": trainer.rank_losses, "replicas_differ": differ,
    }, trainer.config.rank_report_dir)
    if differ:
        return f"The weights on ranks {differ} differ from rank 0's; only rank 0's were saved."
    return None


def halve_batch_and_patch(trainer, err: BaseException) -> str:
    """The base out-of-memory step: halve the batch, then the patch; rebuild the sampling; say so.

    Raises:
        InsufficientMemoryError: the batch is 1 and the patch cannot shrink further, or the run is
            distributed (one rank alone cannot change shapes while the others all-reduce).
    """
    if trainer.world_size > 1:
        raise InsufficientMemoryError(
            f"Out of memory on {trainer.device} in a distributed run ({type(err).__name__}). Restart with "
            "a smaller --batch-size or --patch-size (all processes must use the same)."
        ) from err
    trainer.optimizer.zero_grad(set_to_none=True)
    reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    plan = trainer.plan
    old_batch, old_patch = int(plan.batch_size), tuple(plan.patch_size)
    pools = trainer.model_kwargs.get("pool_kernels") or plan.pool_kernels
    batch, patch = halve_sizes(old_batch, old_patch, pooling_divisors(pools, len(old_patch)))
    plan.batch_size, plan.patch_size = batch, patch
    trainer.build_sampling(patch, batch)
    release_memory(trainer.device)
    text = (
        f"Out of memory on {trainer.device} ({reason}): halved the batch {old_batch} -> {batch} and the "
        f"patch {old_patch} -> {patch}; training goes on."
    )
    logger.warning(text)
    return text


def save_trainer_checkpoint(trainer, name: str, epoch: int) -> str:
    """Write ``name`` in the run folder from the trainer's bare network (rank 0 only); return its path.

    The checkpoint records the orientation the cases were trained in and their domain
    (``trainer.data.orientation`` / ``.domain``, see :mod:`~napari_medseg.engine.training.prepare`),
    and the parent's post-processing a fine-tune on its classes keeps (``trainer.data.extra``).
    """
    path = os.path.join(trainer.config.output_dir, name)
    if trainer.rank != 0:
        return path
    best = trainer.best_dice
    data = trainer.data
    save_checkpoint(
        path, trainer.unwrapped_model, model_name=trainer.config.model, model_kwargs=trainer.model_kwargs,
        in_channels=trainer.in_channels, num_classes=trainer.num_classes, spatial_dims=trainer.spatial_dims,
        plan=trainer.plan.to_dict(), label_names=trainer.data.label_names,
        train_config=trainer.config.to_dict(), epoch=epoch, optimizer=trainer.optimizer,
        history=trainer.history, extra={**data.extra, "best_dice": best if math.isfinite(best) else None},
        orientation=getattr(data, "orientation", None), domain=getattr(data, "domain", None),
    )
    return path


def run_info(trainer) -> dict:
    """What ``run.json`` records: config, plan, labels, fingerprint, versions, device and split."""
    data, plan = trainer.data, trainer.plan
    return {
        "config": trainer.config.to_dict(),
        "plan": plan.to_dict(),
        "label_names": {str(k): v for k, v in data.label_names.items()},
        "fingerprint": to_plain(data.fingerprint, "fingerprint"),
        "orientation": getattr(data, "orientation", None),
        "domain": to_plain(getattr(data, "domain", None), "domain"),
        "versions": {"napari_medseg": __version__, "torch": torch.__version__},
        "device": str(trainer.device),
        "num_train_cases": len(data.train_cases),
        "num_val_cases": len(data.val_cases),
        "val_is_train": data.val_is_train,
        "train_cases": [c.name for c in data.train_cases],
        "val_cases": [c.name for c in data.val_cases],
        "world_size": trainer.world_size,
        "global_batch_size": trainer.world_size * int(plan.batch_size),
    }


def write_run_info(trainer) -> None:
    """Write :func:`run_info` as ``run.json`` in the run folder, atomically; rank 0 only."""
    if trainer.rank != 0:
        return  # one writer per run folder
    os.makedirs(trainer.config.output_dir, exist_ok=True)
    with atomic_path(os.path.join(trainer.config.output_dir, "run.json")) as tmp, open(tmp, "w") as fh:
        json.dump(run_info(trainer), fh, indent=2)  # as before: NaN statistics are written, not refused


__all__ = [
    "keep_sides", "left_right_patch_axis", "sided_classes",
    "architecture_kwargs", "finish_distributed", "halve_batch_and_patch", "load_initial_weights",
    "process_device", "run_info", "save_trainer_checkpoint", "setup_distributed", "write_run_info",
]
