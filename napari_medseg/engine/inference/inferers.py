"""Inferers: the strategies :func:`~napari_medseg.engine.inference.predict` chooses between.

An :class:`Inferer` segments one image with a list of checkpoints (MONAI's inferer objects, timm's
registry). :func:`predict` loads the checkpoints, asks :func:`select_inferer` which registered
inferer serves them and runs it; it never names a model or a variant. The default inferer (the
sliding window, :class:`~napari_medseg.engine.inference.window_inferer.SlidingWindowInferer`)
serves every checkpoint no other inferer claims; a variant registers its own inferer from
``inference/variants/`` (the patch-free one claims super-resolving whole-volume models).

This module also holds what every inferer reads from a checkpoint: :func:`plan_of`,
:func:`label_names_of`, :func:`tta_mirror_axes`.

Writing an inferer::

    class MyInferer(Inferer):
        name = "my-inferer"

        def claims(self, ckpt):
            return ckpt.model_name == "my-model"

        def run(self, image, spacing, ckpts, config):
            ...  # yield Progress events, return a PredictionResult

    register_inferer(MyInferer())
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence

import numpy as np

from napari_medseg.engine.checkpoints import Checkpoint, CheckpointError
from napari_medseg.engine.checkpoints.fields import (
    CLASS_WEIGHTS,
    LARGEST_COMPONENT,
    LARGEST_FOREGROUND,
    PAIRED_CLASSES,
)
from napari_medseg.engine.inference.config import InferenceError, PredictConfig
from napari_medseg.engine.inference.postprocessing import (
    PredictionResult,
    finish,
    keep_largest_component,
)
from napari_medseg.engine.jobs import Progress
from napari_medseg.engine.planning import Plan

logger = logging.getLogger(__name__)


class Inferer(ABC):
    """A strategy that segments one image with one checkpoint or an ensemble.

    Subclasses set :attr:`name`, override :meth:`claims` and :meth:`run`, and register an
    instance with :func:`register_inferer`. Instances are shared by every prediction, so they hold
    no per-prediction state.

    Attributes:
        name: Registry name (unique), e.g. ``"sliding_window"``.
    """

    name: str = ""

    def claims(self, ckpt: Checkpoint) -> bool:
        """Hook: whether this inferer serves ``ckpt``.

        Called by :func:`select_inferer` for every checkpoint of a prediction, before anything
        is computed; it must be cheap and must not raise. An inferer that claims any checkpoint of
        an ensemble runs the whole ensemble, so its :meth:`run` must refuse (with a
        :class:`~napari_medseg.engine.checkpoints.format.CheckpointError`) checkpoints it cannot
        serve. The default inferer claims everything; the base class claims nothing.
        """
        return False

    @abstractmethod
    def run(
        self, image: np.ndarray, spacing: tuple[float, ...], ckpts: Sequence[Checkpoint], config: PredictConfig
    ) -> Generator[Progress, None, PredictionResult]:
        """Hook: segment ``image`` with ``ckpts`` under ``config``.

        Called by :func:`~napari_medseg.engine.inference.predict` once per prediction, with the
        image already checked.

        Args:
            image: ``(C, *spatial)`` channels-first, napari axis order; 2 or 3 spatial axes; a
                numeric dtype (integers are kept: preprocessing casts them).
            spacing: One positive spacing (mm) per spatial axis, napari order.
            ckpts: The loaded checkpoints (at least one; all predict the same classes).
            config: The prediction settings.

        Returns:
            A generator that yields :class:`~napari_medseg.engine.jobs.Progress` (stages
            ``"preprocess"``, ``"tiles"``, ``"postprocess"``; the ``"tiles"`` total known up front)
            and returns a :class:`PredictionResult` in the source geometry, with ``label_names``
            (:func:`label_names_of`). Closing the generator must stop the work at its next
            event. A checkpoint that cannot take the image raises ``CheckpointError`` before
            any compute.
        """


_INFERERS: dict[str, Inferer] = {}
_default_name: str | None = None


def register_inferer(inferer: Inferer | type[Inferer], *, default: bool = False) -> Inferer | type[Inferer]:
    """Register an inferer (an instance, or a class, instantiated without arguments).

    Usable as a plain call or as a class decorator (``@register_inferer``); returns its argument.

    Args:
        inferer: The inferer; its ``name`` must be new.
        default: Serve every prediction no other registered inferer claims (the sliding window).
            There is one default; registering another replaces it.

    Raises:
        ValueError: the name is empty or already registered.
    """
    global _default_name
    instance = inferer() if isinstance(inferer, type) else inferer
    if not isinstance(instance, Inferer):
        raise ValueError(f"register_inferer needs an Inferer, got {type(instance).__name__}.")
    if not instance.name or instance.name in _INFERERS:
        raise ValueError(f"Inferer name {instance.name!r} is empty or already registered.")
    _INFERERS[instance.name] = instance
    if default:
        _default_name = instance.name
    return inferer


def unregister_inferer(name: str) -> None:
    """Remove the inferer called ``name`` (a plugin unloading, a test cleaning up); no-op if absent.

    Removing the default leaves none: :func:`select_inferer` then serves only claimed checkpoints.
    """
    global _default_name
    _INFERERS.pop(name, None)
    if name == _default_name:
        _default_name = None


def get_inferer(name: str) -> Inferer:
    """The registered inferer called ``name``.

    Raises:
        InferenceError: no such inferer.
    """
    try:
        return _INFERERS[name]
    except KeyError:
        raise InferenceError(f"No inferer {name!r}; registered: {list_inferers()}.") from None


def list_inferers() -> list[str]:
    """Names of the registered inferers, in registration order."""
    return list(_INFERERS)


def select_inferer(ckpts: Sequence[Checkpoint]) -> Inferer:
    """The inferer that serves ``ckpts``: the one non-default inferer that claims any of them, else
    the default.

    Raises:
        InferenceError: two inferers claim these checkpoints, or none does and no default is
            registered.
    """
    claiming = [
        inf for name, inf in _INFERERS.items()
        if name != _default_name and any(inf.claims(ck) for ck in ckpts)
    ]
    if len(claiming) > 1:
        raise InferenceError(
            f"These checkpoints are claimed by several inferers ({[i.name for i in claiming]}); "
            "predict with them separately."
        )
    if claiming:
        return claiming[0]
    if _default_name is None:
        raise InferenceError("No default inferer is registered.")
    return _INFERERS[_default_name]


# ------------------------------------------------------------------- what inferers read from a checkpoint
def plan_of(ckpt: Checkpoint) -> Plan:
    """The preprocessing :class:`~napari_medseg.engine.planning.planner.Plan` a checkpoint was trained with.

    Raises:
        CheckpointError: the stored plan is invalid, or its patch has another dimensionality than
            the model.
    """
    try:
        plan = Plan.from_dict(ckpt.plan)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"The checkpoint's preprocessing plan is invalid: {err}") from err
    if len(plan.patch_size) != ckpt.spatial_dims:
        raise CheckpointError(
            f"The checkpoint's plan has a {len(plan.patch_size)}D patch but its model is {ckpt.spatial_dims}D."
        )
    return plan


def label_names_of(ckpt: Checkpoint) -> dict[int, str]:
    """Class index -> name for every class of ``ckpt``: its own names, ``"background"`` for 0 and
    ``"class_<i>"`` for the unnamed rest."""
    names = {i: ("background" if i == 0 else f"class_{i}") for i in range(ckpt.num_classes)}
    names.update({int(k): v for k, v in ckpt.label_names.items()})
    return names


def wants_largest_component(config: PredictConfig, ckpt: Checkpoint) -> bool:
    """``config.largest_component`` when the user set it, else the checkpoint's recommendation."""
    if config.largest_component is not None:
        return bool(config.largest_component)
    return bool(ckpt.extra.get(LARGEST_COMPONENT, False))


def component_rule(ckpt: Checkpoint) -> dict:
    """How :func:`keep_largest_component` cleans ``ckpt``'s labels: its ``paired`` classes, the
    left-right ``side_axis`` of its label grid (the axis of R/L in its training orientation, in
    which images with an affine are predicted; else the last axis, napari's x) and whether the
    foreground as a whole goes first (``foreground_first``)."""
    paired = ckpt.extra.get(PAIRED_CLASSES) or ()
    if not all(isinstance(c, int) and 0 < c < ckpt.num_classes for c in paired):
        raise InferenceError(f"Checkpoint extra[{PAIRED_CLASSES!r}] should list foreground classes, not {paired!r}.")
    orientation = ckpt.orientation or ""
    side = next((i for i, code in enumerate(orientation) if code in "RL"), None)
    side_axis = side - len(orientation) if side is not None else -1  # counted from the end: 2D or 3D grids
    return {"paired": tuple(paired), "side_axis": side_axis,
            "foreground_first": bool(ckpt.extra.get(LARGEST_FOREGROUND, False))}


def class_weights_of(ckpt: Checkpoint) -> np.ndarray | None:
    """``ckpt``'s :data:`CLASS_WEIGHTS` (factors on the softmax before the argmax), or ``None``.

    Raises:
        InferenceError: they are not one positive finite number per class.
    """
    weights = ckpt.extra.get(CLASS_WEIGHTS)
    if weights is None:
        return None
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        w = None
    if w is None or w.shape != (ckpt.num_classes,) or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise InferenceError(
            f"Checkpoint extra[{CLASS_WEIGHTS!r}] should be {ckpt.num_classes} positive numbers "
            f"(one per class), not {weights!r}."
        )
    return w


def clean_labels(labels: np.ndarray, config: PredictConfig, ckpt: Checkpoint) -> np.ndarray:
    """``labels`` after the largest-component step when ``config`` or ``ckpt`` asks for it
    (:func:`wants_largest_component`, done as :func:`component_rule` says), else as they are.
    The checkpoint's rule is checked either way."""
    rule = component_rule(ckpt)
    if not wants_largest_component(config, ckpt):
        return labels
    return keep_largest_component(labels, range(1, ckpt.num_classes), **rule)


def finish_ensemble(
    mean: np.ndarray, config: PredictConfig, ckpts: Sequence[Checkpoint]
) -> Generator[Progress, None, PredictionResult]:
    """The last stage of every inferer: labels (and what ``config`` asks for) from the mean softmax
    ``(K, *spatial)`` on the source grid, with the first checkpoint's label names and class
    weights (:func:`class_weights_of`)."""
    yield Progress("postprocess", 0, 1)
    result = finish(mean, False, config.return_probabilities, config.return_uncertainty,
                    class_weights_of(ckpts[0]))
    result.labels = clean_labels(result.labels, config, ckpts[0])
    result.label_names = label_names_of(ckpts[0])
    yield Progress("postprocess", 1, 1)
    return result


def tta_mirror_axes(ckpt: Checkpoint, mirror: bool = True) -> tuple[int, ...]:
    """Patch axes to mirror at test time: those the model was trained to see mirrored (nnU-Net's
    rule), all of them when the checkpoint does not say, none without ``mirror``."""
    if not mirror:
        return ()
    trained = ckpt.train_config.get("mirror_axes")
    return tuple(range(ckpt.spatial_dims)) if trained is None else tuple(int(a) for a in trained)


__all__ = [
    "CLASS_WEIGHTS",
    "LARGEST_COMPONENT",
    "LARGEST_FOREGROUND",
    "PAIRED_CLASSES",
    "Inferer",
    "class_weights_of",
    "clean_labels",
    "component_rule",
    "get_inferer",
    "label_names_of",
    "list_inferers",
    "plan_of",
    "register_inferer",
    "select_inferer",
    "tta_mirror_axes",
    "unregister_inferer",
    "wants_largest_component",
]
