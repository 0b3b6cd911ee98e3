"""Safe, self-describing checkpoints (DESIGN.md convention 5).

A checkpoint is one ``torch.save`` file holding a dict of plain types (dict, list, str, int, float,
bool, None) and tensors: the model's registry name and kwargs, the preprocessing plan, the label
names, the training config, the package versions and the weights. Everything needed to rebuild the
model and to preprocess an image the way it was trained is in the file; nothing names a Python class.

Loading uses ``torch.load(weights_only=True)`` only, so a file cannot run code when opened, and every
field is validated before use. Writing goes to a temporary file in the target folder, is flushed and
fsynced, then atomically renamed over the target: a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import platform
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePath
from typing import Any

import torch

from napari_medseg.engine.devices import resolve_device

logger = logging.getLogger(__name__)

FORMAT_TAG = "napari-medseg-checkpoint"
FORMAT_VERSION = 1
#: Refuse checkpoints with more tensors than this (model + optimizer state).
MAX_TENSORS = 50_000
#: Refuse checkpoints whose tensors hold more elements than this in total (about 16 GB of float32).
MAX_TOTAL_ELEMENTS = 4_000_000_000
#: Refuse checkpoint files larger than this many bytes (64 GiB) before reading them.
MAX_FILE_BYTES = 64 * 2**30
#: Refuse metadata nested deeper than this.
MAX_DEPTH = 32

_PLAIN_SCALARS = (str, int, float, bool, type(None))  # exact types: subclasses would not load
_PLAIN_MAPPINGS = (dict, OrderedDict)


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read, trusted or used with this model or image."""


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


# --------------------------------------------------------------------------------------- plain data
def to_plain(obj: Any, where: str = "value", _depth: int = 0) -> Any:
    """Convert ``obj`` to plain types: dataclasses and mappings to dicts, tuples to lists.

    numpy scalars/arrays become Python numbers/lists; paths, devices and dtypes become strings;
    enums their values. Anything else raises.

    Raises:
        CheckpointError: if ``obj`` holds something that has no plain representation.
    """
    if _depth > MAX_DEPTH:
        raise CheckpointError(f"{where} is nested too deeply to store in a checkpoint.")
    if obj is None or isinstance(obj, bool):
        return None if obj is None else bool(obj)
    if isinstance(obj, str):  # also str subclasses such as torch's TorchVersion
        return str(obj)
    if isinstance(obj, int):  # also IntEnum
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict") and callable(obj.to_dict) and not isinstance(obj, dict):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CheckpointError(f"{where} has a key {k!r} that is not a string or integer.")
            out[k] = to_plain(v, f"{where}[{k!r}]", _depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]", _depth + 1) for i, v in enumerate(obj)]
    if isinstance(obj, (PurePath, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, Enum):
        return to_plain(obj.value, where, _depth + 1)
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0:
        return to_plain(obj.item(), where, _depth)  # numpy / torch scalar
    if hasattr(obj, "tolist") and hasattr(obj, "dtype") and not isinstance(obj, torch.Tensor):
        return to_plain(obj.tolist(), where, _depth)  # numpy array
    raise CheckpointError(
        f"{where} is a {type(obj).__name__}, which cannot be stored in a checkpoint "
        "(only dict, list, str, int, float, bool and None)."
    )


class _Budget:
    """Counts tensors and elements while validating, refusing absurd sizes."""

    def __init__(self) -> None:
        self.tensors = 0
        self.elements = 0

    def add(self, t: torch.Tensor, where: str) -> None:
        self.tensors += 1
        self.elements += t.numel()
        if self.tensors > MAX_TENSORS:
            raise CheckpointError(f"Refusing checkpoint: more than {MAX_TENSORS} tensors ({where}).")
        if self.elements > MAX_TOTAL_ELEMENTS:
            raise CheckpointError(
                f"Refusing checkpoint: its tensors hold more than {MAX_TOTAL_ELEMENTS} elements."
            )


def _check_plain(
    obj: Any, where: str, *, tensors: _Budget | None = None, depth: int = 0
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
    from napari_medseg import __version__

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
    }
    _validate_payload(payload)  # never write what we would refuse to read
    _atomic_torch_save(payload, path)
    logger.info("Saved checkpoint %s (epoch %d)", path, epoch)
    return path


def _test_delay() -> None:
    """Sleep ``MEDSEG_TEST_SAVE_DELAY`` seconds between writing and renaming (tests widen the
    window in which a killed process leaves only the temporary file)."""
    delay = os.environ.get("MEDSEG_TEST_SAVE_DELAY")
    if delay:
        import time

        time.sleep(float(delay))


def _atomic_torch_save(payload: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _test_delay()
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, Exception):
            raise CheckpointError(f"Could not write checkpoint {path}: {err}") from err
        raise
    try:  # make the rename itself durable (POSIX); best effort elsewhere
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


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
    budget = _Budget()
    state = _require(payload, "state_dict", dict)
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"Checkpoint state_dict entry {k!r} is not a named tensor.")
        budget.add(v, f"state_dict[{k!r}]")
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
    )


def _precheck_file(path: str) -> None:
    """Refuse files that are empty, absurdly large, or zip archives that would inflate far beyond
    their size on disk (a zip bomb), before ``torch.load`` reads anything."""
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint. Was the copy interrupted?")
    if size > MAX_FILE_BYTES:
        raise CheckpointError(
            f"Refusing {path}: {size} bytes is more than the {MAX_FILE_BYTES} a checkpoint may have."
        )
    if not zipfile.is_zipfile(path):
        return  # legacy (non-zip) torch format: weights_only still applies
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"Could not read checkpoint {path}: damaged archive ({err}).") from None
    if len(infos) > 2 * MAX_TENSORS + 100:
        raise CheckpointError(f"Refusing {path}: its archive has {len(infos)} entries (at most {2 * MAX_TENSORS + 100}).")
    unpacked = sum(max(i.file_size, 0) for i in infos)
    if unpacked > 4 * size + 2**20:
        raise CheckpointError(
            f"Refusing {path}: its archive would unpack to {unpacked} bytes from {size} on disk; torch "
            "checkpoints are stored uncompressed, so this file is damaged or crafted."
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
    _precheck_file(path)
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


def _as_checkpoint(ckpt: Checkpoint | str | os.PathLike) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)


# -------------------------------------------------------------------------------------------- use
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
    from napari_medseg.models import ModelError, create_model

    ckpt = _as_checkpoint(ckpt)
    kwargs = {**ckpt.model_kwargs, **override_kwargs}
    # The weights come from the checkpoint: initialisers that fetch other weights (timm's
    # pretrained ones, a 2D state dict to inflate) would only be overwritten, and may not exist here.
    for key, neutral in _WEIGHT_INITIALISERS.items():
        if key in kwargs and key not in override_kwargs:
            kwargs[key] = neutral
    try:
        model = create_model(
            ckpt.model_name, ckpt.in_channels, ckpt.num_classes, ckpt.spatial_dims, **kwargs
        )
    except (ModelError, TypeError) as err:
        raise CheckpointError(
            f"Cannot build the model {ckpt.model_name!r} this checkpoint names: {err}"
        ) from err
    device = resolve_device(device)
    problem = _describe_mismatch(ckpt, model)
    if problem:
        where = f"Checkpoint {ckpt.path}" if ckpt.path else "The checkpoint"
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
    theirs = ckpt if isinstance(ckpt, dict) else _as_checkpoint(ckpt).state_dict
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
    ckpt = _as_checkpoint(path_or_ckpt)
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
    }


__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "build_model",
    "check_compatible",
    "checkpoint_summary",
    "load_checkpoint",
    "load_weights_for_finetune",
    "save_checkpoint",
    "to_plain",
]
