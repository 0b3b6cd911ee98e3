"""Use a checkpoint: check an image fits it, rebuild its model, carry weights over for fine-tuning,
summarise it for the model library and the CLI; set its orientation or training domain on a copy
(:func:`with_orientation`, :func:`with_domain`) and write a loaded checkpoint back
(:func:`write_checkpoint`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from napari_medseg.engine.checkpoints.fields import check_domain_field, check_orientation_field
from napari_medseg.engine.checkpoints.format import (
    Checkpoint,
    CheckpointError,
    as_checkpoint,
    save_checkpoint,
)
from napari_medseg.engine.checkpoints.plain import to_plain
from napari_medseg.engine.runtime import resolve_device
from napari_medseg.io.limits import check_memory
from napari_medseg.models import ModelError, create_model

logger = logging.getLogger(__name__)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


def check_compatible(ckpt: Checkpoint | Any, in_channels: int, spatial_dims: int) -> None:
    """Check an image with ``in_channels`` channels and ``spatial_dims`` axes suits ``ckpt``.

    A 2D model segments a 3D volume slice by slice; a 3D model needs a 3D image. ``ckpt`` may be
    any object with ``in_channels`` and ``spatial_dims`` (e.g. a model library entry).

    Raises:
        CheckpointError: saying in plain words what does not fit.
    """
    if in_channels != ckpt.in_channels:
        raise CheckpointError(
            f"The checkpoint expects {ckpt.in_channels} input channel(s); the image has {in_channels}."
        )
    if spatial_dims not in (2, 3):
        raise CheckpointError(f"Images must be 2D or 3D; this one has {spatial_dims} spatial axes.")
    if ckpt.spatial_dims == 3 and spatial_dims == 2:
        raise CheckpointError("The checkpoint is a 3D model; the image is 2D. Use a 2D model.")


def _describe_mismatch(ckpt: Checkpoint, model: torch.nn.Module) -> str | None:
    """Explain in plain words why ``ckpt.state_dict`` does not fit ``model`` (None if it fits)."""
    mine = model.state_dict()
    theirs = ckpt.state_dict
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    if missing or unexpected:
        return (
            f"the weights do not fit a {ckpt.model_name!r} model built with {ckpt.model_kwargs}: "
            f"{len(missing)} parameter(s) missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}). The checkpoint was probably made with another architecture "
            "or other architecture settings."
        )
    bad = [k for k in mine if tuple(mine[k].shape) != tuple(theirs[k].shape)]
    if not bad:
        return None
    convs = [k for k, v in mine.items() if v.ndim >= 3]
    first = convs[0] if convs else None
    if first in bad and mine[first].shape[1] != theirs[first].shape[1]:
        return (
            f"the weights expect {_plural(int(theirs[first].shape[1]), 'input channel')} but the "
            f"checkpoint says {ckpt.in_channels}"
        )
    if all(
        mine[k].shape[1:] == theirs[k].shape[1:] and mine[k].shape[0] == ckpt.num_classes
        for k in bad
    ):
        return (
            f"the weights predict {_plural(int(theirs[bad[0]].shape[0]), 'class', 'classes')} but the checkpoint "
            f"says {ckpt.num_classes}"
        )
    details = "; ".join(
        f"{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(mine[k].shape)}" for k in bad[:3]
    )
    return f"{len(bad)} weight shape(s) differ ({details}); another architecture or settings?"


_WEIGHT_INITIALISERS = {"pretrained": False, "init_2d": None}


def _build(ckpt: Checkpoint, kwargs: dict, device: torch.device | None) -> torch.nn.Module | None:
    """The checkpoint's model; on ``device`` ``meta``: shapes without memory, ``None`` when a
    factory cannot build there (the checks then run on the real model)."""
    try:
        if device is None:
            return create_model(ckpt.model_name, ckpt.in_channels, ckpt.num_classes, ckpt.spatial_dims, **kwargs)
        with device:
            return create_model(ckpt.model_name, ckpt.in_channels, ckpt.num_classes, ckpt.spatial_dims, **kwargs)
    except (ModelError, TypeError, ValueError) as err:
        raise CheckpointError(f"Cannot build the model {ckpt.model_name!r} this checkpoint names: {err}") from err
    except Exception as err:  # noqa: BLE001 - only the meta build may fail for a foreign reason
        if device is None:
            raise
        logger.debug("Cannot build %s on %s (%s); checking the real model", ckpt.model_name, device, err)
        return None


def build_model(ckpt: Checkpoint | str | os.PathLike, device: Any = "cpu", **override_kwargs: Any):
    """Rebuild the model a checkpoint describes and load its weights strictly.

    Args:
        ckpt: A :class:`Checkpoint` or a path.
        device: Where the model goes (``"auto"``, ``"cpu"``, ``"cuda:N"``, ``"mps"`` or a device).
        **override_kwargs: Architecture kwargs overriding the stored ones (e.g. ``deep_supervision``).

    Returns:
        The model in eval mode on ``device``.

    Raises:
        CheckpointError: if the model cannot be built or the weights do not fit it.
    """
    ckpt = as_checkpoint(ckpt)
    kwargs = {**ckpt.model_kwargs, **override_kwargs}
    # The weights come from the checkpoint: initialisers that fetch other weights (timm's
    # pretrained ones, a 2D state dict to inflate) would only be overwritten, and may not exist here.
    for key, neutral in _WEIGHT_INITIALISERS.items():
        if key in kwargs and key not in override_kwargs:
            kwargs[key] = neutral
    where = f"Checkpoint {ckpt.path}" if ckpt.path else "The checkpoint"
    # First on the meta device (shapes only, no memory): settings that describe another or a giant
    # network are refused here, before they allocate gigabytes.
    skeleton = _build(ckpt, kwargs, torch.device("meta"))
    if skeleton is not None:
        problem = _describe_mismatch(ckpt, skeleton)
        if problem:
            raise CheckpointError(f"{where} does not fit: {problem}.")
        nbytes = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
        check_memory(nbytes, f"Building the {ckpt.model_name!r} model of {where.lower()}", CheckpointError)
    model = _build(ckpt, kwargs, None)
    device = resolve_device(device)
    problem = _describe_mismatch(ckpt, model)
    if problem:
        raise CheckpointError(f"{where} does not fit: {problem}.")
    for k, v in ckpt.state_dict.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            where = f"Checkpoint {ckpt.path}" if ckpt.path else "The checkpoint"
            raise CheckpointError(
                f"{where} has NaN or infinite weights (in {k!r}): the file is damaged or its training "
                "diverged. Use an earlier checkpoint (e.g. checkpoint_best.pt)."
            )
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.to(device)
    model.eval()
    return model


def load_weights_for_finetune(
    model: torch.nn.Module, ckpt: Checkpoint | str | os.PathLike | dict
) -> list[str]:
    """Load every tensor whose name and shape match; keep the model's own init for the rest.

    Use it on a freshly created model, e.g. one with another number of classes: the head then keeps
    its fresh initialisation while the encoder/decoder start from the checkpoint.

    Returns:
        Names of the model's entries that were *not* loaded (re-initialised).
    """
    theirs = ckpt if isinstance(ckpt, dict) else as_checkpoint(ckpt).state_dict
    mine = model.state_dict()
    take = {
        k: v for k, v in theirs.items() if k in mine and tuple(v.shape) == tuple(mine[k].shape)
    }
    skipped = [k for k in mine if k not in take]
    model.load_state_dict(take, strict=False)
    if skipped:
        logger.info("Fine-tuning: %d of %d entries re-initialised: %s", len(skipped), len(mine), skipped)
    return skipped


def checkpoint_summary(path_or_ckpt: Checkpoint | str | os.PathLike) -> dict:
    """Plain information about a checkpoint (no weights) for the model library and the CLI."""
    ckpt = as_checkpoint(path_or_ckpt)
    plan = ckpt.plan or {}
    last = ckpt.history[-1] if ckpt.history else {}
    n_params = sum(int(v.numel()) for v in ckpt.state_dict.values() if v.is_floating_point())
    size = os.path.getsize(ckpt.path) if ckpt.path and os.path.isfile(ckpt.path) else None
    return {
        "path": ckpt.path,
        "format_version": ckpt.format_version,
        "model_name": ckpt.model_name,
        "model_kwargs": dict(ckpt.model_kwargs),
        "in_channels": ckpt.in_channels,
        "num_classes": ckpt.num_classes,
        "spatial_dims": ckpt.spatial_dims,
        "configuration": plan.get("configuration"),
        "patch_size": list(plan.get("patch_size") or []),
        "spacing": list(plan.get("spacing") or []),
        "label_names": {int(k): v for k, v in ckpt.label_names.items()},
        "epoch": ckpt.epoch,
        "num_parameters": n_params,
        "file_size_bytes": size,
        "versions": dict(ckpt.versions),
        "train_config": dict(ckpt.train_config),
        "last_metrics": {k: v for k, v in last.items() if isinstance(v, (int, float, str))},
        "resumable": ckpt.optimizer_state is not None,
        "extra": dict(ckpt.extra),
        "orientation": ckpt.orientation,
        "domain": dict(ckpt.domain) if ckpt.domain is not None else None,
    }


def with_orientation(ckpt: Checkpoint | str | os.PathLike, orientation: str | None) -> Checkpoint:
    """A copy of ``ckpt`` recording the orientation (axis codes, e.g. ``"SAR"``) its model was trained in.

    Raises:
        CheckpointError: ``orientation`` is not ``None`` or 2-3 axis codes.
    """
    return dataclasses.replace(as_checkpoint(ckpt), orientation=check_orientation_field(orientation))


def with_domain(ckpt: Checkpoint | str | os.PathLike, domain: dict | None) -> Checkpoint:
    """A copy of ``ckpt`` recording its training domain (see :mod:`.fields`), e.g. for a checkpoint
    trained before domains were recorded; write it with :func:`write_checkpoint`.

    Raises:
        CheckpointError: ``domain`` is not plain data of the documented shape.
    """
    domain = check_domain_field(to_plain(domain, "domain") if domain is not None else None)
    return dataclasses.replace(as_checkpoint(ckpt), domain=domain)


def write_checkpoint(ckpt: Checkpoint, path: str | os.PathLike, *, with_optimizer: bool = True) -> str:
    """Write a loaded (or :func:`with_domain`-changed) checkpoint to ``path``, atomically.

    Args:
        ckpt: The checkpoint; every field is written as it is.
        path: Target file (its folder is created); an existing file is replaced atomically.
        with_optimizer: Keep the optimiser and scheduler state (``False``: an inference-only file,
            about half the size).

    Returns:
        The path written.
    """
    return save_checkpoint(
        path, ckpt.state_dict, model_name=ckpt.model_name, model_kwargs=ckpt.model_kwargs,
        in_channels=ckpt.in_channels, num_classes=ckpt.num_classes, spatial_dims=ckpt.spatial_dims,
        plan=ckpt.plan, label_names=ckpt.label_names, train_config=ckpt.train_config, epoch=ckpt.epoch,
        optimizer=ckpt.optimizer_state if with_optimizer else None,
        scheduler=ckpt.scheduler_state if with_optimizer else None,
        history=ckpt.history, extra=ckpt.extra, orientation=ckpt.orientation, domain=ckpt.domain,
    )


__all__ = [
    "build_model",
    "check_compatible",
    "checkpoint_summary",
    "load_weights_for_finetune",
    "with_domain",
    "with_orientation",
    "write_checkpoint",
]
