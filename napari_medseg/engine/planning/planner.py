"""nnU-Net (v1) experiment planning: dataset fingerprint -> plans per configuration.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18, 2021. See ARCHITECTURES.md section 1. The rules and constants
follow nnU-Net v1's ``ExperimentPlanner3D_v21`` / ``ExperimentPlanner2D_v21`` (plans "v2.1"), so
that e.g. MSD Task04 Hippocampus gives the published plans (3D 40x56x40 batch 9, 2D 56x40 batch 366).

Everything here is in napari axis order until the transpose: ``transpose_forward`` puts the
coarsest-spacing axis first, and every tuple in a :class:`Plan` is in that transposed order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

PLANNER_VERSION = 1

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
PATIENT_FRACTION_STAGE0 = 4  # low-res stage: median must be <= 4x the patch voxels
BATCH_MAX_DATASET_FRACTION = 0.05
MASK_NORM_SIZE_REDUCTION = 0.75
PATCH_MM = 512
#: GPU memory (GB) the reference constants correspond to (nnU-Net v2 documents 8 GB for its
#: nearly identical 3D reference); ``memory_budget`` scales the references linearly.
REFERENCE_VRAM_GB = 8.0
#: Planner configuration -> registry name of the model that trains on it.
CONFIGURATION_MODELS = {
    "2d": "unet-2d",
    "3d_fullres": "unet-3d-fullres",
    "3d_lowres": "unet-3d-lowres",
    "3d_cascade_fullres": "unet-3d-cascade",
}


class PlanningError(ValueError):
    """Inconsistent dataset description or an impossible plan (e.g. a tiny memory budget)."""


@dataclass
class Plan:
    """One configuration's plan. All tuples are in *transposed* order (see ``transpose_forward``).

    Plain types only, so a plan goes into a checkpoint and a ``plans.json`` unchanged. For ``2d``,
    ``spacing`` and ``median_shape`` still have 3 entries and slices are taken along axis 0.
    ``batch_dice`` and ``do_dummy_2d_data_aug`` are the trainer hints nnU-Net v1 derives.
    ``num_channels`` counts image channels, also for ``3d_cascade_fullres``, whose model adds the
    ``num_classes - 1`` one-hot channels of the ``previous_stage`` prediction itself.
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
    previous_stage: str | None = None
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
        for k in ("spacing", "patch_size", "median_shape"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        d = dict(d)
        for k in ("spacing", "patch_size", "median_shape"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown plan fields {sorted(unknown)}")
        return cls(**d)


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

    def make(cfg: str, st: dict, batch_dice: bool, previous: str | None = None) -> Plan:
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
            previous_stage=previous,
            batch_dice=batch_dice,
            do_dummy_2d_data_aug=bool(st["dummy_2d"]),
        )

    plans = {"2d": make("2d", _stage_2d(t_sp, t_med, n, C, K, scale), True)}
    if only_2d:
        return plans
    full = _stage_3d(t_sp, t_sp, t_med, n, C, K, scale)
    low = _lowres_stage(target, median, fwd, full, n, C, K, scale)
    plans["3d_fullres"] = make("3d_fullres", full, low is not None)
    if low is not None:
        plans["3d_lowres"] = make("3d_lowres", low, False)
        plans["3d_cascade_fullres"] = make("3d_cascade_fullres", full, True, previous="3d_lowres")
    logger.info("Planned %s", {k: (p.patch_size, p.batch_size) for k, p in plans.items()})
    return plans


def _lowres_stage(target, median, fwd, full, n, C, K, scale) -> dict | None:
    """nnU-Net v1's low-res stage: coarsen the spacing in 1 % steps until the median image has at
    most 4x the patch's voxels; keep it only if its median has < 1/2 the full-res voxels."""
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
        low = _stage_3d(low_sp[fwd], target[fwd], median[fwd], n, C, K, scale)
        patch_vox = math.prod(low["patch"])
    if low is not None and 2 * np.prod(low["median"], dtype=np.int64) < np.prod(
        full["median"], dtype=np.int64
    ):
        return low
    return None


# ----------------------------------------------------------------------------- fingerprint
def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """Per spatial axis ``[start, stop)`` of the region where any channel of ``(C, *sp)`` is nonzero
    (the whole image when it is all zero)."""
    nonzero = np.any(image != 0, axis=0)
    if not nonzero.any():
        return [[0, s] for s in nonzero.shape]
    bbox = []
    for ax in range(nonzero.ndim):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(nonzero.ndim) if a != ax)))
        bbox.append([int(hit[0]), int(hit[-1]) + 1])
    return bbox


def _stats(voxels: np.ndarray) -> dict:
    v = voxels.astype(np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "percentile_00_5": float(np.percentile(v, 0.5)),
        "percentile_99_5": float(np.percentile(v, 99.5)),
    }


def compute_fingerprint(cases: Iterable[tuple], sample_every: int = 10) -> dict:
    """Dataset fingerprint as nnU-Net's ``DatasetAnalyzer``, in plain types.

    Args:
        cases: ``(image (C, z, y, x) or (z, y, x), spacing, label or None)`` per case.
        sample_every: Keep every n-th foreground voxel for the intensity statistics (nnU-Net: 10).

    Returns:
        ``num_cases``, ``num_channels``, ``spacings``, ``original_shapes``, ``shapes`` (after
        cropping to nonzero), ``size_reductions``, ``classes`` (labels seen), ``num_classes``
        (max label + 1, ``None`` without labels) and per-channel ``intensity_stats`` (mean, std,
        median, min, max, percentile_00_5, percentile_99_5) of the labels' foreground voxels;
        ``intensity_stats_source`` says ``"all_voxels"`` when no case had foreground.
    """
    fp = {"spacings": [], "original_shapes": [], "shapes": [], "size_reductions": []}
    fg: list[list[np.ndarray]] | None = None
    everything: list[list[np.ndarray]] | None = None
    classes: set[int] = set()
    for i, case in enumerate(cases):
        if len(case) != 3:
            raise PlanningError(
                f"Case {i}: expected (image, spacing, label), got {len(case)} items."
            )
        image, spacing, label = case
        image, nsp = np.asarray(image), len(spacing)
        image = image[None] if image.ndim == nsp else image
        if image.ndim != nsp + 1:
            raise PlanningError(
                f"Case {i}: image shape {image.shape} does not match spacing {tuple(spacing)}."
            )
        if fg is None:
            fg, everything = [[] for _ in image], [[] for _ in image]
        if len(image) != len(fg):
            raise PlanningError(f"Case {i} has {len(image)} channels, earlier cases {len(fg)}.")
        crop = tuple(slice(a, b) for a, b in nonzero_bbox(image))
        cropped = image[(slice(None), *crop)]
        fp["spacings"].append([float(s) for s in spacing])
        fp["original_shapes"].append([int(s) for s in image.shape[1:]])
        fp["shapes"].append([int(s) for s in cropped.shape[1:]])
        fp["size_reductions"].append(float(np.prod(cropped.shape[1:]) / np.prod(image.shape[1:])))
        mask = None
        if label is not None:
            label = np.asarray(label)
            if label.shape != image.shape[1:]:
                raise PlanningError(
                    f"Case {i}: label shape {label.shape} != image shape {image.shape[1:]}."
                )
            classes.update(int(c) for c in np.unique(label))
            mask = label[crop] > 0
        for c in range(len(cropped)):
            if mask is not None:
                fg[c].append(cropped[c][mask][::sample_every])
            everything[c].append(cropped[c].ravel()[::sample_every])
    if fg is None:
        raise PlanningError("compute_fingerprint got no cases.")
    source = "foreground" if sum(a.size for a in fg[0]) else "all_voxels"
    if source == "all_voxels":
        logger.warning("No foreground labels: intensity statistics use all (cropped) voxels.")
    pool = fg if source == "foreground" else everything
    fp.update(
        num_cases=len(fp["spacings"]),
        num_channels=len(fg),
        classes=sorted(classes),
        num_classes=(max(classes) + 1) if classes else None,
        intensity_stats=[_stats(np.concatenate(ch)) for ch in pool],
        intensity_stats_source=source,
    )
    return fp


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


# ----------------------------------------------------------------------------- json
def plans_to_json(
    plans: dict[str, Plan], path: str | os.PathLike, extra: dict | None = None
) -> str:
    """Write ``{planner_version, plans: {configuration: plan dict}, extra}`` atomically."""
    from napari_medseg import __version__

    doc = {
        "planner_version": PLANNER_VERSION,
        "package_version": __version__,
        "plans": {k: p.to_dict() for k, p in plans.items()},
        "extra": extra or {},
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".plans-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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
