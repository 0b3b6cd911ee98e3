"""A training run's settings: :class:`TrainConfig`, its model-recipe defaults, and :class:`TrainingError`.

``TrainConfig`` is the one dataclass the GUI, the CLI and the Python API fill in (DESIGN.md
convention 9); it is stored in plain types in ``run.json`` and in every checkpoint.
Settings that only a trainer variant understands travel in :attr:`TrainConfig.variant_options`
(plain types too); variants name those options with :func:`register_variant_option` so that older
``run.json`` / checkpoint configs, which stored them as top-level keys, still load.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from napari_medseg.errors import MedsegError
from napari_medseg.models import get_model_spec


class TrainingError(MedsegError, ValueError):
    """Training cannot start with these settings or this data."""


#: Option names that variants read from ``TrainConfig.variant_options`` (see register_variant_option).
_VARIANT_OPTIONS: set[str] = set()


def register_variant_option(name: str) -> None:
    """Declare ``name`` a variant's option, read from :attr:`TrainConfig.variant_options`.

    Called by a trainer variant at import time. :meth:`TrainConfig.from_dict` then moves a top-level
    ``name`` key of an older stored config into ``variant_options`` instead of refusing it.

    Args:
        name: The option's key, e.g. the cascade's checkpoint of its previous stage.
    """
    _VARIANT_OPTIONS.add(str(name))


@dataclass
class TrainConfig:
    """Everything that defines a training run; shared by the GUI and the CLI (convention 9).

    ``None`` for ``patch_size``, ``batch_size`` or ``batch_dice`` means "as the plan says"; ``None``
    for ``optimizer``, ``lr``, ``weight_decay``, ``lr_schedule``, ``loss`` or
    ``early_stopping_patience`` means "as the model's default training recipe says"
    (``ModelSpec.training``: nnU-Net's SGD + poly for the U-Nets and RKSeg, Adam 1e-4 with early
    stopping for the SDN networks).

    ``variant_options`` holds settings that only a trainer variant reads, in plain types (e.g. the
    cascade's path of the trained ``3d_lowres`` checkpoint it builds on; each variant's module
    documents its keys).
    """

    output_dir: str = "medseg_run"
    model: str = "unet-3d-fullres"
    model_kwargs: dict = field(default_factory=dict)
    configuration: str | None = None  # None: the model's (unet-2d -> "2d", 3D models -> "3d_fullres")
    epochs: int = 50
    iterations_per_epoch: int = 250
    minutes: float | None = None  # a time budget: stop when spent (or after `epochs`); LR follows the time
    warmup: float | None = None  # share of the run with a linear LR warm-up; None: 0.05 when fine-tuning with a budget
    val_batches: int = 10
    val_fraction: float = 0.2
    optimizer: str | None = None  # "sgd" (nnU-Net) | "adam" | "lookahead_nadam"
    lr: float | None = None
    momentum: float = 0.99
    weight_decay: float | None = None
    lr_schedule: str | None = None  # "poly" | "constant"
    loss: str | None = None  # "dice_ce" | "soft_dice" | "ce"
    early_stopping_patience: int | None = None  # epochs without a lower validation loss
    batch_size: int | None = None
    patch_size: tuple[int, ...] | None = None
    deep_supervision: bool = True
    batch_dice: bool | None = None
    oversample_foreground: float = 0.33
    augment: bool | str = True  # True: nnU-Net's augmentation; False: none; "synth": + domain randomisation
    mirror_axes: tuple[int, ...] | None = None  # patch axes mirrored in training and TTA; None: all
    ignore_label: int | None = None
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    init_checkpoint: str | None = None
    resume: str | None = None
    label_names: dict | None = None
    variant_options: dict = field(default_factory=dict)  # read by trainer variants (plain types)
    grad_clip: float = 12.0
    num_threads: int | None = None
    overwrite: bool = False  # replace an existing run's checkpoints (else refused; resume continues one)
    rank_report_dir: str | None = None  # distributed runs: each process writes rank{R}.json there

    def check(self) -> TrainConfig:
        """Refuse values no run can use, naming the setting (and its CLI flag); return ``self``.

        Called where a config is resolved (:func:`resolve_recipe`, at the start of every run) and by
        :meth:`from_dict`, so a bad value stops the run before anything is read or written.

        Raises:
            TrainingError: e.g. ``epochs`` of ``-3``, ``iterations_per_epoch`` of ``0``,
                ``val_fraction`` of ``2``, ``epochs`` of ``"abc"``, a patch size of ``0``.
        """
        for name, kind, low, high in _CHECKS:
            _check_value(name, getattr(self, name), kind, low, high)
        if self.patch_size is not None:
            patch = self.patch_size
            if not isinstance(patch, (list, tuple)) or len(patch) not in (2, 3) or not all(
                    _is_int(v) and v >= 1 for v in patch):
                raise TrainingError(f"{_name('patch_size')} must be 2 or 3 positive integers, got {patch!r}.")
        if self.mirror_axes is not None and (not isinstance(self.mirror_axes, (list, tuple)) or not all(
                _is_int(v) and 0 <= v <= 2 for v in self.mirror_axes)):
            raise TrainingError(f"{_name('mirror_axes')} must be patch axes 0-2, got {self.mirror_axes!r}.")
        if not (isinstance(self.augment, bool) or self.augment == "synth"):
            raise TrainingError(f"{_name('augment')} must be true, false or 'synth', got {self.augment!r}.")
        for name in ("model_kwargs", "variant_options"):
            if not isinstance(getattr(self, name), dict):
                raise TrainingError(f"{_name(name)} must be a JSON object (dict), got {getattr(self, name)!r}.")
        if self.label_names is not None and not isinstance(self.label_names, dict):
            raise TrainingError(f"{_name('label_names')} must be a mapping of value to name, got {self.label_names!r}.")
        return self

    def to_dict(self) -> dict:
        """The settings in plain types (tuples as lists), as stored in ``run.json`` and checkpoints."""
        d = asdict(self)
        for key in ("patch_size", "mirror_axes"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild a config from :meth:`to_dict`'s output (also of older versions of the package).

        A top-level key that a variant registered (:func:`register_variant_option`) moves into
        ``variant_options``.

        Raises:
            TrainingError: ``d`` has keys that are neither settings nor registered variant options.
        """
        known = {f.name for f in fields(cls)}
        d = dict(d)
        options = dict(d.get("variant_options") or {})
        for key in sorted((set(d) - known) & _VARIANT_OPTIONS):
            value = d.pop(key)
            if value is not None:
                options.setdefault(key, value)
        unknown = set(d) - known
        if unknown:
            raise TrainingError(f"Unknown training settings {sorted(unknown)}; known: {sorted(known)}")
        d["variant_options"] = options
        for key in ("patch_size", "mirror_axes"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d).check()


#: ``(setting, kind, lowest, highest)``; kind "int", "float" or "str", with "?" when ``None`` is allowed.
_CHECKS = (
    ("epochs", "int", 1, None), ("iterations_per_epoch", "int", 1, None), ("val_batches", "int", 0, None),
    ("val_fraction", "float", 0.0, 0.999), ("minutes", "float?", 1e-6, None), ("warmup", "float?", 0.0, 0.999),
    ("lr", "float?", 0.0, None), ("momentum", "float", 0.0, 1.0), ("weight_decay", "float?", 0.0, None),
    ("early_stopping_patience", "int?", 0, None), ("batch_size", "int?", 1, None),  # 0: never stop early
    ("oversample_foreground", "float", 0.0, 1.0), ("ignore_label", "int?", None, None), ("seed", "int", 0, None),
    ("grad_clip", "float", 0.0, None), ("num_threads", "int?", 1, None), ("output_dir", "path", None, None),
    ("model", "str", None, None), ("configuration", "str?", None, None),
    ("optimizer", "str?", None, None), ("lr_schedule", "str?", None, None), ("loss", "str?", None, None),
    ("deep_supervision", "bool", None, None), ("amp", "bool", None, None), ("overwrite", "bool", None, None),
    ("batch_dice", "bool?", None, None),
)
#: The CLI flag of a setting, where it is not ``--`` + the name with dashes.
_FLAGS = {"iterations_per_epoch": "--iterations", "early_stopping_patience": "--early-stopping",
          "num_threads": "--threads", "output_dir": "-o/--output", "model": "-m/--model"}


def _name(setting: str) -> str:
    return f"{setting} ({_FLAGS.get(setting, '--' + setting.replace('_', '-'))})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(name: str, value: Any, kind: str, low: float | None, high: float | None) -> None:
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    ok = {"int": _is_int(value), "bool": isinstance(value, bool), "str": isinstance(value, str) and bool(value),
          "path": isinstance(value, (str, os.PathLike)) and bool(os.fspath(value)),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}[kind]
    word = {"int": "an integer", "float": "a finite number", "str": "a non-empty text", "bool": "true or false",
            "path": "a folder name"}[kind]
    if ok and low is not None and value < low:
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        bounds = (f" from {low} to {high}" if high is not None else f" of at least {low}") if low is not None else ""
        raise TrainingError(f"Training setting {_name(name)} must be {word}{bounds}, got {value!r}.")


RUN_FILES = ("run.json", "checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt")


def check_run_folder(config: TrainConfig) -> None:
    """Refuse to start in a folder that holds another run, unless resuming or overwriting it."""
    if config.resume or config.overwrite or not os.path.isdir(config.output_dir):
        return
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(config.output_dir, f))]
    if found:
        raise TrainingError(
            f"{config.output_dir} already holds a run ({', '.join(found)}): training there would replace "
            "its checkpoints. Choose another output folder, continue it with --resume "
            f"{os.path.join(config.output_dir, 'checkpoint_latest.pt')}, or pass --overwrite (overwrite=True)."
        )


_RECIPE_DEFAULTS = {
    "optimizer": "sgd", "lr": 1e-2, "weight_decay": 3e-5, "lr_schedule": "poly", "loss": "dice_ce",
    "early_stopping_patience": None,
}


#: A time-budgeted run's optimiser when the user names none: minutes, not days, to converge. On the
#: TotalSegmentator example CT painted on 5 slices, 400 iterations of a 2D U-Net: nnU-Net's SGD 1e-2
#: (momentum 0.99) learnt the liver only (mean Dice on unpainted slices 0.19); Adam 1e-3 learnt all
#: four organs (0.74) (``benchmarks/bench_finetune.py``; issue 14's note has the table).
BUDGET_RECIPE = {"optimizer": "adam", "lr": 1e-3}


def resolve_recipe(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` whose unset (``None``) optimisation settings come from the model's recipe.

    A time-budgeted run (``minutes``) without an optimiser of its own takes :data:`BUDGET_RECIPE`
    (Adam 1e-3) instead of the recipe's (nnU-Net's SGD needs thousands of iterations).
    Also fills in the model's planner configuration when ``config.configuration`` is ``None``.
    Returns ``config`` itself when nothing was unset.

    Raises:
        TrainingError: a setting no run can use (:meth:`TrainConfig.check`).
    """
    config.check()
    spec = get_model_spec(config.model)
    recipe = spec.training
    values: dict[str, Any] = {}
    if config.configuration is None:
        values["configuration"] = spec.configuration or ("2d" if spec.spatial_dims[0] == 2 else "3d_fullres")
    budget = config.minutes is not None and config.optimizer is None
    for key, default in _RECIPE_DEFAULTS.items():
        if getattr(config, key) is not None:
            continue
        if budget and key in BUDGET_RECIPE:
            values[key] = BUDGET_RECIPE[key]
            continue
        if key == "early_stopping_patience":
            values[key] = recipe.get("early_stopping_patience") if recipe.get("early_stopping") else None
        else:
            values[key] = recipe.get(key, default)
    return replace(config, **values) if values else config


__all__ = ["BUDGET_RECIPE", "RUN_FILES", "TrainConfig", "TrainingError", "check_run_folder", "register_variant_option", "resolve_recipe"]
