"""The cascade's planning (nnU-Net v1): for data too large for one full-resolution patch to see
enough context, a ``3d_lowres`` stage on coarser spacing and a ``3d_cascade_fullres`` stage that
takes the low-res stage's one-hot prediction as extra input channels."""

from __future__ import annotations

import math

import numpy as np

from napari_medseg.engine.planning.plan import Plan, register_plan_extra
from napari_medseg.engine.planning.planner import StageContext, register_stage_extender

#: Low-res stage: the median image must have at most this many times the patch's voxels.
PATIENT_FRACTION_STAGE0 = 4
LOWRES, CASCADE = "3d_lowres", "3d_cascade_fullres"
#: The plan field naming the configuration whose prediction a cascade stage takes as input.
PREVIOUS_STAGE = register_plan_extra("previous_stage")


def lowres_stage(ctx: StageContext) -> dict | None:
    """nnU-Net v1's low-res stage: coarsen the spacing in 1 % steps until the median image has at
    most 4x the patch's voxels; keep it only if its median has < 1/2 the full-res voxels."""
    target, median, full = ctx.target, ctx.median, ctx.full
    patch_vox = math.prod(full["patch"])
    if np.prod(median) / patch_vox < PATIENT_FRACTION_STAGE0:
        return None
    low_sp, num_vox, low = np.array(target, float), float(np.prod(median)), None
    while num_vox > PATIENT_FRACTION_STAGE0 * patch_vox:
        finer = low_sp.max() / low_sp > 2
        if finer.any():
            low_sp[finer] *= 1.01
        else:
            low_sp *= 1.01
        num_vox = float(np.prod(target / low_sp * median))
        low = ctx.stage_3d(low_sp)
        patch_vox = math.prod(low["patch"])
    if low is not None and 2 * np.prod(low["median"], dtype=np.int64) < np.prod(
        full["median"], dtype=np.int64
    ):
        return low
    return None


@register_stage_extender
def cascade_stages(ctx: StageContext) -> dict[str, Plan]:
    """``3d_lowres`` + ``3d_cascade_fullres`` when :func:`lowres_stage` finds a low-res stage."""
    low = lowres_stage(ctx)
    if low is None:
        return {}
    return {
        LOWRES: ctx.make(LOWRES, low, False),
        CASCADE: ctx.make(CASCADE, ctx.full, True, {PREVIOUS_STAGE: LOWRES}),
    }
