"""nnU-Net (v1) experiment planning: dataset fingerprint -> plans per configuration.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18, 2021. See ARCHITECTURES.md section 1. The rules and constants
follow nnU-Net v1's ``ExperimentPlanner3D_v21`` / ``ExperimentPlanner2D_v21`` (plans "v2.1"), so
that e.g. MSD Task04 Hippocampus gives the published plans (3D 40x56x40 batch 9, 2D 56x40 batch 366).

Everything here is in napari axis order until the transpose: ``transpose_forward`` puts the
coarsest-spacing axis first, and every tuple in a :class:`Plan` is in that transposed order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from napari_medseg.engine.planning.plan import Plan, PlanningError

logger = logging.getLogger(__name__)


# nnU-Net v1 constants (Generic_UNet and ExperimentPlanner).
VRAM_REF_3D = 520_000_000  # Generic_UNet.use_this_for_batch_size_computation_3D (base width 30)
VRAM_REF_2D = 19_739_648  # Generic_UNet.use_this_for_batch_size_computation_2D
DEFAULT_BATCH_3D, DEFAULT_BATCH_2D = 2, 50
BASE_WIDTH, REF_BASE_WIDTH = 32, 30
MAX_WIDTH_3D, MAX_WIDTH_2D_ESTIMATE = (
    320,
    512,
)  # the 2D planner estimates with 512 (net caps at 480)
MIN_FEATURE_MAP, MAX_NUM_POOL, CONVS_PER_STAGE = 4, 999, 2
MIN_BATCH_SIZE = 2
ANISOTROPY_THRESHOLD = 3
BATCH_MAX_DATASET_FRACTION = 0.05
MASK_NORM_SIZE_REDUCTION = 0.75
PATCH_MM = 512
#: GPU memory (GB) the reference constants correspond to (nnU-Net v2 documents 8 GB for its
#: nearly identical 3D reference); ``memory_budget`` scales the references linearly.
REFERENCE_VRAM_GB = 8.0
# ----------------------------------------------------------------------------- network topology
def get_pool_and_conv_props(
    spacing: Sequence[float],
    patch_size: Sequence[int],
    min_feature_map: int = MIN_FEATURE_MAP,
    max_num_pool: int = MAX_NUM_POOL,
) -> tuple[list[int], list[list[int]], list[list[int]], list[int], list[int]]:
    """Pooling and kernel rule of nnU-Net v2.1 (``get_pool_and_conv_props``).

    Repeatedly pool (factor 2) every axis whose current spacing is < 2x the smallest current
    spacing and whose current size is >= ``2 * min_feature_map``; each pooled axis doubles its
    spacing and halves its size. The kernel of each stage is 3 on the largest group of axes whose
    spacings are within 2x of each other, 1 elsewhere; the bottleneck kernel is always 3.

    Returns:
        ``(num_pool_per_axis, pool_kernels, conv_kernels, padded_patch, divisor)`` where the
        patch is padded up to a multiple of ``divisor = 2 ** num_pool_per_axis``.
    """
    dim = len(spacing)
    cur_sp = [float(s) for s in spacing]
    cur_size = [float(s) for s in patch_size]
    num_pool = [0] * dim
    pools: list[list[int]] = []
    convs: list[list[int]] = []
    while True:
        min_sp = min(cur_sp)
        valid = [i for i in range(dim) if cur_sp[i] / min_sp < 2]
        group: list[int] = []
        for a in range(dim):
            partners = [
                i for i in range(dim) if cur_sp[i] / cur_sp[a] < 2 and cur_sp[a] / cur_sp[i] < 2
            ]
            if len(partners) > len(group):
                group = partners
        kernel = [3 if i in group else 1 for i in range(dim)]
        valid = [
            i for i in valid if cur_size[i] >= 2 * min_feature_map and num_pool[i] < max_num_pool
        ]
        if not valid:
            break
        for i in valid:
            num_pool[i] += 1
            cur_sp[i] *= 2
            cur_size[i] /= 2
        pools.append([2 if i in valid else 1 for i in range(dim)])
        convs.append(kernel)
    convs.append([3] * dim)
    divisor = [2**n for n in num_pool]
    padded = [int(math.ceil(int(s) / q) * q) for s, q in zip(patch_size, divisor)]
    return num_pool, pools, convs, padded, divisor


def estimate_vram(
    patch_size: Sequence[int],
    pool_kernels: Sequence[Sequence[int]],
    base_width: int,
    max_width: int,
    num_channels: int,
    num_classes: int,
    convs_per_stage: int = CONVS_PER_STAGE,
    deep_supervision: bool = False,
) -> int:
    """nnU-Net v1's feature-map-size estimate (``Generic_UNet.compute_approx_vram_consumption``).

    Not bytes: a number proportional to activation memory, compared with the reference constants.
    """
    size = [int(s) for s in patch_size]
    vox = math.prod(size)
    total = (2 * convs_per_stage + 1) * vox * base_width + num_channels * vox + num_classes * vox
    width, n = base_width, len(pool_kernels)
    for p, kernel in enumerate(pool_kernels):
        size = [s // k for s, k in zip(size, kernel)]
        width = min(2 * width, max_width)
        blocks = 2 * convs_per_stage + 1 if p < n - 1 else convs_per_stage
        total += blocks * math.prod(size) * width
        if deep_supervision and p < n - 2:
            total += math.prod(size) * num_classes
    return int(total)


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Median spacing; for a coarse axis (> 3x coarser, < 1/3 the voxels) its 10th percentile."""
    target = np.percentile(spacings, 50, axis=0)
    sizes = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_sp = max(target[i] for i in others)
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * other_sp
    aniso_voxels = sizes[worst] * ANISOTROPY_THRESHOLD < min(sizes[i] for i in others)
    if aniso_spacing and aniso_voxels:
        value = np.percentile(spacings[:, worst], 10)
        if value < other_sp:  # never finer than the other axes
            value = max(other_sp, value) + 1e-5
        target[worst] = value
    return target


# ----------------------------------------------------------------------------- stages
def _shrink_to_budget(spacing, median, patch, ref, width_first, width_loop, max_width, C, K):
    """Shrink the patch axis with the largest patch/median ratio until the estimate fits ``ref``."""
    _, pools, convs, shp, div = get_pool_and_conv_props(spacing, patch)
    here = estimate_vram(shp, pools, width_first, max_width, C, K)
    while here > ref:
        ratios = [s / m for s, m in zip(shp, median)]
        axis = max(range(len(shp)), key=lambda i: (ratios[i], i))  # ties: last axis
        tmp = list(shp)
        tmp[axis] -= div[axis]
        div_new = get_pool_and_conv_props(spacing, tmp)[4]
        shp[axis] -= div_new[axis]
        if shp[axis] < 1:
            raise PlanningError(
                f"The memory budget is too small for any patch (estimate {here}, budget {ref})."
            )
        _, pools, convs, shp, div = get_pool_and_conv_props(spacing, shp)
        here = estimate_vram(shp, pools, width_loop, max_width, C, K)
    return shp, pools, convs, here


def _stage_3d(spacing, original_spacing, median, num_cases, C, K, scale) -> dict:
    spacing = np.asarray(spacing, float)
    new_median = np.round(np.asarray(original_spacing) / spacing * np.asarray(median)).astype(int)
    vox_per_mm = 1.0 / spacing
    vox_per_mm /= vox_per_mm.mean()
    patch = np.round(vox_per_mm / vox_per_mm.min() * PATCH_MM).astype(int)
    patch = [int(min(p, m)) for p, m in zip(patch, new_median)]
    ref = VRAM_REF_3D * BASE_WIDTH / REF_BASE_WIDTH * scale
    shp, pools, convs, here = _shrink_to_budget(
        spacing, new_median, patch, ref, BASE_WIDTH, BASE_WIDTH, MAX_WIDTH_3D, C, K
    )
    batch = int(np.floor(max(ref / here, 1) * DEFAULT_BATCH_3D))
    dataset_vox = int(np.prod(new_median, dtype=np.int64)) * num_cases
    cap = max(
        int(np.round(BATCH_MAX_DATASET_FRACTION * dataset_vox / math.prod(shp))), MIN_BATCH_SIZE
    )
    return {
        "spacing": spacing,
        "median": new_median,
        "patch": shp,
        "pools": pools,
        "convs": convs,
        "batch": min(batch, cap),
        "dummy_2d": max(shp) / shp[0] > ANISOTROPY_THRESHOLD,
    }


def _stage_2d(spacing, median, num_cases, C, K, scale) -> dict:
    spacing = np.asarray(spacing, float)
    new_median = np.round(np.asarray(median)).astype(int)
    ref = VRAM_REF_2D * DEFAULT_BATCH_2D / 2 * scale
    # v2.1 quirk kept for fidelity: the first estimate uses 30 base features, the shrink loop 32.
    shp, pools, convs, here = _shrink_to_budget(
        spacing[1:],
        new_median[1:],
        list(new_median[1:]),
        ref,
        REF_BASE_WIDTH,
        BASE_WIDTH,
        MAX_WIDTH_2D_ESTIMATE,
        C,
        K,
    )
    batch = int(np.floor(ref / here) * 2)
    dataset_vox = int(np.prod(new_median, dtype=np.int64)) * num_cases
    cap = int(np.round(BATCH_MAX_DATASET_FRACTION * dataset_vox / math.prod(shp)))
    return {
        "spacing": spacing,
        "median": new_median,
        "patch": shp,
        "pools": pools,
        "convs": convs,
        "batch": max(1, min(batch, cap)),
        "dummy_2d": False,
    }


# ----------------------------------------------------------------------------- experiment
def _channel_settings(num_channels, modality, intensity_stats, size_reductions, use_mask_for_norm):
    mods = (modality,) if isinstance(modality, str) else tuple(modality)
    if len(mods) == 1:
        mods = mods * num_channels
    if len(mods) != num_channels:
        raise PlanningError(f"modality has {len(mods)} entries for {num_channels} channels.")
    norm = [
        "ct" if m.lower() == "ct" else "none" if m.lower() in ("nonorm", "none") else "zscore"
        for m in mods
    ]
    stats = None
    if intensity_stats is not None:
        if len(intensity_stats) != num_channels:
            raise PlanningError(
                f"intensity_stats has {len(intensity_stats)} entries for {num_channels} channels."
            )
        stats = [
            {k: (float(v) if isinstance(v, (int, float, np.number)) else v) for k, v in s.items()}
            for s in intensity_stats
        ]
    for c, n in enumerate(norm):
        needed = {"mean", "std", "percentile_00_5", "percentile_99_5"}
        if n == "ct" and (stats is None or not needed <= set(stats[c])):
            raise PlanningError(
                f"Channel {c} is CT: intensity_stats[{c}] needs {sorted(needed)} "
                "(see compute_fingerprint)."
            )
    if use_mask_for_norm is None:
        reduced = (
            bool(size_reductions) and float(np.median(size_reductions)) < MASK_NORM_SIZE_REDUCTION
        )
        mask = [reduced and n != "ct" for n in norm]
    elif isinstance(use_mask_for_norm, bool):
        mask = [use_mask_for_norm] * num_channels
    else:
        mask = [bool(m) for m in use_mask_for_norm]
        if len(mask) != num_channels:
            raise PlanningError(
                f"use_mask_for_norm has {len(mask)} entries for {num_channels} channels."
            )
    return norm, stats, mask


@dataclass(frozen=True)
class StageContext:
    """What a stage extender sees of the planning of one data set (transposed order: ``fwd``).

    Attributes:
        target: Target spacing per axis (napari order).
        median: Median shape at the target spacing (napari order).
        fwd: The axis permutation (coarsest axis first).
        full: The full-resolution 3D stage (``spacing``, ``patch``, ``batch``, ``pools``,
            ``convs``, ``median``, ``dummy_2d``, transposed order).
        num_cases, num_channels, num_classes, scale: As for :func:`plan_experiment`.
        make: ``make(configuration, stage, batch_dice, extras=None) -> Plan``.
    """

    target: np.ndarray
    median: np.ndarray
    fwd: list[int]
    full: dict
    num_cases: int
    num_channels: int
    num_classes: int
    scale: float
    make: Callable[..., Plan]

    def stage_3d(self, spacing: np.ndarray) -> dict:
        """The 3D stage (patch, pooling, batch) for data resampled to ``spacing`` (napari order)."""
        return _stage_3d(spacing[self.fwd], self.target[self.fwd], self.median[self.fwd], self.num_cases,
                         self.num_channels, self.num_classes, self.scale)


StageExtender = Callable[[StageContext], dict[str, Plan]]
_STAGE_EXTENDERS: list[StageExtender] = []


def register_stage_extender(extender: StageExtender) -> StageExtender:
    """Register a function that adds configurations to 3D plans (e.g. the cascade's low-res stage
    and its full-res stage). It gets a :class:`StageContext` and returns ``{configuration: Plan}``
    (empty when the data does not call for them). Usable as a decorator."""
    _STAGE_EXTENDERS.append(extender)
    return extender


def plan_experiment(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]],
    num_channels: int,
    num_classes: int,
    modality: Sequence[str] | str = ("MRI",),
    intensity_stats: list[dict] | None = None,
    memory_budget: float | None = None,
    *,
    size_reductions: Sequence[float] | None = None,
    use_mask_for_norm: bool | Sequence[bool] | None = None,
) -> dict[str, Plan]:
    """Plan ``2d``, ``3d_fullres`` and, for large images, ``3d_lowres`` + ``3d_cascade_fullres``.

    Args:
        spacings: Per case, spacing per spatial axis (napari order, mm).
        shapes: Per case, spatial shape after cropping to the nonzero region.
        num_channels: Image channels.
        num_classes: Classes including background.
        modality: Per channel (or one for all): ``"CT"`` gives ``"ct"`` normalisation,
            ``"noNorm"`` gives ``"none"``, anything else ``"zscore"``.
        intensity_stats: Per channel foreground statistics (required for CT channels).
        memory_budget: GPU memory in GB; ``None`` uses nnU-Net's reference (``REFERENCE_VRAM_GB``).
        size_reductions: Per case voxel fraction kept by cropping; non-CT channels normalise inside
            the nonzero mask when the median is < 0.75 (nnU-Net v1).
        use_mask_for_norm: Explicit override of that decision (bool or per channel).

    Returns:
        ``{configuration: Plan}``; 2D-only data (shapes with 2 axes) gives only ``"2d"``.
    """
    sp, sh = np.asarray(spacings, float), np.asarray(shapes, float)
    if sp.ndim != 2 or sp.shape != sh.shape or len(sp) == 0 or sp.shape[1] not in (2, 3):
        raise PlanningError(
            f"spacings {sp.shape} and shapes {sh.shape} must both be (cases, 3) or (cases, 2)."
        )
    if (sp <= 0).any() or (sh < 1).any():
        raise PlanningError("Spacings must be > 0 and shapes >= 1.")
    only_2d = sp.shape[1] == 2
    if only_2d:  # nnU-Net's convention for 2D images: one slice with a huge spacing
        sp = np.concatenate([np.full((len(sp), 1), 999.0), sp], axis=1)
        sh = np.concatenate([np.ones((len(sh), 1)), sh], axis=1)
    scale = (
        REFERENCE_VRAM_GB if memory_budget is None else float(memory_budget)
    ) / REFERENCE_VRAM_GB
    if scale <= 0:
        raise PlanningError(f"memory_budget must be > 0 GB, got {memory_budget!r}.")
    norm, stats, mask = _channel_settings(
        num_channels, modality, intensity_stats, size_reductions, use_mask_for_norm
    )
    target = target_spacing(sp, sh)
    median = np.median(sp / target * sh, axis=0)
    worst = int(np.argmax(target))
    fwd = [worst] + [i for i in range(3) if i != worst]
    bwd = [fwd.index(i) for i in range(3)]
    t_sp, t_med, n = target[fwd], median[fwd], len(sp)
    C, K = num_channels, num_classes

    def make(cfg: str, st: dict, batch_dice: bool, extras: dict | None = None) -> Plan:
        return Plan(
            configuration=cfg,
            spacing=tuple(float(s) for s in st["spacing"]),
            patch_size=tuple(int(p) for p in st["patch"]),
            batch_size=int(st["batch"]),
            pool_kernels=[[int(k) for k in p] for p in st["pools"]],
            conv_kernels=[[int(k) for k in c] for c in st["convs"]],
            normalization=list(norm),
            num_channels=C,
            num_classes=K,
            intensity_stats=stats,
            transpose_forward=list(fwd),
            transpose_backward=list(bwd),
            median_shape=tuple(int(m) for m in st["median"]),
            use_mask_for_norm=list(mask),
            extras=dict(extras or {}),
            batch_dice=batch_dice,
            do_dummy_2d_data_aug=bool(st["dummy_2d"]),
        )

    plans = {"2d": make("2d", _stage_2d(t_sp, t_med, n, C, K, scale), True)}
    if only_2d:
        return plans
    full = _stage_3d(t_sp, t_sp, t_med, n, C, K, scale)
    ctx = StageContext(target, median, fwd, full, n, C, K, scale, make)
    extra = {name: plan for extend in _STAGE_EXTENDERS for name, plan in extend(ctx).items()}
    # nnU-Net v1: the full-resolution stage of data large enough for more stages uses batch Dice.
    plans["3d_fullres"] = make("3d_fullres", full, bool(extra))
    plans.update(extra)
    logger.info("Planned %s", {k: (p.patch_size, p.batch_size) for k, p in plans.items()})
    return plans


def plan_from_fingerprint(
    fingerprint: dict,
    modality: Sequence[str] | str = ("MRI",),
    num_classes: int | None = None,
    memory_budget: float | None = None,
) -> dict[str, Plan]:
    """:func:`plan_experiment` on the output of :func:`compute_fingerprint`."""
    k = num_classes or fingerprint.get("num_classes")
    if not k:
        raise PlanningError(
            "num_classes is unknown: the fingerprint has no labels; pass num_classes."
        )
    return plan_experiment(
        fingerprint["spacings"],
        fingerprint["shapes"],
        fingerprint["num_channels"],
        k,
        modality,
        fingerprint.get("intensity_stats"),
        memory_budget,
        size_reductions=fingerprint.get("size_reductions"),
    )


