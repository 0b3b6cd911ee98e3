"""Experiment planning (nnU-Net v1): the dataset fingerprint, the planner that turns it into one
plan per configuration (2d, 3d_fullres, and the stages that variants add), and the plan files."""

from napari_medseg.engine.planning.fingerprint import compute_fingerprint
from napari_medseg.engine.planning.plan import (
    CONFIGURATION_MODELS,
    PLANNER_VERSION,
    Plan,
    PlanningError,
    plans_from_json,
    plans_to_json,
    register_plan_extra,
)
from napari_medseg.engine.planning.planner import (
    StageContext,
    estimate_vram,
    get_pool_and_conv_props,
    plan_experiment,
    plan_from_fingerprint,
    register_stage_extender,
    target_spacing,
)

__all__ = [
    "CONFIGURATION_MODELS",
    "PLANNER_VERSION",
    "Plan",
    "PlanningError",
    "StageContext",
    "compute_fingerprint",
    "estimate_vram",
    "get_pool_and_conv_props",
    "plan_experiment",
    "plan_from_fingerprint",
    "plans_from_json",
    "plans_to_json",
    "register_plan_extra",
    "register_stage_extender",
    "target_spacing",
]

# Last: the variants import this package's modules and register themselves.
from napari_medseg.engine.planning import variants  # noqa: E402,F401
