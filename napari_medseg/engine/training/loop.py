"""The inside of :meth:`Trainer.run <napari_medseg.engine.training.trainer.Trainer.run>`: one
epoch's iterations and its end (validation, history, checkpoints).

Kept apart from the hooks so that :mod:`~napari_medseg.engine.training.trainer` reads as the list
of what a variant may override. One loss everywhere: the progress text shows the running mean of
the epoch's iteration losses, which is what :class:`~napari_medseg.engine.jobs.EpochEnd` reports
as ``train_loss`` when the epoch ends.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from napari_medseg.engine.jobs import EpochEnd, Message, Progress
from napari_medseg.engine.runtime import distributed as ddp
from napari_medseg.engine.runtime.oom import is_oom_error

#: What a run says at its start about its validation (``Trainer.validation_kind``): (text, level).
VALIDATION_NOTICES = {
    "training cases": ("No case is held out: the validation Dice is measured on the training cases "
                       "(it shows fitting, not accuracy on new scans).", "warning"),
    "none": ("No validation: too little held-out data (the curves show the training loss only).", "info"),
}


def set_lr(trainer, lr: float) -> None:
    """Set the learning rate of every parameter group (and remember it for the epoch's event)."""
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    trainer.current_lr = float(lr)


def train_epoch(trainer, epoch: int) -> Generator[Progress | Message, None, list[float]]:
    """The iterations of one epoch; after an out-of-memory error the iteration is retried smaller.

    With a time budget, the learning rate is set before every iteration from the share of the
    budget spent, and the epoch ends early when the budget is spent.
    """
    cfg, budget = trainer.config, trainer.budget
    iters, losses, it = cfg.iterations_per_epoch, [], 0
    while it < iters:
        if budget is not None:
            if budget.exhausted:
                break
            set_lr(trainer, trainer.lr_at_progress(budget.fraction))
        shrunk = None
        try:
            images, labels = trainer.prepare_batch(*trainer.sampler.sample())
            losses.append(trainer.train_step(images, labels))
        except Exception as err:  # noqa: BLE001 - only allocation failures are handled
            if not is_oom_error(err):
                raise
            shrunk = trainer.shrink_for_memory(err)
        if shrunk is not None:  # outside the handler: its traceback holds the batch
            yield Message(shrunk, "warning")
            continue
        it += 1
        mean = float(np.mean(losses))
        if budget is not None:
            yield Progress("train", int(budget.elapsed), int(budget.seconds),
                           f"{budget.describe()} · epoch {epoch + 1} · loss {mean:.4f}")
        else:
            yield Progress("train", it, iters, f"epoch {epoch + 1}/{cfg.epochs} · loss {mean:.4f}")
    if trainer.world_size > 1:
        trainer.rank_losses.extend(losses)
    return losses


def end_epoch(trainer, epoch: int, losses: list[float], elapsed_s: float) -> EpochEnd:
    """Validate, record and checkpoint (best and latest) one finished epoch."""
    val_loss, val_dice = trainer.validate()
    event = EpochEnd(  # the training loss is averaged over ranks
        epoch=epoch, epochs=trainer.config.epochs, train_loss=ddp.all_reduce_mean(float(np.mean(losses))),
        val_loss=val_loss, val_dice=val_dice, lr=trainer.current_lr, elapsed_s=elapsed_s,
        validation=trainer.validation_kind,
    )
    trainer.on_epoch_end(event)
    mean = event.mean_dice
    if mean is not None and mean > trainer.best_dice:
        trainer.best_dice = mean
        trainer.save("checkpoint_best.pt", epoch)
    trainer.save("checkpoint_latest.pt", epoch)
    return event


__all__ = ["VALIDATION_NOTICES", "end_epoch", "set_lr", "train_epoch"]
