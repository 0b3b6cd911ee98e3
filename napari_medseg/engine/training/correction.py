"""A fine-tune on the parent checkpoint's own classes: a *correction* of the parent.

The viewer's loop (Segment, correct the labels with the brush, Train / Fine-tune from the same
checkpoint) changes what the parent predicts, not what it is for. So a correction:

* keeps the parent's post-processing recommendations (:func:`inherited_extra`: one component per
  class and side), not its class weights (fitted to the parent's weights);
* records the parent's domain joined with the new images' (:func:`run_domain`: the model was
  fitted on both);
* in a time-budgeted run without an optimiser or rate of the user's, trains at
  :data:`CORRECTION_LR` instead of the budget's 1e-3, also when stopped and resumed
  (:func:`correction_recipe`).

A fine-tune with other label names is another task (:func:`~.replan.labels_differ`): a new head,
nothing of this kept. Measured on the shipped brain model (``benchmarks/bench_correct_shipped.py``,
three painted slices of another brain, 5 minutes on 2 cores): mean Dice on the unpainted slices
0.749 -> 0.793; before these rules the same loop gave 0.30 and labelled the scalp.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import Any

from napari_medseg.engine.checkpoints import Checkpoint
from napari_medseg.engine.checkpoints.fields import CLASS_WEIGHTS, POSTPROCESSING
from napari_medseg.engine.inference.domain import merge_domains
from napari_medseg.engine.jobs import Message
from napari_medseg.engine.training.replan import labels_differ

#: The learning rate of a time-budgeted correction when the user names no optimiser: Adam at 1e-3
#: (the budget's rate, measured for new tasks) undoes a trained model in a few dozen steps. The
#: shipped brain model fine-tuned for 1 minute on three painted axial slices of the ICBM152 brain
#: (its post-processing kept), mean Dice of the whole brain: 1e-3 0.740, 1e-4 0.791, 3e-5 0.795
#: (thalamus 0.69 / 0.83 / 0.89; before: 0.752); 5 minutes at 3e-5: 0.796.
CORRECTION_LR = 3e-5


def is_correction(config, source: Checkpoint | None, label_names: dict[int, str]) -> bool:
    """A fine-tune (not a resume) of ``source`` on its own classes."""
    return bool(config.init_checkpoint) and not config.resume and source is not None and not labels_differ(
        source, label_names)


def inherited_extra(source: Checkpoint | None, label_names: dict[int, str]) -> dict:
    """The parent's post-processing recommendations (:data:`~napari_medseg.engine.checkpoints.fields.POSTPROCESSING`)
    that a run on its own classes keeps (``{}`` for another task or without a parent; a resumed
    run's source is its own checkpoint, which kept them).

    Its :data:`~napari_medseg.engine.checkpoints.fields.CLASS_WEIGHTS` are not kept: they were
    fitted to the parent's weights (measured: on the shipped model fine-tuned on three painted
    slices of another brain, keeping them cost 0.003-0.027 mean Dice).
    """
    if source is None or labels_differ(source, label_names):
        return {}
    return {k: source.extra[k] for k in POSTPROCESSING if k in (source.extra or {})}


def inherited_message(source: Checkpoint, extra: dict) -> str | None:
    """What a correction tells the user about the parent's recommendations it keeps and drops."""
    dropped = CLASS_WEIGHTS in (source.extra or {})
    if not extra and not dropped:
        return None
    kept = ", ".join(sorted(extra)) or "nothing"
    text = f"Kept the parent's post-processing ({kept})"
    if dropped:
        text += ("; not its class weights (fitted to the parent's weights: "
                 "napari_medseg.engine.evaluation.fit_class_weights refits them on labelled cases)")
    return text + "."


def run_domain(config, source: Checkpoint | None, inputs) -> dict | None:
    """The domain the run's checkpoints record: the data's (``inputs.domain()``); a resumed run's
    as its checkpoint says; a correction's joined with the parent's (:func:`merge_domains`)."""
    if config.resume and source is not None and source.domain:
        return source.domain
    if is_correction(config, source, inputs.label_names):
        return merge_domains(source.domain, inputs.domain())
    return inputs.domain()


def from_parent(config, source: Checkpoint | None, inputs) -> Generator[Message, None, tuple[dict, dict | None]]:
    """``(checkpoint extras kept, domain)`` of a run whose cases are read; says what a correction keeps."""
    extra = inherited_extra(source, inputs.label_names)
    if is_correction(config, source, inputs.label_names):
        note = inherited_message(source, extra)
        if note:
            yield Message(note)
    return extra, run_domain(config, source, inputs)


def correction_recipe(requested, resolved, source: Checkpoint | None, label_names: dict[int, str]) -> tuple[Any, str | None]:
    """``(config, note)``: ``resolved`` (the run's config after ``resolve_recipe``) with
    :data:`CORRECTION_LR` and a note for the user when ``requested`` (the config as given) is a
    time-budgeted correction naming neither an optimiser nor a rate; else ``(resolved, None)``.

    Resumed the same way (``source`` is then the run's own checkpoint), the run goes on at the rate
    its checkpoint trained with: a stopped correction resumed at the budget's 1e-3 otherwise.
    """
    if requested.minutes is None or requested.optimizer is not None or requested.lr is not None:
        return resolved, None
    if requested.resume:
        rate = (source.train_config or {}).get("lr") if source is not None else None
        if rate is None or float(rate) == resolved.lr:
            return resolved, None
        return replace(resolved, lr=float(rate)), f"Resumed at the run's learning rate {float(rate):g}."
    if not is_correction(requested, source, label_names):
        return resolved, None
    return replace(resolved, lr=CORRECTION_LR), (
        f"A correction of the parent's own classes: learning rate {CORRECTION_LR:g} (the time budget's "
        f"{resolved.lr:g} is for new tasks; set a rate to override).")


__all__ = [
    "CORRECTION_LR", "correction_recipe", "from_parent", "inherited_extra", "inherited_message", "is_correction",
    "run_domain",
]
