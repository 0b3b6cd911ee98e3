"""Training as a generator: nnU-Net (v1) style SGD/poly training behind a few overridable hooks.

``train(config, data)`` yields :class:`~napari_medseg.engine.events.Progress` per iteration and
:class:`~napari_medseg.engine.events.EpochEnd` per epoch, and returns the path of the final
checkpoint. Closing the generator (the widget's Stop, Ctrl-C in the CLI) stops within one iteration
and saves a resumable checkpoint first (DESIGN.md conventions 2 and 8).

The loop follows Isensee et al., "nnU-Net", Nature Methods 18, 2021: SGD with Nesterov momentum
0.99, poly learning-rate decay (exponent 0.9), Dice + CE, deep supervision, 33 % foreground
oversampling, gradient clipping at 12, online "pseudo Dice" on validation patches.

Under ``torchrun --nproc_per_node=N`` (see :mod:`~napari_medseg.engine.distributed`) the model is
wrapped in ``DistributedDataParallel``: each rank samples its own patches (seed + rank) with the
plan's batch size (global batch N x batch size), validation is pooled over ranks, and only rank 0
writes ``run.json`` and checkpoints (of the bare network, as in a single process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from .. import __version__
from . import distributed as ddp
from .checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_weights_for_finetune,
    save_checkpoint,
    to_plain,
)
from .devices import resolve_device
from .events import EpochEnd, Message, Progress
from .oom import (
    InsufficientMemoryError,
    halve_batch_and_patch,
    is_oom_error,
    pooling_divisors,
    release_memory,
)
from .planning import Plan

logger = logging.getLogger(__name__)


class TrainingError(ValueError):
    """Training cannot start with these settings or this data."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; shared by the GUI and the CLI (convention 9).

    ``None`` for ``patch_size``, ``batch_size`` or ``batch_dice`` means "as the plan says"; ``None``
    for ``optimizer``, ``lr``, ``weight_decay``, ``lr_schedule``, ``loss`` or
    ``early_stopping_patience`` means "as the model's default training recipe says"
    (``ModelSpec.training``: nnU-Net's SGD + poly for the U-Nets and RKSeg, Adam 1e-4 with early
    stopping for the SDN networks).
    """

    output_dir: str = "medseg_run"
    model: str = "unet-3d-fullres"
    model_kwargs: dict = field(default_factory=dict)
    configuration: str | None = None  # None: the model's (unet-2d -> "2d", 3D models -> "3d_fullres")
    epochs: int = 50
    iterations_per_epoch: int = 250
    val_batches: int = 10
    val_fraction: float = 0.2
    optimizer: str | None = None  # "sgd" (nnU-Net) | "adam"
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
    augment: bool = True
    mirror_axes: tuple[int, ...] | None = None  # patch axes mirrored in training and TTA; None: all
    ignore_label: int | None = None
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    init_checkpoint: str | None = None
    resume: str | None = None
    label_names: dict | None = None
    previous_stage: str | None = None  # the 3d_lowres checkpoint a cascade builds on
    grad_clip: float = 12.0
    num_threads: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("patch_size", "mirror_axes"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TrainingError(f"Unknown training settings {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key in ("patch_size", "mirror_axes"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


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


def _source_checkpoint(config: TrainConfig, loaded: Checkpoint | None = None) -> Checkpoint | None:
    """The checkpoint a run resumes or fine-tunes from (``loaded`` when it is that one), else None."""
    path = config.resume or config.init_checkpoint
    if not path:
        return None
    if loaded is not None and loaded.path and os.path.realpath(loaded.path) == os.path.realpath(path):
        return loaded
    return load_checkpoint(path, map_location="cpu")


def _architecture_kwargs(
    model_name: str, plan: Plan, config: TrainConfig, source: Checkpoint | None = None
) -> dict:
    """Kwargs for ``create_model``: the plan's kernels where the model takes them, then the user's.

    ``source`` is the resume / fine-tune checkpoint when the caller has it loaded already.
    """
    from ..models import accepted_kwargs, get_model_spec

    spec = get_model_spec(model_name)
    accepted = set(accepted_kwargs(model_name))
    kwargs: dict[str, Any] = {}
    ckpt = _source_checkpoint(config, source)
    if ckpt is not None:
        # Resuming or fine-tuning keeps the checkpoint's architecture; the user's kwargs still win.
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


def prepare_data(config: TrainConfig, data: Any) -> Generator[Progress, None, TrainingData]:
    """Turn a dataset folder, a ``RawDataset`` or in-memory arrays into preprocessed cases.

    Args:
        config: The run's settings.
        data: A path to an nnU-Net raw dataset, a ``RawDataset``, or a list of
            ``(image, label, spacing)`` tuples (image ``(z, y, x)`` or ``(C, z, y, x)``).

    The plan comes from, in this order: the resumed checkpoint, the fine-tuning checkpoint (so that
    preprocessing matches the weights), or the automatic planner on this data's fingerprint.
    """
    config = resolve_recipe(config)
    from .data import RawDataset, case_from_arrays, load_case, load_raw_dataset, read_raw_case
    from .planning import compute_fingerprint, plan_from_fingerprint

    if isinstance(data, (str, os.PathLike)):
        data = load_raw_dataset(os.fspath(data))
    if isinstance(data, RawDataset):
        label_names = {int(k): v for k, v in data.labels.items()}
        raw_cases = list(data.cases)
        loader = "raw"
        num_channels = data.num_channels
        modality = tuple(data.modality)
    else:
        arrays = [_as_case_arrays(item) for item in data]
        if not arrays:
            raise TrainingError("No training cases were given.")
        num_channels = arrays[0][0].shape[0]
        if any(a[0].shape[0] != num_channels for a in arrays):
            raise TrainingError("All training images must have the same number of channels.")
        label_names = dict(config.label_names or {})
        loader = "arrays"
        modality = ("MRI",) * num_channels
    if config.label_names:
        label_names = {int(k): v for k, v in config.label_names.items()}

    source = _source_checkpoint(config)
    plan = Plan.from_dict(source.plan) if source is not None else None
    fingerprint: dict = {}
    if plan is None:
        yield Progress("plan", 0, 1, "computing the dataset fingerprint")
        if loader == "raw":
            fingerprint = compute_fingerprint(
                (img, sp, lab) for img, sp, lab in map(read_raw_case, raw_cases)
            )
        else:
            fingerprint = compute_fingerprint((img, sp, lab) for img, lab, sp in arrays)
        num_classes = int(fingerprint.get("num_classes") or 2)
        if config.ignore_label is not None and config.ignore_label == num_classes - 1:
            num_classes -= 1  # the ignore label is not a class (partially annotated data)
        num_classes = max(num_classes, max(label_names, default=0) + 1, 2)
        plans = plan_from_fingerprint(fingerprint, modality=modality, num_classes=num_classes)
        if config.configuration == "3d_cascade_fullres" and config.configuration not in plans and "3d_fullres" in plans:
            # Small data gets no low-res stage from the planner; a user who asks for the cascade
            # anyway (with a previous stage) gets it on the full-res plan.
            plans[config.configuration] = replace(
                plans["3d_fullres"], configuration="3d_cascade_fullres", previous_stage="3d_lowres"
            )
            yield Message("The planner made no low-res stage for this data; the cascade uses the 3d_fullres plan.")
        if config.configuration not in plans:
            raise TrainingError(
                f"Configuration {config.configuration!r} does not apply to this data; "
                f"the planner made {sorted(plans)}."
            )
        plan = plans[config.configuration]
        yield Progress("plan", 1, 1, f"planned {config.configuration}")
    if not label_names:
        label_names = {0: "background", **{c: f"class_{c}" for c in range(1, plan.num_classes)}}
    plan.num_classes = max(plan.num_classes, len(label_names))
    if config.patch_size is not None:
        if len(config.patch_size) != len(plan.patch_size):
            raise TrainingError(
                f"patch_size {tuple(config.patch_size)} has {len(config.patch_size)} axes; this "
                f"configuration needs {len(plan.patch_size)}."
            )
        patch = tuple(int(p) for p in config.patch_size)
        if patch != tuple(plan.patch_size) and not (config.resume or config.init_checkpoint):
            # As nnU-Net: the pooling and kernels follow the patch (a checkpoint's stay fixed).
            from .planning import get_pool_and_conv_props

            _, pools, convs, padded, _ = get_pool_and_conv_props(plan.spacing[-len(patch):], patch)
            if tuple(padded) != patch:
                raise TrainingError(
                    f"patch_size {patch} does not fit the network's pooling; use {tuple(padded)} "
                    "(each axis a multiple of 2 to the number of poolings along it)."
                )
            plan.pool_kernels, plan.conv_kernels = pools, convs
        plan.patch_size = patch
    if config.batch_size is not None:
        plan.batch_size = int(config.batch_size)

    cases = []
    n = len(raw_cases) if loader == "raw" else len(arrays)
    previous = None
    if plan.previous_stage:
        if not config.previous_stage:
            raise TrainingError(
                "This is a cascade stage: give the trained 3d_lowres checkpoint as previous_stage "
                "(--previous-stage)."
            )
        previous = load_checkpoint(config.previous_stage)
    for i in range(n):
        if previous is not None:
            from .cascade import previous_stage_labels
            from .preprocessing import preprocess_case

            if loader == "raw":
                img, sp, lab = read_raw_case(raw_cases[i])
                name = raw_cases[i].name
            else:
                (img, lab, sp), name = arrays[i], f"case_{i}"
            prev = yield from previous_stage_labels(img, sp, previous, device=config.device, mirror=False)
            case = case_from_arrays(img, lab, sp, plan, name=name)
            _, prev_grid, _ = preprocess_case(img, sp, plan, label=prev)
            # The previous stage's labels ride along as an extra image channel, so that patches and
            # spatial augmentation treat them like the image; the trainer one-hot encodes them.
            case.image = np.concatenate([case.image, prev_grid[None].astype(np.float32)])
            cases.append(case)
        elif loader == "raw":
            cases.append(load_case(raw_cases[i], plan))
        else:
            img, lab, sp = arrays[i]
            cases.append(case_from_arrays(img, lab, sp, plan, name=f"case_{i}"))
        yield Progress("preprocess", i + 1, n, cases[-1].name)
    _check_labels(cases, label_names, config.ignore_label, need_foreground=not config.init_checkpoint)

    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(cases))
    n_val = int(round(config.val_fraction * len(cases))) if len(cases) > 1 else 0
    n_val = min(max(n_val, 1 if len(cases) > 1 and config.val_fraction > 0 else 0), len(cases) - 1)
    val_idx, train_idx = set(order[:n_val].tolist()), order[n_val:].tolist()
    train_cases = [cases[i] for i in train_idx]
    val_cases = [cases[i] for i in sorted(val_idx)] or train_cases
    return TrainingData(
        train_cases, val_cases, plan, label_names, fingerprint, val_is_train=not val_idx, source=source
    )


def _as_case_arrays(item) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    image, label, spacing = item
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


def _check_labels(
    cases, label_names: dict[int, str], ignore_label: int | None, need_foreground: bool = True
) -> None:
    allowed = set(label_names) | ({ignore_label} if ignore_label is not None else set())
    any_fg = any_labelled = False
    for case in cases:
        if case.label is None:
            raise TrainingError(f"Case {case.name!r} has no labels; training needs labels.")
        values = set(np.unique(case.label).tolist())
        unknown = values - allowed
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


_RECIPE_DEFAULTS = {
    "optimizer": "sgd", "lr": 1e-2, "weight_decay": 3e-5, "lr_schedule": "poly", "loss": "dice_ce",
    "early_stopping_patience": None,
}


def resolve_recipe(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` whose unset (``None``) optimisation settings come from the model's recipe."""
    from ..models import get_model_spec

    spec = get_model_spec(config.model)
    recipe = spec.training
    values: dict[str, Any] = {}
    if config.configuration is None:
        values["configuration"] = spec.configuration or ("2d" if spec.spatial_dims[0] == 2 else "3d_fullres")
    for key, default in _RECIPE_DEFAULTS.items():
        if getattr(config, key) is not None:
            continue
        if key == "early_stopping_patience":
            values[key] = recipe.get("early_stopping_patience") if recipe.get("early_stopping") else None
        else:
            values[key] = recipe.get(key, default)
    return replace(config, **values) if values else config


class DiceCounts:
    """Per-class TP / FP / FN pooled over validation batches, and the Dice they give."""

    def __init__(self, num_classes: int):
        self.tp = torch.zeros(num_classes, dtype=torch.float64)
        self.fp = torch.zeros_like(self.tp)
        self.fn = torch.zeros_like(self.tp)

    def add(self, pred: torch.Tensor, ref: torch.Tensor, ignore_label: int | None = None) -> None:
        """Count a batch of predicted and reference label maps (voxels with ``ignore_label`` skipped)."""
        valid = ref != ignore_label if ignore_label is not None else torch.ones_like(ref, dtype=torch.bool)
        for c in range(1, len(self.tp)):
            p, r = (pred == c) & valid, (ref == c) & valid
            self.tp[c] += float((p & r).sum())
            self.fp[c] += float((p & ~r).sum())
            self.fn[c] += float((~p & r).sum())

    def dice(self, label_names: dict[int, str]) -> dict[str, float]:
        """Dice per foreground class, by name (NaN where the class is absent from both)."""
        out = {}
        for c in range(1, len(self.tp)):
            denom = 2 * self.tp[c] + self.fp[c] + self.fn[c]
            out[label_names.get(c, f"class_{c}")] = float(2 * self.tp[c] / denom) if denom > 0 else float("nan")
        return out


class Trainer:
    """The training loop as a handful of hooks; variants override one hook (convention 8).

    Hooks: :meth:`build_model`, :meth:`build_loss`, :meth:`build_optimizer`, :meth:`lr_at`,
    :meth:`train_step`, :meth:`validate`, :meth:`on_epoch_end`.
    """

    def __init__(self, config: TrainConfig, data: TrainingData):
        self.config = config = resolve_recipe(config)
        self.data = data
        self.plan = data.plan
        # Under torchrun each process drives one device (cuda:LOCAL_RANK) and samples its own patches.
        ddp.require_process_group()
        self.rank, self.world_size = ddp.get_rank(), ddp.get_world_size()
        self.device = ddp.rank_device(config.device) if self.world_size > 1 else resolve_device(config.device)
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.spatial_dims = len(self.plan.patch_size)
        self.num_classes = self.plan.num_classes
        self.in_channels = self.plan.num_channels
        self.history: list[dict] = []
        self.start_epoch = 0
        self.best_dice = -math.inf
        self.messages: list[str] = []
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % (2**32))
        self.model_kwargs = _architecture_kwargs(config.model, self.plan, config, data.source)
        self.model = self.build_model().to(self.device)
        self.loss_fn = self.build_loss()
        self.optimizer = self.build_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self._load_initial_weights()
        if self.world_size > 1:
            self._setup_distributed()
        self.sampler_seed = config.seed + self.rank  # ranks draw different patches
        self.val_sampler_seed = config.seed + 12345 + self.rank
        self._build_sampling(tuple(self.plan.patch_size), int(self.plan.batch_size))

    def _build_sampling(self, patch: tuple[int, ...], batch_size: int) -> None:
        """The training patch sampler and augmenter for ``patch`` and ``batch_size``."""
        from .augmentation import Augmenter

        cfg = self.config
        self.sampler = self._make_sampler(patch, batch_size)
        self.augmenter = (
            Augmenter(self.spatial_dims, patch_size=patch, mirror_axes=cfg.mirror_axes, seed=self.sampler_seed)
            if cfg.augment else None
        )

    def _make_sampler(self, patch: tuple[int, ...], batch_size: int):
        """The training sampler: random patches with foreground oversampling (nnU-Net's)."""
        from .augmentation import enlarged_patch_size
        from .data import PatchSampler

        cfg = self.config
        # As nnU-Net: sample a larger patch so that rotation/scaling bring no padding into the
        # centre, then the augmenter crops the network's patch out of its centre.
        return PatchSampler(
            self.data.train_cases, enlarged_patch_size(patch) if cfg.augment else patch, batch_size,
            oversample_foreground=cfg.oversample_foreground, seed=self.sampler_seed,
            ignore_label=cfg.ignore_label, final_patch_size=patch,
        )

    # ----------------------------------------------------------------- hooks
    def build_model(self) -> torch.nn.Module:
        from ..models import create_model

        return create_model(
            self.config.model, self.in_channels, self.num_classes, self.spatial_dims, **self.model_kwargs
        )

    def build_loss(self):
        from .losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights

        batch_dice = self.config.batch_dice
        if batch_dice is None:
            batch_dice = bool(getattr(self.plan, "batch_dice", self.spatial_dims == 2))
        loss = self.config.loss
        if loss == "soft_dice" and self.num_classes > 2:
            loss = "ce"  # the SDN recipe: soft Dice on binary tasks, CE on multi-class ones
        weights = {"dice_ce": (1.0, 1.0), "soft_dice": (0.0, 1.0), "ce": (1.0, 0.0)}
        if loss not in weights:
            raise TrainingError(f"Unknown loss {loss!r}; use one of {sorted(weights)}.")
        w_ce, w_dice = weights[loss]
        base = DiceCELoss(
            batch_dice=batch_dice, ignore_label=self.config.ignore_label, weight_ce=w_ce, weight_dice=w_dice
        )
        self._ds = bool(self.model_kwargs.get("deep_supervision", False))
        if not self._ds:
            return base
        self._ds_weights_fn = deep_supervision_weights
        return DeepSupervisionLoss(base, None)

    def build_optimizer(self) -> torch.optim.Optimizer:
        params = self.model.parameters()
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.config.lr, momentum=self.config.momentum,
                weight_decay=self.config.weight_decay, nesterov=True,
            )
        if self.config.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        if self.config.optimizer == "lookahead_nadam":  # the cross-dimensional models' recipe
            from .optim import lookahead_nadam

            return lookahead_nadam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        raise TrainingError(
            f"Unknown optimizer {self.config.optimizer!r}; use 'sgd', 'adam' or 'lookahead_nadam'."
        )

    def prepare_batch(
        self, images: torch.Tensor, labels: torch.Tensor, train: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a sampled batch to the device and augment it (training only)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if train and self.augmenter is not None:
            images, labels = self.augmenter(images, labels)
        return images, labels

    def lr_at(self, epoch: int) -> float:
        if self.config.lr_schedule == "constant":
            return self.config.lr
        return self.config.lr * (1 - epoch / max(self.config.epochs, 1)) ** 0.9

    def _loss(self, output, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, (list, tuple)):
            from .losses import deep_supervision_weights, downsample_targets

            shapes = [o.shape[2:] for o in output]
            targets = downsample_targets(target, shapes)
            weights = deep_supervision_weights(len(output))
            self.loss_fn.weights = weights
            return self.loss_fn(list(output), targets)
        return self.loss_fn(output, target)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.model(images)
            loss = self._loss(out, labels)
        return self._optimize(loss)

    def _optimize(self, loss: torch.Tensor) -> float:
        """Backward (AMP-scaled), gradient clipping and the optimiser step; returns the loss."""
        if not torch.isfinite(loss):
            raise TrainingError("The training loss became NaN/Inf; lower the learning rate.")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> tuple[float | None, dict[str, float]]:
        """Loss and per-class Dice (TP/FP/FN pooled over fixed validation patches).

        In a distributed run every rank validates its own patches and the loss and TP/FP/FN are
        pooled over ranks, so all ranks take the same best-checkpoint and early-stopping decisions.
        """
        from .data import PatchSampler

        if self.config.val_batches <= 0:
            return None, {}
        self.model.eval()
        sampler = PatchSampler(
            self.data.val_cases, self.plan.patch_size, self.plan.batch_size,
            oversample_foreground=self.config.oversample_foreground, seed=self.val_sampler_seed,
            ignore_label=self.config.ignore_label,
        )
        counts = DiceCounts(self.num_classes)
        losses = []
        for _ in range(self.config.val_batches):
            images, labels = self.prepare_batch(*sampler.sample(), train=False)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                out = self.unwrapped_model(images)  # no DDP collectives in evaluation
                if isinstance(out, (list, tuple)):
                    out = out[0]
                base = self.loss_fn.loss if hasattr(self.loss_fn, "loss") else self.loss_fn
                losses.append(float(base(out, labels)))
            counts.add(out.argmax(1), labels[:, 0], self.config.ignore_label)
        if self.world_size > 1:
            counts.tp, counts.fp, counts.fn = ddp.all_reduce_sum(counts.tp, counts.fp, counts.fn)
        return ddp.all_reduce_mean(float(np.mean(losses))), counts.dice(self.data.label_names)

    def on_epoch_end(self, event: EpochEnd) -> None:
        self.history.append(asdict(event))

    def _should_stop_early(self) -> bool:
        patience = self.config.early_stopping_patience
        losses = [h.get("val_loss") for h in self.history if h.get("val_loss") is not None]
        if not patience or len(losses) <= patience:
            return False
        return min(losses[-patience:]) >= min(losses[:-patience])

    # ------------------------------------------------------------ machinery
    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The network itself: ``self.model`` without its ``DistributedDataParallel`` wrapper."""
        return ddp.unwrap_model(self.model)

    def _setup_distributed(self) -> None:
        """Check that all ranks prepared the same data, then wrap the model in DDP.

        Wrapping broadcasts rank 0's weights. Each rank trains on its own batches of the plan's batch
        size, so the global batch is ``world_size x batch_size`` (as nnU-Net v2).
        """
        ddp.check_same_on_all_ranks(
            {
                "plan": self.plan.to_dict(), "model_kwargs": self.model_kwargs,
                "train": [c.name for c in self.data.train_cases], "val": [c.name for c in self.data.val_cases],
            },
            "plan, model or train/validation split",
        )
        self.model = ddp.wrap_model(self.model, self.device)
        self._initial_fingerprint = ddp.replica_fingerprint(self.unwrapped_model)
        self._rank_losses: list[float] = []
        backend = torch.distributed.get_backend()
        self.messages.append(
            f"Distributed training on {self.world_size} processes ({backend}): {self.plan.batch_size} "
            f"patches per process, global batch {self.world_size * self.plan.batch_size}."
        )

    def _finish_distributed(self) -> str | None:
        """Compare the replicas' weights across ranks; write the per-rank report if asked.

        Returns:
            A warning when the replicas differ (they never should), else ``None``.
        """
        final = ddp.replica_fingerprint(self.unwrapped_model)
        differ = ddp.ranks_disagreeing(final)
        ddp.write_rank_report({
            "rank": self.rank, "world_size": self.world_size, "device": str(self.device),
            "initial_fingerprint": self._initial_fingerprint, "final_fingerprint": final,
            "train_losses": self._rank_losses, "replicas_differ": differ,
        })
        if differ:
            return f"The weights on ranks {differ} differ from rank 0's; only rank 0's were saved."
        return None

    def _load_initial_weights(self) -> None:
        cfg = self.config
        ckpt = _source_checkpoint(cfg, self.data.source)
        self.data.source = None  # the weights are in the model now: let the loaded copy go
        if cfg.resume:
            self._check_same_arch(ckpt)
            self.model.load_state_dict(ckpt.state_dict)
            if ckpt.optimizer_state:
                self.optimizer.load_state_dict(ckpt.optimizer_state)
            self.start_epoch = int(ckpt.epoch) + 1
            self.history = list(ckpt.history or [])
            self.best_dice = float(ckpt.extra.get("best_dice", -math.inf)) if ckpt.extra else -math.inf
            self.messages.append(f"Resumed from {cfg.resume} at epoch {self.start_epoch}.")
        elif cfg.init_checkpoint:
            skipped = load_weights_for_finetune(self.model, ckpt)
            msg = f"Fine-tuning from {cfg.init_checkpoint}"
            if skipped:
                msg += f"; re-initialised {len(skipped)} tensor(s) that did not fit: {', '.join(skipped[:4])}"
            self.messages.append(msg + ".")

    def _check_same_arch(self, ckpt: Checkpoint) -> None:
        if ckpt.model_name != self.config.model or ckpt.num_classes != self.num_classes:
            raise TrainingError(
                f"Cannot resume: the checkpoint is a {ckpt.model_name!r} with {ckpt.num_classes} "
                f"classes, the run is a {self.config.model!r} with {self.num_classes}."
            )

    def save(self, name: str, epoch: int) -> str:
        """Write a checkpoint of the bare network (identical to a single-process one); return its path.

        In a distributed run only rank 0 writes (the replicas are identical); the others return the path.
        """
        path = os.path.join(self.config.output_dir, name)
        if self.rank != 0:
            return path
        save_checkpoint(
            path, self.unwrapped_model, model_name=self.config.model, model_kwargs=self.model_kwargs,
            in_channels=self.in_channels, num_classes=self.num_classes, spatial_dims=self.spatial_dims,
            plan=self.plan.to_dict(), label_names=self.data.label_names,
            train_config=self.config.to_dict(), epoch=epoch, optimizer=self.optimizer,
            history=self.history, extra={"best_dice": self.best_dice if math.isfinite(self.best_dice) else None},
        )
        return path

    def _write_run_info(self) -> None:
        if self.rank != 0:
            return  # one writer per run folder
        os.makedirs(self.config.output_dir, exist_ok=True)
        info = {
            "config": self.config.to_dict(),
            "plan": self.plan.to_dict(),
            "label_names": {str(k): v for k, v in self.data.label_names.items()},
            "fingerprint": to_plain(self.data.fingerprint, "fingerprint"),
            "versions": {"napari_medseg": __version__, "torch": torch.__version__},
            "device": str(self.device),
            "num_train_cases": len(self.data.train_cases),
            "num_val_cases": len(self.data.val_cases),
            "val_is_train": self.data.val_is_train,
            "train_cases": [c.name for c in self.data.train_cases],
            "val_cases": [c.name for c in self.data.val_cases],
            "world_size": self.world_size,
            "global_batch_size": self.world_size * int(self.plan.batch_size),
        }
        tmp = os.path.join(self.config.output_dir, ".run.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(info, fh, indent=2)
        os.replace(tmp, os.path.join(self.config.output_dir, "run.json"))

    def _shrink_for_memory(self, err: BaseException) -> str:
        """After an out-of-memory error: halve the batch, then the patch (engine.oom); say so.

        The sampler and augmenter are rebuilt for the new sizes and the plan records them, so the
        saved checkpoint's plan (and inference with it) uses the patch that was trained.

        Raises:
            InsufficientMemoryError: the batch is 1 and the patch cannot shrink further.
        """
        if self.world_size > 1:  # one rank alone cannot change shapes while the others all-reduce
            raise InsufficientMemoryError(
                f"Out of memory on {self.device} in a distributed run ({type(err).__name__}). Restart with "
                "a smaller --batch-size or --patch-size (all processes must use the same)."
            ) from err
        self.optimizer.zero_grad(set_to_none=True)
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        old_batch, old_patch = int(self.plan.batch_size), tuple(self.plan.patch_size)
        pools = self.model_kwargs.get("pool_kernels") or self.plan.pool_kernels
        batch, patch = halve_batch_and_patch(old_batch, old_patch, pooling_divisors(pools, len(old_patch)))
        self.plan.batch_size, self.plan.patch_size = batch, patch
        self._build_sampling(patch, batch)
        release_memory(self.device)
        text = (
            f"Out of memory on {self.device} ({reason}): halved the batch {old_batch} -> {batch} and the "
            f"patch {old_patch} -> {patch}; training goes on."
        )
        logger.warning(text)
        return text

    def run(self) -> Generator[Progress | EpochEnd | Message, None, str]:
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self._write_run_info()
        for m in self.messages:
            yield Message(m)
        if self.data.val_is_train:
            yield Message("Only one case: validation Dice is measured on the training case.", "warning")
        t0 = time.perf_counter()
        epoch = self.start_epoch
        completed = self.start_epoch - 1  # index of the last finished epoch (-1: none yet)
        iters = cfg.iterations_per_epoch
        try:
            while epoch < cfg.epochs:
                lr = self.lr_at(epoch)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                losses = []
                it = 0
                while it < iters:
                    shrunk = None
                    try:
                        images, labels = self.prepare_batch(*self.sampler.sample())
                        losses.append(self.train_step(images, labels))
                    except Exception as err:  # noqa: BLE001 - only allocation failures are handled
                        if not is_oom_error(err):
                            raise
                        shrunk = self._shrink_for_memory(err)  # then retry this iteration, smaller
                    if shrunk is not None:  # outside the handler: its traceback holds the batch
                        yield Message(shrunk, "warning")
                        continue
                    it += 1
                    yield Progress("train", it, iters, f"epoch {epoch + 1}/{cfg.epochs} loss {losses[-1]:.4f}")
                if self.world_size > 1:
                    self._rank_losses.extend(losses)
                val_loss, val_dice = self.validate()
                event = EpochEnd(  # the training loss is averaged over ranks
                    epoch=epoch, epochs=cfg.epochs, train_loss=ddp.all_reduce_mean(float(np.mean(losses))),
                    val_loss=val_loss,
                    val_dice=val_dice, lr=lr, elapsed_s=time.perf_counter() - t0,
                )
                self.on_epoch_end(event)
                mean = event.mean_dice
                if mean is not None and mean > self.best_dice:
                    self.best_dice = mean
                    self.save("checkpoint_best.pt", epoch)
                self.save("checkpoint_latest.pt", epoch)
                completed = epoch
                yield event
                epoch += 1
                if self._should_stop_early():
                    yield Message(
                        f"Early stopping: no lower validation loss for {cfg.early_stopping_patience} epochs."
                    )
                    break
        except GeneratorExit:
            # Stopped by the consumer within this iteration: keep what was learnt. The checkpoint
            # records the last *completed* epoch, so resuming re-runs the interrupted one.
            path = self.save("checkpoint_latest.pt", completed)
            logger.info("Training stopped during epoch %d; saved %s", epoch, path)
            raise
        final = self.save("checkpoint_final.pt", epoch - 1)
        if self.world_size > 1:
            warning = self._finish_distributed()
            if warning:
                yield Message(warning, "warning")
            ddp.barrier()  # rank 0 has written the file before any rank returns its path
        return final


def train(config: TrainConfig, data: Any, trainer_cls: type[Trainer] = Trainer) -> Generator[Any, None, str]:
    """Train a model; a generator of progress events that returns the final checkpoint's path.

    Args:
        config: The run's settings.
        data: A dataset folder, a ``RawDataset``, or a list of ``(image, label, spacing)``.
        trainer_cls: A :class:`Trainer` subclass for architecture-specific variants.

    Yields:
        ``Progress`` (planning, preprocessing, each iteration), ``Message`` and ``EpochEnd``.
    """
    config = resolve_recipe(config)
    prepared = yield from prepare_data(config, data)
    if prepared.plan.previous_stage and trainer_cls is Trainer:
        from .cascade_training import CascadeTrainer

        trainer_cls = CascadeTrainer
    if trainer_cls is Trainer:  # the model's own variant (ModelSpec.trainer), e.g. PFSeg's
        from ..models import get_model_spec

        variant = get_model_spec(config.model).trainer
        if variant == "pfseg":
            from .pfseg_training import PFSegTrainer

            trainer_cls = PFSegTrainer
        elif variant is not None:
            raise TrainingError(f"Model {config.model!r} names an unknown trainer variant {variant!r}.")
    trainer = trainer_cls(config, prepared)
    return (yield from trainer.run())


def run_to_completion(gen: Generator) -> Any:
    """Drive an engine generator to its end and return its result (tests, scripts)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


__all__: Sequence[str] = [
    "TrainConfig", "Trainer", "TrainingData", "TrainingError", "prepare_data", "train", "run_to_completion",
]
