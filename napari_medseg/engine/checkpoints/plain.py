"""Plain data: what a checkpoint may hold besides tensors (dict, list, str, int, float, bool, None)."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import PurePath
from typing import Any

import torch

from napari_medseg.errors import MedsegError

#: Refuse metadata nested deeper than this.
MAX_DEPTH = 32


class CheckpointError(MedsegError, ValueError):
    """A checkpoint cannot be written, read, trusted or used with this model or image."""



def to_plain(obj: Any, where: str = "value", _depth: int = 0) -> Any:
    """Convert ``obj`` to plain types: objects with a ``to_dict()`` (plans, configs) through it, other
    dataclasses and mappings to dicts, tuples to lists.

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
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and callable(getattr(obj, "to_dict", None)):
        obj = obj.to_dict()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
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



__all__ = ["MAX_DEPTH", "CheckpointError", "to_plain"]
