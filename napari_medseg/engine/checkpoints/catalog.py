"""The checkpoint catalogue: shipped checkpoints, user checkpoints and what they segment.

Three sources, listed in this order by :func:`list_checkpoints`:

1. **Shipped** checkpoints: ``*.pt`` files in the package folder ``napari_medseg/checkpoints/``.
   Its ``catalog.json`` maps a file name to ``description``, ``training_data``, ``license``,
   ``dice`` (class name -> Dice) and optionally a display ``name``.
2. **User** checkpoints: every checkpoint recorded with :func:`register_checkpoint` (an index file,
   ``index.json``, in :func:`user_checkpoint_dir`) plus any ``*.pt`` dropped into that folder.
3. ``extra_dirs`` given by the caller.

Only metadata is read (``engine.checkpoint.checkpoint_summary``, which loads with
``weights_only=True``); results are cached per file, size and modification time. No Qt, no napari.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_medseg.engine.checkpoints.build import checkpoint_summary
from napari_medseg.engine.checkpoints.fields import LARGEST_COMPONENT
from napari_medseg.engine.checkpoints.format import CheckpointError
from napari_medseg.io.atomic import atomic_write_json

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "checkpoints"
CATALOG_FILE = "catalog.json"
INDEX_FILE = "index.json"
_INFO_KEYS = ("name", "description", "training_data", "license", "dice")


@dataclass
class CheckpointInfo:
    """What the widgets and the CLI show about one checkpoint (no weights).

    Attributes:
        name: Display name.
        path: Absolute path of the ``.pt`` file.
        model_name: Registry name of the architecture.
        spatial_dims: 2 or 3.
        in_channels: Image channels the model takes.
        num_classes: Classes, background included.
        label_names: Class index -> name.
        description: What it segments, in a sentence.
        training_data: Where the training data came from.
        license: Licence of the weights (and the data they were trained on).
        dice: Measured Dice per class name, or ``None`` when not measured.
        shipped: Whether it ships inside the package.
        configuration: Planner configuration (``"3d_fullres"``, ...), when known.
        epoch: Epochs trained.
        registered_at: Unix time it was registered (user checkpoints), else ``None``.
        model_kwargs: Architecture kwargs stored in the checkpoint.
        largest_component: Whether the checkpoint recommends keeping the largest component of each
            class (``extra["largest_component"]``; prediction does so unless told otherwise).
    """

    name: str
    path: str
    model_name: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    label_names: dict[int, str]
    description: str = ""
    training_data: str = ""
    license: str = ""
    dice: dict[str, float] | None = None
    shipped: bool = False
    configuration: str | None = None
    epoch: int = 0
    registered_at: float | None = None
    model_kwargs: dict = field(default_factory=dict)
    largest_component: bool = False

    @property
    def foreground_names(self) -> list[str]:
        """Names of the classes other than background."""
        return [v for k, v in sorted(self.label_names.items()) if k != 0]

    def to_dict(self) -> dict:
        return asdict(self)


def medseg_home() -> Path:
    """The user folder of napari-medseg: ``$MEDSEG_HOME`` or ``~/.napari-medseg``."""
    env = os.environ.get("MEDSEG_HOME")
    return Path(env).expanduser() if env else Path.home() / ".napari-medseg"


def user_checkpoint_dir() -> Path:
    """Folder of the user's checkpoint index (``<medseg_home>/checkpoints``); not created here."""
    return medseg_home() / "checkpoints"


# ------------------------------------------------------------------------------------- file helpers
def read_json_dict(path: Path) -> dict:
    """The JSON object in ``path``; ``{}`` (with a warning) when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.warning("Ignoring unreadable catalogue file %s: %s", path, err)
        return {}
    if not isinstance(data, dict):
        logger.warning("Ignoring catalogue file %s: it does not hold a JSON object.", path)
        return {}
    return data


def write_json_dict(path: Path, data: dict) -> None:
    atomic_write_json(path, dict(sorted(data.items())), make_parents=True)


_SUMMARY_CACHE: dict[str, tuple[tuple[int, int], dict]] = {}


def _summary(path: str) -> dict:
    """``checkpoint_summary`` cached on (size, mtime)."""
    st = os.stat(path)
    key = (st.st_size, st.st_mtime_ns)
    hit = _SUMMARY_CACHE.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    summary = checkpoint_summary(path)
    _SUMMARY_CACHE[path] = (key, summary)
    return summary


def _clean_dice(dice: Any) -> dict[str, float] | None:
    """Finite Dice values by class name: a class absent from the validation data has NaN, which
    says nothing and which JSON cannot hold (it made a fine-tuned checkpoint unregistrable)."""
    if not isinstance(dice, dict) or not dice:
        return None
    out = {}
    for k, v in dice.items():
        try:
            value = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out[str(k)] = value
    return out or None


def _info_from(path: str, meta: dict, *, shipped: bool) -> CheckpointInfo | None:
    try:
        s = _summary(path)
    except (OSError, CheckpointError) as err:
        logger.warning("Skipping checkpoint %s: %s", path, err)
        return None
    stem = Path(path).stem
    default_name = stem if shipped else f"{Path(path).parent.name}/{stem}"
    return CheckpointInfo(
        name=str(meta.get("name") or default_name),
        path=path,
        model_name=s["model_name"],
        spatial_dims=int(s["spatial_dims"]),
        in_channels=int(s["in_channels"]),
        num_classes=int(s["num_classes"]),
        label_names={int(k): str(v) for k, v in s["label_names"].items()},
        description=str(meta.get("description") or ""),
        training_data=str(meta.get("training_data") or ""),
        license=str(meta.get("license") or ""),
        dice=_clean_dice(meta.get("dice")),
        shipped=shipped,
        configuration=s.get("configuration"),
        epoch=int(s.get("epoch") or 0),
        registered_at=meta.get("registered_at"),
        model_kwargs=dict(s.get("model_kwargs") or {}),
        largest_component=bool((s.get("extra") or {}).get(LARGEST_COMPONENT, False)),
    )


def _pt_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(str(p.resolve()) for p in folder.glob("*.pt") if p.is_file())


# ------------------------------------------------------------------------------------------- public
def list_checkpoints(extra_dirs: Iterable[str | os.PathLike] = ()) -> list[CheckpointInfo]:
    """All known checkpoints: shipped first, then registered/user ones (newest first), then extras.

    Unreadable or missing files are skipped with a warning; each file appears once.
    """
    seen: set[str] = set()
    out: list[CheckpointInfo] = []

    def add(path: str, meta: dict, shipped: bool) -> CheckpointInfo | None:
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            return None
        info = _info_from(real, meta, shipped=shipped)
        if info is not None:
            seen.add(real)
        return info

    catalog = read_json_dict(SHIPPED_DIR / CATALOG_FILE)
    for path in _pt_files(SHIPPED_DIR):
        meta = catalog.get(os.path.basename(path))
        info = add(path, meta if isinstance(meta, dict) else {}, True)
        if info:
            out.append(info)

    user = []
    index = read_json_dict(user_checkpoint_dir() / INDEX_FILE)
    for path, meta in index.items():
        info = add(path, meta if isinstance(meta, dict) else {}, False)
        if info:
            user.append(info)
    for path in _pt_files(user_checkpoint_dir()):
        info = add(path, {}, False)
        if info:
            info.registered_at = os.path.getmtime(path)
            user.append(info)
    user.sort(key=lambda i: -(i.registered_at or 0.0))
    out += user

    for folder in extra_dirs:
        for path in _pt_files(Path(folder).expanduser()):
            info = add(path, {}, False)
            if info:
                out.append(info)
    return out


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Catalogue entry of one file (a catalogue's metadata when it is listed there).

    Raises:
        CheckpointError: if the file is missing or not a readable checkpoint.
    """
    real = os.path.realpath(os.fspath(path))
    if not os.path.isfile(real):
        raise CheckpointError(f"No checkpoint file at {path}.")
    for info in list_checkpoints():
        if info.path == real:
            return info
    _summary(real)  # raises CheckpointError with the reason
    info = _info_from(real, {}, shipped=False)
    if info is None:  # pragma: no cover - _summary above raised already
        raise CheckpointError(f"Cannot read {path}.")
    return info


def register_checkpoint(path: str | os.PathLike, **info: Any) -> CheckpointInfo:
    """Record a checkpoint in the user index so that it appears in the widgets' lists.

    Args:
        path: The ``.pt`` file (it stays where it is; the index stores its absolute path).
        **info: Any of ``name``, ``description``, ``training_data``, ``license``, ``dice``.

    Returns:
        Its :class:`CheckpointInfo`.

    Raises:
        CheckpointError: if the file is not a readable checkpoint.
        TypeError: for an unknown keyword.
    """
    unknown = sorted(set(info) - set(_INFO_KEYS))
    if unknown:
        raise TypeError(f"register_checkpoint got unknown field(s) {unknown}; known: {list(_INFO_KEYS)}.")
    real = os.path.realpath(os.fspath(path))
    if not os.path.isfile(real):
        raise CheckpointError(f"No checkpoint file at {path}.")
    _summary(real)  # refuse what cannot be read
    meta = {k: v for k, v in info.items() if v not in (None, "")}
    if "dice" in meta:
        meta["dice"] = _clean_dice(meta["dice"])
    meta["registered_at"] = time.time()
    index_path = user_checkpoint_dir() / INDEX_FILE
    index = read_json_dict(index_path)
    index[real] = meta
    write_json_dict(index_path, index)
    logger.info("Registered checkpoint %s in %s", real, index_path)
    entry = _info_from(real, meta, shipped=False)
    assert entry is not None
    return entry


def unregister_checkpoint(path: str | os.PathLike) -> bool:
    """Remove a checkpoint from the user index (the file is kept). Returns whether it was listed."""
    real = os.path.realpath(os.fspath(path))
    index_path = user_checkpoint_dir() / INDEX_FILE
    index = read_json_dict(index_path)
    if real not in index:
        return False
    del index[real]
    write_json_dict(index_path, index)
    return True


__all__ = [
    "read_json_dict",
    "write_json_dict",
    "CheckpointInfo",
    "checkpoint_info",
    "list_checkpoints",
    "medseg_home",
    "register_checkpoint",
    "unregister_checkpoint",
    "user_checkpoint_dir",
]
