"""Training as a generator: nnU-Net (v1) style SGD/poly training behind a few overridable hooks.

``train(config, data)`` yields ``Progress`` per iteration and ``EpochEnd`` per epoch and returns the
final checkpoint's path. Closing the generator (Stop; Ctrl-C or SIGTERM in the CLI) stops within
one iteration and saves a resumable ``checkpoint_latest.pt`` first.

The loop follows nnU-Net (Isensee et al., Nature Methods 18, 2021): SGD, Nesterov momentum 0.99,
poly decay, Dice + CE, deep supervision, 33 % foreground oversampling, gradient clipping at 12,
online "pseudo Dice" on validation patches. With ``config.minutes`` the run is a time budget
(:mod:`~napari_medseg.engine.training.schedule`); the epoch loop itself is in :mod:`.loop`.

:class:`Trainer` is a short loop (:meth:`Trainer.run`) over documented hooks; a variant (see
:mod:`~napari_medseg.engine.training.variants`) subclasses it, overrides the hooks it needs and
registers itself (:func:`~napari_medseg.engine.training.registry.register_trainer`), and
:func:`train` picks the registered trainer for the run.

Under ``torchrun`` (:mod:`~napari_medseg.engine.runtime.distributed`) the model is wrapped in
``DistributedDataParallel``: each rank samples its own patches (seed + rank), validation is pooled
over ranks, and only rank 0 writes ``run.json`` and checkpoints (of the bare network).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from napari_medseg.engine.data import Augmenter, Case, PatchSampler, enlarged_patch_size
from napari_medseg.engine.data.painted import PaintedSampler, paint_axis
from napari_medseg.engine.jobs import EpochEnd, Message, Progress, relay
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.runtime import distributed as ddp
from napari_medseg.engine.training import loop, state
from napari_medseg.engine.training.config import (
    TrainConfig,
    TrainingError,
    check_run_folder,
    resolve_recipe,
)
from napari_medseg.engine.training.correction import correction_recipe
from napari_medseg.engine.training.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    deep_supervision_weights,
    downsample_targets,
)
from napari_medseg.engine.training.optim import make_optimizer
from napari_medseg.engine.training.postprocess import choose_largest_component
from napari_medseg.engine.training.prepare import CaseInputs, TrainingData, prepare_data
from napari_medseg.engine.training.registry import register_trainer, trainer_for
from napari_medseg.engine.training.schedule import TimeBudget, scheduled_lr
from napari_medseg.engine.training.validation import should_stop_early, validate_on_patches
from napari_medseg.models import create_model

logger = logging.getLogger(__name__)

_LOSS_WEIGHTS = {"dice_ce": (1.0, 1.0), "soft_dice": (0.0, 1.0), "ce": (1.0, 0.0)}  # (CE, Dice)


@register_trainer("default", default=True)
class Trainer:
    """The training loop as a handful of hooks; variants override the hooks they need (convention 8).

    Hooks, in the order they are called: :meth:`prepare_cases` (class method, before the trainer
    exists), :meth:`configure_plan`, :meth:`build_model`, :meth:`build_loss`,
    :meth:`build_optimizer`, :meth:`make_sampler` / :meth:`make_augmenter`; then per epoch
    :meth:`lr_at`, per iteration :meth:`prepare_batch` and :meth:`train_step` (which uses
    :meth:`compute_loss` and :meth:`optimize`), :meth:`shrink_for_memory` after an out-of-memory
    error, and at the end of an epoch :meth:`validate`, :meth:`on_epoch_end`, :meth:`save` and
    :meth:`should_stop`.

    Args:
        config: The run's settings (unset recipe values are filled in from the model's recipe).
        data: The prepared cases and plan (:func:`~napari_medseg.engine.training.prepare.prepare_data`).
    """

    def __init__(self, config: TrainConfig, data: TrainingData):
        self.config = config = resolve_recipe(config)
        self.data = data
        self.plan = self.configure_plan(data.plan)
        # Under torchrun each process drives one device (cuda:LOCAL_RANK) and samples its own patches.
        self.rank, self.world_size, self.device = state.process_device(config.device)
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.spatial_dims = len(self.plan.patch_size)
        self.num_classes = self.plan.num_classes
        self.in_channels = self.plan.num_channels
        self.history: list[dict] = []
        self.start_epoch = 0
        self.best_dice = -math.inf
        self.messages: list[str] = []
        self.budget = TimeBudget(config.minutes) if config.minutes else None
        self.current_lr = float(config.lr or 0.0)
        self.warmup = config.warmup if config.warmup is not None else (0.05 if config.init_checkpoint else 0.0)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % (2**32))
        self.model_kwargs = state.architecture_kwargs(config.model, self.plan, config, data.source)
        self.model = self.build_model().to(self.device)
        self.loss_fn = self.build_loss()
        self.optimizer = self.build_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        state.load_initial_weights(self)  # and the mirroring axes (the parent's; never left-right for sides)
        self.rank_losses: list[float] = []  # this rank's training losses (distributed runs report them)
        if self.world_size > 1:
            state.setup_distributed(self)
        self.sampler_seed = config.seed + self.rank  # ranks draw different patches
        self.val_sampler_seed = config.seed + 12345 + self.rank
        self.build_sampling(tuple(self.plan.patch_size), int(self.plan.batch_size))

    # ------------------------------------------------------------------------------- data hooks
    @classmethod
    def prepare_cases(
        cls, config: TrainConfig, inputs: CaseInputs, plan: Plan
    ) -> Generator[Progress | Message, None, list[Case]]:
        """Preprocess the run's cases with ``plan``; a generator that yields progress per case.

        Called by :func:`~napari_medseg.engine.training.prepare.prepare_data` once the plan is known,
        before any trainer exists. An override (e.g. the cascade's, which appends the previous
        stage's prediction as an image channel) must return one :class:`Case` per input, in order.
        """
        cases = []
        for i in range(len(inputs)):
            cases.append(inputs.load(i, plan, config.ignore_label))
            yield Progress("preprocess", i + 1, len(inputs), cases[-1].name)
        return cases

    def configure_plan(self, plan: Plan) -> Plan:
        """The plan this trainer trains with (patch and batch size of the sampler, saved in checkpoints).

        Called first in ``__init__``, with ``self.config`` (recipe resolved) and ``self.data`` set.
        The base returns ``plan`` itself; an override returns a plan (a copy, not ``plan`` changed
        in place), e.g. a whole-volume model's "patch".
        """
        return plan

    def make_sampler(self, patch: tuple[int, ...], batch_size: int) -> Any:
        """The training sampler; anything with ``sample() -> (images, labels)`` CPU tensors.

        Called from ``__init__`` and after :meth:`shrink_for_memory`. The base draws random patches
        with foreground oversampling (nnU-Net's), or, for cases painted on a few slices (ignore
        label elsewhere), patches centred on the paint (:class:`~.data.painted.PaintedSampler`);
        with augmentation, a patch larger than ``patch`` so that rotation/scaling bring no padding
        into the centre the augmenter crops.
        """
        cfg = self.config
        size = enlarged_patch_size(patch) if cfg.augment else patch
        if cfg.ignore_label is not None and any(paint_axis(c.label, cfg.ignore_label) is not None
                                                for c in self.data.train_cases):
            # partly painted cases (corrections): every patch centred on the paint, slices in turn
            return PaintedSampler(self.data.train_cases, size, batch_size, seed=self.sampler_seed,
                                  ignore_label=cfg.ignore_label, final_patch_size=patch)
        return PatchSampler(
            self.data.train_cases, size, batch_size, oversample_foreground=cfg.oversample_foreground,
            seed=self.sampler_seed, ignore_label=cfg.ignore_label, final_patch_size=patch,
        )

    def make_augmenter(self, patch: tuple[int, ...]) -> Augmenter | None:
        """The batch augmenter for ``patch`` (``None``: no augmentation); called with :meth:`make_sampler`."""
        cfg = self.config
        if not cfg.augment:
            return None
        return Augmenter(self.spatial_dims, patch_size=patch, mirror_axes=cfg.mirror_axes, seed=self.sampler_seed)

    def build_sampling(self, patch: tuple[int, ...], batch_size: int) -> None:
        """(Re)build ``self.sampler`` and ``self.augmenter`` for ``patch`` and ``batch_size``."""
        self.sampler = self.make_sampler(patch, batch_size)
        self.augmenter = self.make_augmenter(patch)

    def prepare_batch(
        self, images: torch.Tensor, labels: torch.Tensor, train: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a sampled batch to the device and augment it (training only).

        Called for every training batch and (with ``train=False``) every validation batch; returns
        ``(network input, labels (B, 1, *patch))`` on the device.
        """
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if train and self.augmenter is not None:
            images, labels = self.augmenter(images, labels)
        return images, labels

    # ------------------------------------------------------------------------------ model hooks
    def build_model(self) -> torch.nn.Module:
        """The network, from the model registry with ``self.model_kwargs``; called once in ``__init__``."""
        return create_model(
            self.config.model, self.in_channels, self.num_classes, self.spatial_dims, **self.model_kwargs
        )

    def build_loss(self) -> torch.nn.Module:
        """The loss module, called once after :meth:`build_model`; used by :meth:`compute_loss`.

        The base: Dice + CE (or one of them, per ``config.loss``), wrapped for deep supervision
        when the model has it.
        """
        batch_dice = self.config.batch_dice
        if batch_dice is None:
            batch_dice = bool(getattr(self.plan, "batch_dice", self.spatial_dims == 2))
        loss = self.config.loss
        if loss == "soft_dice" and self.num_classes > 2:
            loss = "ce"  # the SDN recipe: soft Dice on binary tasks, CE on multi-class ones
        if loss not in _LOSS_WEIGHTS:
            raise TrainingError(f"Unknown loss {loss!r}; use one of {sorted(_LOSS_WEIGHTS)}.")
        w_ce, w_dice = _LOSS_WEIGHTS[loss]
        base = DiceCELoss(
            batch_dice=batch_dice, ignore_label=self.config.ignore_label, weight_ce=w_ce, weight_dice=w_dice
        )
        if not self.model_kwargs.get("deep_supervision", False):
            return base
        return DeepSupervisionLoss(base, None)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser over the model's parameters, per ``config.optimizer``; called after :meth:`build_loss`."""
        try:
            return make_optimizer(self.model.parameters(), self.config)
        except ValueError as err:
            raise TrainingError(str(err)) from err

    # ------------------------------------------------------------------------------- step hooks
    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch``; called at the start of every epoch and set on the optimiser."""
        if self.config.lr_schedule == "constant":
            return self.config.lr
        return self.config.lr * (1 - epoch / max(self.config.epochs, 1)) ** 0.9

    def lr_at_progress(self, progress: float) -> float:
        """With a time budget: the learning rate at ``progress`` (0 to 1) of the budget.

        Called before every iteration of a budgeted run (instead of :meth:`lr_at` per epoch): the
        config's schedule over time, after a linear warm-up (:func:`~.schedule.scheduled_lr`);
        schedules without a time form (a plateau rule) keep the current rate.
        """
        cfg = self.config
        if cfg.lr_schedule not in ("poly", "constant"):
            return float(self.optimizer.param_groups[0]["lr"])
        return scheduled_lr(cfg.lr, cfg.lr_schedule, progress, self.warmup)

    def compute_loss(self, output: torch.Tensor | list | tuple, target: torch.Tensor) -> torch.Tensor:
        """The loss of a network output; called by :meth:`train_step` inside autocast.

        A list/tuple output (deep supervision) is compared with targets downsampled to each head.
        """
        if isinstance(output, (list, tuple)):
            targets = downsample_targets(target, [o.shape[2:] for o in output])
            self.loss_fn.weights = deep_supervision_weights(len(output))
            return self.loss_fn(list(output), targets)
        return self.loss_fn(output, target)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimisation step on a prepared batch; called every iteration, returns the loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.model(images)
            loss = self.compute_loss(out, labels)
        return self.optimize(loss)

    def optimize(self, loss: torch.Tensor) -> float:
        """Backward (AMP-scaled), gradient clipping and the optimiser step; returns the loss.

        Called at the end of :meth:`train_step` (overrides of it call it too).

        Raises:
            TrainingError: the loss is NaN or infinite.
        """
        if not torch.isfinite(loss):
            raise TrainingError("The training loss became NaN/Inf; lower the learning rate.")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def shrink_for_memory(self, err: BaseException) -> str:
        """After an out-of-memory error in an iteration: make the next try smaller; returns what it did.

        Called by :meth:`run`, which then retries the iteration. The base halves the batch, then the
        patch (:mod:`~napari_medseg.engine.runtime.oom`), rebuilds the sampling and records the
        sizes in the plan, so the saved checkpoint's plan (and inference with it) uses the patch
        that was trained.

        Raises:
            InsufficientMemoryError: nothing can shrink further, or the run is distributed.
        """
        return state.halve_batch_and_patch(self, err)

    # ---------------------------------------------------------------------------- epoch hooks
    @torch.no_grad()
    def validate(self) -> tuple[float | None, dict[str, float]]:
        """Loss and per-class Dice (TP/FP/FN pooled over fixed validation patches).

        Called at the end of every epoch; returns ``(validation loss or None, {class name: Dice})``.
        In a distributed run every rank validates its own patches and the loss and TP/FP/FN are
        pooled over ranks, so all ranks take the same best-checkpoint and early-stopping decisions.
        """
        return (None, {}) if self.validation_kind == "none" else validate_on_patches(self)

    def on_epoch_end(self, event: EpochEnd) -> None:
        """Record the epoch's metrics; called after :meth:`validate`, before the checkpoints are saved.

        Overrides (e.g. a plateau schedule) must call ``super().on_epoch_end(event)``.
        """
        self.history.append(asdict(event))

    def should_stop(self) -> bool:
        """Whether to stop before the next epoch; called after each epoch's checkpoints are saved.

        The base: early stopping after ``config.early_stopping_patience`` epochs without a lower
        validation loss.
        """
        return should_stop_early(self.history, self.config.early_stopping_patience)

    def save(self, name: str, epoch: int) -> str:
        """Write a checkpoint of the bare network (identical to a single-process one); return its path.

        Called after each epoch (best and latest), when the run is stopped, and at the end. In a
        distributed run only rank 0 writes (the replicas are identical); the others return the path.
        """
        return state.save_trainer_checkpoint(self, name, epoch)

    def write_run_info(self) -> None:
        """Write ``run.json`` (config, plan, fingerprint, versions, split) beside the checkpoints.

        Called once when :meth:`run` starts; only rank 0 writes.
        """
        state.write_run_info(self)

    @property
    def validation_kind(self) -> str:
        """What validation measures: held-out cases / held-out slices / training cases / none."""
        if self.config.val_batches <= 0 or not self.data.val_cases:
            return "none"
        return self.data.validation or ("training cases" if self.data.val_is_train else "held-out cases")

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The network itself: ``self.model`` without its ``DistributedDataParallel`` wrapper."""
        return ddp.unwrap_model(self.model)

    # ----------------------------------------------------------------------------------- loop
    def run(self) -> Generator[Progress | EpochEnd | Message, None, str]:
        """Train from ``start_epoch`` to ``config.epochs``; a generator that returns the final checkpoint."""
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.write_run_info()
        for m in self.messages:
            yield Message(m)
        notice = loop.VALIDATION_NOTICES.get(self.validation_kind)
        if notice:
            yield Message(*notice)
        t0 = time.perf_counter()
        if self.budget is not None:
            self.budget.start()
        epoch, completed = self.start_epoch, self.start_epoch - 1  # last finished epoch (-1: none yet)
        try:
            while epoch < cfg.epochs:
                if self.budget is None:
                    loop.set_lr(self, self.lr_at(epoch))
                losses = yield from loop.train_epoch(self, epoch)
                if not losses:
                    break  # the time budget ran out before this epoch's first iteration
                event = loop.end_epoch(self, epoch, losses, time.perf_counter() - t0)
                completed = epoch
                yield event
                epoch += 1
                if self.budget is not None and self.budget.exhausted:
                    yield Message(f"Time budget of {cfg.minutes:g} min spent after {epoch} epochs.")
                    break
                if self.should_stop():
                    yield Message(f"Early stopping: no lower validation loss for {cfg.early_stopping_patience} epochs.")
                    break
        except GeneratorExit:
            # Stopped by the consumer within this iteration: keep what was learnt. The checkpoint
            # records the last *completed* epoch, so resuming re-runs the interrupted one.
            path = self.save("checkpoint_latest.pt", completed)
            logger.info("Training stopped during epoch %d; saved %s", epoch, path)
            raise
        final = self.save("checkpoint_final.pt", epoch - 1)
        if self.world_size > 1:
            warning = state.finish_distributed(self)
            if warning:
                yield Message(warning, "warning")
            ddp.barrier()  # rank 0 has written the file before any rank returns its path
        return final


def train(config: TrainConfig, data: Any, trainer_cls: type[Trainer] | None = None) -> Generator[Any, None, str]:
    """Train a model; a generator of progress events that returns the final checkpoint's path.

    Args:
        config: The run's settings.
        data: A dataset folder, a ``RawDataset``, or a list of ``(image, label, spacing)``.
        trainer_cls: A :class:`Trainer` subclass; default: :func:`~.registry.trainer_for` the run
            (a registered variant for its model or plan, else :class:`Trainer`).

    Yields:
        ``Progress`` (planning, preprocessing, each iteration), ``Message`` and ``EpochEnd``.

    Raises:
        TrainingError: ``output_dir`` holds another run and neither ``resume`` nor ``overwrite`` is set.
    """
    check_run_folder(config)
    requested, config = config, resolve_recipe(config)
    prepared = yield from relay(prepare_data(config, data, trainer_cls))
    config, note = correction_recipe(requested, config, prepared.source, prepared.label_names)
    if note:
        yield Message(note)
    cls = trainer_cls or trainer_for(config, prepared.plan)
    trainer = cls(config, prepared)
    final = yield from trainer.run()
    return (yield from choose_largest_component(trainer, final))  # on held-out painted slices, as nnU-Net


__all__ = ["Trainer", "train"]
