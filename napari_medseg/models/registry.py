"""Model registry: architectures by short name, each with a :class:`ModelSpec` (timm's registry).

A factory is a short function ``factory(in_channels, num_classes, spatial_dims, **kwargs)`` that
builds an ``nn.Module``; ``@register_model(spec=...)`` records it. Checkpoints name models by their
registry name, never by a dotted import path. Every keyword a caller passes must be a named
parameter of the factory: nothing is silently ignored.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from napari_medseg.errors import MedsegError

logger = logging.getLogger(__name__)

_RESERVED = ("in_channels", "num_classes", "spatial_dims")


class ModelError(MedsegError, ValueError):
    """Unknown model name, unknown or invalid keyword argument, or unsupported ``spatial_dims``."""


@dataclass(frozen=True)
class ModelSpec:
    """What the GUI, the CLI and the tests need to know about a registered model.

    Attributes:
        name: Registry name, e.g. ``"unet-3d-fullres"``.
        family: Architecture family, e.g. ``"nnunet"``; one file per family.
        spatial_dims: Supported spatial dimensionalities; the first is the default.
        description: One line for lists and tooltips.
        paper: Short reference ("Authors, Title, Venue Year").
        citation: DOI or URL of the paper.
        divisibility: Human-readable input-size constraint, ``None`` when any size works.
        default_kwargs: Keyword arguments applied by :func:`create_model` before the caller's.
        training: Default training recipe (optimizer, lr, epochs, loss, deep_supervision, ...).
        configurable_by_plan: The factory accepts ``pool_kernels`` / ``conv_kernels`` from a Plan.
        min_input: Per spatial_dims, ``(spatial_shape, kwargs)`` giving a tiny valid configuration
            and input, so that contract tests stay fast.
        configuration: The planner configuration this model serves (``"2d"``, ``"3d_fullres"``,
            ``"3d_lowres"``, ``"3d_cascade_fullres"``), if any.
        cascade_from: Configuration whose one-hot prediction (``num_classes - 1`` channels) is
            appended to the image channels; the factory adds these channels itself.
        output_scale: Output spatial size / input spatial size (2 for super-resolving models).
        requires: Optional import names the model needs (e.g. ``"timm"``).
    """

    name: str
    family: str
    spatial_dims: tuple[int, ...]
    description: str
    paper: str
    citation: str
    divisibility: str | None = None
    default_kwargs: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    configurable_by_plan: bool = False
    min_input: dict = field(default_factory=dict)
    configuration: str | None = None
    cascade_from: str | None = None
    output_scale: int = 1
    requires: tuple[str, ...] = ()

    def __hash__(self) -> int:  # dict fields are unhashable; a spec is identified by its name
        return hash((self.name, self.family))

    def tiny(self, spatial_dims: int) -> tuple[tuple[int, ...], dict]:
        """``(spatial_shape, kwargs)`` of a tiny valid configuration for ``spatial_dims``."""
        if spatial_dims not in self.min_input:
            raise ModelError(
                f"Model {self.name!r} has no tiny test input for spatial_dims={spatial_dims}."
            )
        shape, kwargs = self.min_input[spatial_dims]
        return tuple(shape), dict(kwargs)

    def network_in_channels(self, in_channels: int, num_classes: int) -> int:
        """Channels the network's first layer sees (image channels, plus one-hot for a cascade)."""
        return in_channels + (num_classes - 1 if self.cascade_from else 0)


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    spec: ModelSpec
    accepted: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


def _accepted_kwargs(factory: Callable, name: str) -> tuple[str, ...]:
    params = inspect.signature(factory).parameters
    missing = [p for p in _RESERVED if p not in params]
    if missing:
        raise TypeError(f"Factory for {name!r} must take {_RESERVED}; missing {missing}.")
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"Factory for {name!r} must not take **kwargs: name every argument.")
    return tuple(p for p in params if p not in _RESERVED)


def register_model(name: str | None = None, *, spec: ModelSpec) -> Callable:
    """Decorator registering ``factory(in_channels, num_classes, spatial_dims, **kw)`` under a name.

    Args:
        name: Registry name; defaults to ``spec.name`` and must equal it when both are given.
        spec: The model's :class:`ModelSpec`.
    """
    key = name or spec.name
    if key != spec.name:
        raise ValueError(f"register_model name {key!r} differs from spec.name {spec.name!r}.")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        accepted = _accepted_kwargs(factory, key)
        unknown = sorted(set(spec.default_kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"default_kwargs of {key!r} name unknown arguments {unknown}.")
        old = _REGISTRY.get(key)
        if old is not None and old.factory.__qualname__ != factory.__qualname__:
            raise ValueError(
                f"Model name {key!r} is already registered by {old.factory.__qualname__}."
            )
        _REGISTRY[key] = _Entry(factory, spec, accepted)
        return factory

    return decorator


def _entry(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ModelError(f"Unknown model {name!r}.{hint} Available: {', '.join(list_models())}.")


def list_models(family: str | None = None, spatial_dims: int | None = None) -> list[str]:
    """Sorted registry names, optionally only one family or those supporting ``spatial_dims``."""
    return sorted(
        n
        for n, e in _REGISTRY.items()
        if (family is None or e.spec.family == family)
        and (spatial_dims is None or spatial_dims in e.spec.spatial_dims)
    )


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered model (``ModelError`` with close matches if unknown)."""
    return _entry(name).spec


def accepted_kwargs(name: str) -> tuple[str, ...]:
    """Architecture keyword arguments that ``create_model(name, ...)`` accepts."""
    return _entry(name).accepted


def create_model(
    name: str,
    in_channels: int,
    num_classes: int,
    spatial_dims: int | None = None,
    **arch_kwargs,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: Registry name (see :func:`list_models`).
        in_channels: Image channels (a cascade model adds its one-hot channels itself).
        num_classes: Output channels (classes including background).
        spatial_dims: 2 or 3; ``None`` takes the first of ``spec.spatial_dims``.
        **arch_kwargs: Architecture arguments; they override ``spec.default_kwargs``.

    Raises:
        ModelError: unknown name, unknown keyword, unsupported ``spatial_dims`` or invalid counts.
    """
    entry = _entry(name)
    spec = entry.spec
    dims = spec.spatial_dims[0] if spatial_dims is None else spatial_dims
    if dims not in spec.spatial_dims:
        raise ModelError(
            f"Model {name!r} supports spatial_dims {list(spec.spatial_dims)}, not {spatial_dims!r}."
        )
    for what, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{what} must be a positive int, got {value!r}.")
    unknown = [k for k in arch_kwargs if k not in entry.accepted]
    if unknown:
        raise ModelError(
            f"Model {name!r} got unknown argument(s) {unknown}; accepted: "
            f"{', '.join(entry.accepted) or '(none)'}."
        )
    kwargs = {**spec.default_kwargs, **arch_kwargs}
    logger.debug(
        "create_model(%s, in=%d, classes=%d, dims=%d, %s)",
        name,
        in_channels,
        num_classes,
        dims,
        kwargs,
    )
    return entry.factory(
        in_channels=in_channels, num_classes=num_classes, spatial_dims=dims, **kwargs
    )


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
