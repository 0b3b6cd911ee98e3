"""The dataset fingerprint nnU-Net plans from: spacings, shapes after cropping to the nonzero region,
foreground intensity statistics per channel."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from napari_medseg.engine.planning.plan import PlanningError
from napari_medseg.engine.preprocessing.cropping import bbox_of, bbox_slices

logger = logging.getLogger(__name__)


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


def compute_fingerprint(cases: Iterable[tuple], sample_every: int = 10, ignore_label: int | None = None) -> dict:
    """Dataset fingerprint as nnU-Net's ``DatasetAnalyzer``, in plain types.

    Args:
        cases: ``(image (C, z, y, x) or (z, y, x), spacing, label or None)`` per case.
        sample_every: Keep every n-th foreground voxel for the intensity statistics (nnU-Net: 10).
        ignore_label: A label value that is not foreground (unpainted voxels of partly annotated
            cases: counting them would give a CT the whole body's intensity range, not the organs').

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
        crop = bbox_slices(bbox_of(np.any(image != 0, axis=0)))
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
            if ignore_label is not None:
                mask &= label[crop] != ignore_label
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



__all__ = ["compute_fingerprint"]
