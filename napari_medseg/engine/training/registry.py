"""Trainer variants by name, chosen for a run by model name or by a predicate on (config, plan).

As nnU-Net v2's trainer classes (``nnUNetTrainer`` and its ``variants/``) and timm's model
registry: a variant module decorates its :class:`~napari_medseg.engine.training.trainer.Trainer`
subclass with :func:`register_trainer`, saying which runs it trains::

    @register_trainer("patchfree", models=("some-model",))      # every run of these models
    class WholeVolumeTrainer(Trainer): ...

    @register_trainer("staged", when=lambda config, plan: bool(plan.extras.get("stage")))
    class StagedTrainer(Trainer): ...

:func:`trainer_for` returns the first registered variant (in registration order) whose model names
contain ``config.model`` or whose predicate holds, else the default trainer (registered with
``default=True`` by :mod:`~napari_medseg.engine.training.trainer`). Shared code never names a variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Predicate = Callable[[Any, Any], bool]  # (TrainConfig, Plan) -> bool


@dataclass(frozen=True)
class TrainerEntry:
    """A registered trainer class and the runs it is chosen for."""

    name: str
    cls: type
    models: tuple[str, ...] = ()
    when: Predicate | None = None

    def matches(self, config: Any, plan: Any) -> bool:
        """Whether this variant trains ``config``'s model, or its predicate holds for the run."""
        if config.model in self.models:
            return True
        return self.when is not None and bool(self.when(config, plan))


_TRAINERS: dict[str, TrainerEntry] = {}
_DEFAULT: list[str] = []


def register_trainer(
    name: str, *, models: Sequence[str] = (), when: Predicate | None = None, default: bool = False
) -> Callable[[type], type]:
    """Class decorator: register a trainer class under ``name``.

    Args:
        name: Registry name (e.g. ``"cascade"``).
        models: Model registry names this trainer always trains.
        when: ``(config, plan) -> bool``: the run needs this trainer (e.g. the plan is a cascade stage).
        default: The trainer for runs no variant claims (the base trainer registers itself so).

    Raises:
        ValueError: ``name`` is taken by another class, or a second default is registered.
    """

    def decorate(cls: type) -> type:
        old = _TRAINERS.get(name)
        if old is not None and old.cls is not cls:
            raise ValueError(f"A trainer named {name!r} is registered already ({old.cls.__qualname__}).")
        if default and _DEFAULT and _DEFAULT[0] != name:
            raise ValueError(f"The default trainer is {_DEFAULT[0]!r} already.")
        _TRAINERS[name] = TrainerEntry(name, cls, tuple(models), when)
        if default and not _DEFAULT:
            _DEFAULT.append(name)
        return cls

    return decorate


def get_trainer(name: str) -> type:
    """The trainer class registered as ``name``.

    Raises:
        KeyError: no trainer of that name (the message lists the registered ones).
    """
    if name not in _TRAINERS:
        raise KeyError(f"No trainer named {name!r}; registered: {list_trainers()}.")
    return _TRAINERS[name].cls


def list_trainers() -> list[str]:
    """Names of the registered trainers, in registration order."""
    return list(_TRAINERS)


def trainer_for(config: Any, plan: Any) -> type:
    """The trainer class for a run: the first variant that claims it, else the default trainer.

    Args:
        config: The run's ``TrainConfig``.
        plan: The run's ``Plan`` (after planning, so that a resumed checkpoint's plan counts).
    """
    for entry in _TRAINERS.values():
        if entry.name not in _DEFAULT and entry.matches(config, plan):
            return entry.cls
    if not _DEFAULT:
        raise LookupError("No default trainer is registered (import napari_medseg.engine.training).")
    return _TRAINERS[_DEFAULT[0]].cls


#: Configurations a variant derives from the planner's others when the planner made none.
_DERIVED: dict[str, tuple[Callable[[dict], Any], str]] = {}


def register_derived_configuration(configuration: str, derive: Callable[[dict], Any], message: str = "") -> None:
    """Let a variant supply ``configuration`` when the planner made no plan of that name.

    Called by a trainer variant at import time (e.g. the cascade on the ``3d_fullres`` plan of
    data too small for a low-res stage).

    Args:
        configuration: The configuration name a run may ask for.
        derive: ``plans -> Plan`` (or ``None`` when it cannot be derived from these plans).
        message: Told to the user when the derived plan is used.
    """
    _DERIVED[configuration] = (derive, message)


def derived_configuration(configuration: str) -> tuple[Callable[[dict], Any], str] | None:
    """``(derive, message)`` registered for ``configuration``, or ``None``."""
    return _DERIVED.get(configuration)


__all__ = [
    "TrainerEntry", "derived_configuration", "get_trainer", "list_trainers", "register_derived_configuration",
    "register_trainer", "trainer_for",
]
