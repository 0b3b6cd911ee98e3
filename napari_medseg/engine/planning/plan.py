"""The plan of one configuration (patch, spacing, pooling, normalisation) and its JSON file."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from napari_medseg import __version__
from napari_medseg.errors import MedsegError
from napari_medseg.io.atomic import atomic_write_json

PLANNER_VERSION = 1
#: Plan fields that pipeline variants own (stored flat, read back into ``Plan.extras``).
_EXTRA_FIELDS: set[str] = set()


def register_plan_extra(name: str) -> str:
    """Declare ``name`` a plan field that a variant owns: plan files and checkpoints may carry it,
    and :meth:`Plan.from_dict` puts it into ``Plan.extras`` (other unknown fields are refused)."""
    _EXTRA_FIELDS.add(name)
    return name

#: Planner configuration -> registry name of the model that trains on it.
CONFIGURATION_MODELS = {
    "2d": "unet-2d",
    "3d_fullres": "unet-3d-fullres",
    "3d_lowres": "unet-3d-lowres",
    "3d_cascade_fullres": "unet-3d-cascade",
}


class PlanningError(MedsegError, ValueError):
    """Inconsistent dataset description or an impossible plan (e.g. a tiny memory budget)."""


@dataclass
class Plan:
    """One configuration's plan. All tuples are in *transposed* order (see ``transpose_forward``).

    Plain types only, so a plan goes into a checkpoint and a ``plans.json`` unchanged. For ``2d``,
    ``spacing`` and ``median_shape`` still have 3 entries and slices are taken along axis 0.
    ``batch_dice`` and ``do_dummy_2d_data_aug`` are the trainer hints nnU-Net v1 derives.
    ``num_channels`` counts image channels. ``extras`` holds settings that a pipeline variant owns
    (plain types, e.g. the configuration a cascade stage builds on); they are stored flat beside the
    other fields, and a field this version does not know is read back into ``extras``.
    """

    configuration: str
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    pool_kernels: list[list[int]]
    conv_kernels: list[list[int]]
    normalization: list[str]
    num_channels: int = 1
    num_classes: int = 2
    intensity_stats: list[dict] | None = None
    transpose_forward: list[int] = field(default_factory=lambda: [0, 1, 2])
    transpose_backward: list[int] = field(default_factory=lambda: [0, 1, 2])
    median_shape: tuple[int, ...] = ()
    use_mask_for_norm: list[bool] = field(default_factory=lambda: [False])
    extras: dict = field(default_factory=dict)
    batch_dice: bool = False
    do_dummy_2d_data_aug: bool = False

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    @property
    def model_name(self) -> str | None:
        """Registry name of the model for this configuration (``None`` if unknown)."""
        return CONFIGURATION_MODELS.get(self.configuration)

    def model_kwargs(self) -> dict:
        """The architecture kwargs a plan-configurable model takes from this plan."""
        return {
            "pool_kernels": [list(k) for k in self.pool_kernels],
            "conv_kernels": [list(k) for k in self.conv_kernels],
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        extras = d.pop("extras")
        for k in ("spacing", "patch_size", "median_shape"):
            d[k] = list(d[k])
        d.update({k: v for k, v in extras.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        d = dict(d)
        for k in ("spacing", "patch_size", "median_shape"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        known = set(cls.__dataclass_fields__) - {"extras"}
        extras = dict(d.pop("extras", None) or {})
        extras.update({k: d.pop(k) for k in sorted(set(d) & _EXTRA_FIELDS)})
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown plan fields {sorted(unknown)}")
        return cls(**d, extras={k: v for k, v in extras.items() if v is not None})


# ----------------------------------------------------------------------------- json
def plans_to_json(
    plans: dict[str, Plan], path: str | os.PathLike, extra: dict | None = None
) -> str:
    """Write ``{planner_version, plans: {configuration: plan dict}, extra}`` atomically."""
    doc = {
        "planner_version": PLANNER_VERSION,
        "package_version": __version__,
        "plans": {k: p.to_dict() for k, p in plans.items()},
        "extra": extra or {},
    }
    path = os.fspath(path)
    atomic_write_json(path, doc)
    return path


def plans_from_json(path: str | os.PathLike) -> dict[str, Plan]:
    """Read plans written by :func:`plans_to_json`."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("plans"), dict):
        raise PlanningError(f"{os.fspath(path)!r} is not a plans file (no 'plans' mapping).")
    version = doc.get("planner_version")
    if not isinstance(version, int) or version > PLANNER_VERSION:
        raise PlanningError(
            f"{os.fspath(path)!r} has planner_version {version!r}; this package reads "
            f"<= {PLANNER_VERSION}."
        )
    return {k: Plan.from_dict(v) for k, v in doc["plans"].items()}

__all__ = ["CONFIGURATION_MODELS", "PLANNER_VERSION", "Plan", "PlanningError", "plans_from_json", "register_plan_extra", "plans_to_json"]
