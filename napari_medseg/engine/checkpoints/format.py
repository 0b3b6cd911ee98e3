"""Safe, self-describing checkpoints (DESIGN.md convention 5).

A checkpoint is one ``torch.save`` file holding a dict of plain types (dict, list, str, int, float,
bool, None) and tensors: the model's registry name and kwargs, the preprocessing plan, the label
names, the training config, the package versions and the weights; optionally the orientation the
model was trained in and its training domain (:mod:`.fields`; missing in older files: ``None``).
Everything needed to rebuild the model and to preprocess an image the way it was trained is in the
file; nothing names a Python class.

Loading uses ``torch.load(weights_only=True)`` only, so a file cannot run code when opened; before it
the archive's CRC-32 checksums are verified (:mod:`.integrity`: a damaged copy is refused, not loaded
with wrong weights), and every field is validated before use. Writing goes to a temporary file in the target folder, is flushed and
fsynced, then atomically renamed over the target: a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import platform
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from napari_medseg import __version__
from napari_medseg.engine.checkpoints.fields import check_domain_field, check_orientation_field
from napari_medseg.engine.checkpoints.integrity import TensorBudget, check_file
from napari_medseg.engine.checkpoints.plain import MAX_DEPTH, CheckpointError, to_plain
from napari_medseg.io.atomic import atomic_path

logger = logging.getLogger(__name__)

FORMAT_TAG = "napari-medseg-checkpoint"
FORMAT_VERSION = 1
#: Refuse checkpoints with more tensors than this (model + optimizer state).
MAX_TENSORS = 50_000
#: Refuse checkpoints whose tensors hold more elements than this in total (about 16 GB of float32).
MAX_TOTAL_ELEMENTS = 4_000_000_000
#: Refuse checkpoint files larger than this many bytes (64 GiB) before reading them.
MAX_FILE_BYTES = 64 * 2**30

_PLAIN_SCALARS = (str, int, float, bool, type(None))  # exact types: subclasses would not load
_PLAIN_MAPPINGS = (dict, OrderedDict)


@dataclass
class Checkpoint:
    """The contents of a napari-medseg checkpoint file, validated.

    Attributes:
        model_name: Registry name of the architecture (``napari_medseg.models.create_model``).
        model_kwargs: Architecture kwargs passed to ``create_model`` (plain types).
        in_channels: Number of image channels the model takes.
        num_classes: Number of output classes, background included.
        spatial_dims: 2 or 3.
        plan: ``Plan.to_dict()`` of the preprocessing/patch plan the model was trained with.
        label_names: Class index -> name.
        train_config: The training configuration, as a plain dict.
        versions: ``napari_medseg``, ``torch`` and ``python`` versions that wrote the file.
        epoch: Zero-based index of the last completed training epoch (``-1``: none completed yet,
            e.g. a run cancelled during its first epoch); resuming starts at ``epoch + 1``.
        state_dict: Parameter name -> tensor.
        optimizer_state: ``optimizer.state_dict()`` or ``None``.
        scheduler_state: ``scheduler.state_dict()`` or ``None``.
        history: Per-epoch metrics, plain dicts.
        extra: Anything else worth keeping, plain types.
        format_version: Format version of the file.
        path: File the checkpoint was loaded from, if any.
        orientation: Axis codes the model was trained in (``"SAR"``: RAS+ NIfTI); ``None``: unknown.
        domain: The training images' modality, spacing, intensities (:mod:`.fields`); ``None``: unknown.
    """

    model_name: str
    model_kwargs: dict
    in_channels: int
    num_classes: int
    spatial_dims: int
    plan: dict
    label_names: dict[int, str]
    train_config: dict
    versions: dict
    epoch: int
    state_dict: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    path: str | None = None
    orientation: str | None = None
    domain: dict | None = None


# --------------------------------------------------------------------------------------- plain data
def _check_plain(
    obj: Any, where: str, *, tensors: TensorBudget | None = None, depth: int = 0
) -> None:
    """Check ``obj`` is made only of plain types (and tensors when ``tensors`` is given)."""
    if depth > MAX_DEPTH:
        raise CheckpointError(f"Checkpoint field {where} is nested too deeply.")
    if type(obj) in _PLAIN_SCALARS:
        return
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise CheckpointError(f"Checkpoint field {where} holds a tensor where plain data belongs.")
        tensors.add(obj, where)
        return
    if type(obj) in _PLAIN_MAPPINGS:
        if len(obj) > MAX_TENSORS:
            raise CheckpointError(f"Checkpoint field {where} has an absurd number of entries.")
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise CheckpointError(f"Checkpoint field {where} has a key of type {type(k).__name__}.")
            _check_plain(v, f"{where}[{k!r}]", tensors=tensors, depth=depth + 1)
        return
    if type(obj) in (list, tuple):
        if len(obj) > MAX_TENSORS * 10:
            raise CheckpointError(f"Checkpoint field {where} has an absurd number of entries.")
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]", tensors=tensors, depth=depth + 1)
        return
    raise CheckpointError(
        f"Checkpoint field {where} holds a {type(obj).__name__}; only plain data is allowed."
    )


def _require(payload: dict, key: str, types: type | tuple, where: str = "") -> Any:
    if key not in payload:
        raise CheckpointError(f"Checkpoint is missing the field {where}{key!r}.")
    value = payload[key]
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise CheckpointError(
            f"Checkpoint field {where}{key!r} should be {names}, not {type(value).__name__}."
        )
    return value


# --------------------------------------------------------------------------------------------- save
def _versions() -> dict[str, str]:
    return {
        "napari_medseg": str(__version__),
        "torch": str(torch.__version__),  # a TorchVersion (str subclass) would not load safely
        "python": platform.python_version(),
    }


def _state_dict_of(model: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"State dict entry {k!r} is a {type(v).__name__}, not a tensor.")
        out[str(k)] = v.detach().cpu()
    return out


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module | dict,
    *,
    model_name: str,
    model_kwargs: dict | None,
    in_channels: int,
    num_classes: int,
    spatial_dims: int,
    plan: Any,
    label_names: dict | None,
    train_config: Any = None,
    epoch: int = 0,
    optimizer: torch.optim.Optimizer | dict | None = None,
    scheduler: Any = None,
    history: list[dict] | None = None,
    extra: dict | None = None,
    orientation: str | None = None,
    domain: dict | None = None,
) -> str:
    """Write a checkpoint atomically (temp file in the same folder, fsync, ``os.replace``).

    Args:
        path: Target file (conventionally ``*.pt``); its folder is created if needed.
        model: The model, or its state dict.
        model_name: Registry name the model was created with.
        model_kwargs: Architecture kwargs it was created with.
        in_channels: Image channels.
        num_classes: Output classes, background included.
        spatial_dims: 2 or 3.
        plan: A ``Plan`` or its ``to_dict()``.
        label_names: Class index -> name.
        train_config: Training config (dataclass or dict), stored as a plain dict.
        epoch: Zero-based index of the last completed epoch (``-1`` when none completed).
        optimizer: Optimizer (or its state dict) to resume training; ``None`` for inference only.
        scheduler: LR scheduler (or its state dict), or ``None``.
        history: Per-epoch metrics (plain dicts).
        extra: Anything else, plain types.
        orientation: Axis codes the model was trained in (e.g. ``"SAR"``), or ``None``.
        domain: The training domain (:mod:`.fields`), or ``None``.

    Returns:
        The path written, as a string.

    Raises:
        CheckpointError: if some field is not plain data, or the file cannot be written.
    """
    path = os.fspath(path)
    opt_state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
    sched_state = scheduler.state_dict() if hasattr(scheduler, "state_dict") else scheduler
    payload = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "model": {
            "name": str(model_name),
            "kwargs": to_plain(model_kwargs or {}, "model_kwargs"),
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "spatial_dims": int(spatial_dims),
        },
        "plan": to_plain(plan if plan is not None else {}, "plan"),
        "label_names": {str(int(k)): str(v) for k, v in (label_names or {}).items()},
        "train_config": to_plain(train_config if train_config is not None else {}, "train_config"),
        "versions": _versions(),
        "epoch": int(epoch),
        "state_dict": _state_dict_of(model),
        "optimizer": opt_state,
        "scheduler": sched_state,
        "history": to_plain(history or [], "history"),
        "extra": to_plain(extra or {}, "extra"),
        "orientation": orientation,
        "domain": to_plain(domain, "domain") if domain is not None else None,
    }
    _validate_payload(payload)  # never write what we would refuse to read
    _atomic_torch_save(payload, path)
    logger.info("Saved checkpoint %s (epoch %d)", path, epoch)
    return path


def _atomic_torch_save(payload: dict, path: str) -> None:
    try:
        with atomic_path(path, make_parents=True) as tmp, open(tmp, "wb") as fh:
            torch.save(payload, fh)
    except Exception as err:  # the previous file, if any, is whole; the temporary one is gone
        raise CheckpointError(f"Could not write checkpoint {path}: {err}") from err


# --------------------------------------------------------------------------------------------- load
def _validate_payload(payload: Any) -> None:
    """Check the structure, types and sizes of a checkpoint dict; raise CheckpointError."""
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"This is not a napari-medseg checkpoint (the file holds a {type(payload).__name__})."
        )
    if payload.get("format") != FORMAT_TAG:
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise CheckpointError(
                "This file is a bare PyTorch state dict, not a napari-medseg checkpoint: it lacks the "
                "model name, preprocessing plan and labels needed to use it."
            )
        raise CheckpointError("This is not a napari-medseg checkpoint (no napari-medseg format tag).")
    version = _require(payload, "format_version", int)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"This checkpoint was made by a newer napari-medseg (format version {version}; this "
            f"version reads up to {FORMAT_VERSION}). Upgrade napari-medseg to use it."
        )
    if version < 1:
        raise CheckpointError(f"Invalid checkpoint format version {version}.")
    model = _require(payload, "model", dict)
    _require(model, "name", str, "model.")
    _check_plain(_require(model, "kwargs", dict, "model."), "model.kwargs")
    for key in ("in_channels", "num_classes"):
        if _require(model, key, int, "model.") < 1:
            raise CheckpointError(f"Checkpoint field model.{key} must be at least 1.")
    if _require(model, "spatial_dims", int, "model.") not in (2, 3):
        raise CheckpointError("Checkpoint field model.spatial_dims must be 2 or 3.")
    for key in ("plan", "train_config", "versions", "extra"):
        _check_plain(_require(payload, key, dict), key)
    labels = _require(payload, "label_names", dict)
    for k, v in labels.items():
        if not isinstance(k, str) or not k.lstrip("-").isdigit() or not isinstance(v, str):
            raise CheckpointError(f"Checkpoint label_names entry {k!r}: {v!r} is not 'index': 'name'.")
    if _require(payload, "epoch", int) < -1:
        raise CheckpointError("Checkpoint field 'epoch' must be -1 (no epoch completed) or more.")
    history = _require(payload, "history", list)
    _check_plain(history, "history")
    if not all(isinstance(h, dict) for h in history):
        raise CheckpointError("Checkpoint field 'history' must be a list of dicts.")
    budget = TensorBudget(MAX_TENSORS, MAX_TOTAL_ELEMENTS)
    state = _require(payload, "state_dict", dict)
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"Checkpoint state_dict entry {k!r} is not a named tensor.")
        budget.add(v, f"state_dict[{k!r}]")
    _check_plain(check_domain_field(payload.get("domain")), "domain")
    check_orientation_field(payload.get("orientation"))
    for key in ("optimizer", "scheduler"):
        value = payload.get(key)
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"Checkpoint field {key!r} should be a dict or None.")
        _check_plain(value, key, tensors=budget)


def _from_payload(payload: dict, path: str | None) -> Checkpoint:
    model = payload["model"]
    return Checkpoint(
        model_name=model["name"],
        model_kwargs=dict(model["kwargs"]),
        in_channels=model["in_channels"],
        num_classes=model["num_classes"],
        spatial_dims=model["spatial_dims"],
        plan=dict(payload["plan"]),
        label_names={int(k): v for k, v in payload["label_names"].items()},
        train_config=dict(payload["train_config"]),
        versions=dict(payload["versions"]),
        epoch=payload["epoch"],
        state_dict=dict(payload["state_dict"]),
        optimizer_state=payload.get("optimizer"),
        scheduler_state=payload.get("scheduler"),
        history=list(payload["history"]),
        extra=dict(payload["extra"]),
        format_version=payload["format_version"],
        path=path,
        orientation=payload.get("orientation"),
        domain=dict(payload["domain"]) if payload.get("domain") is not None else None,
    )


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """Read and validate a checkpoint without unpickling arbitrary objects.

    Args:
        path: The ``.pt`` file.
        map_location: Where tensors are loaded (as in ``torch.load``); default CPU.

    Raises:
        CheckpointError: if the file is missing, damaged, unsafe (contains Python objects other than
            plain data and tensors), not a napari-medseg checkpoint, or from a newer format version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"No checkpoint file at {path}.")
    check_file(path, MAX_FILE_BYTES, MAX_TENSORS)  # size, zip bomb, CRC-32 of every entry
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
        raise CheckpointError(
            f"{path} is not a safe napari-medseg checkpoint: it contains Python objects other than "
            f"plain data and tensors (or is damaged), so it was not loaded. Detail: {first}"
        ) from None
    except Exception as err:  # zip errors, truncation (RuntimeError/EOFError), ...
        raise CheckpointError(
            f"Could not read checkpoint {path}: the file is damaged or truncated, or not a "
            f"checkpoint ({type(err).__name__}: {err})."
        ) from None
    try:
        _validate_payload(payload)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return _from_payload(payload, path)


def as_checkpoint(ckpt: Checkpoint | str | os.PathLike) -> Checkpoint:
    """``ckpt`` itself when loaded already, else :func:`load_checkpoint` of the path."""
    return ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)


__all__ = [
    "FORMAT_VERSION", "Checkpoint", "CheckpointError", "as_checkpoint", "load_checkpoint", "save_checkpoint",
    "to_plain",
]
