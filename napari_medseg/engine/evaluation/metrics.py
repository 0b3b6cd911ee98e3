"""Segmentation metrics: Dice per class and the 95th-percentile Hausdorff distance (HD95) in mm.

HD95 follows medpy's ``hd95`` (also MONAI's surface-distance definition): the surface of a mask is
its voxels that have a background 6-neighbour (4-neighbour in 2D; the image border counts as
background); distances from every surface voxel of one mask to the nearest surface voxel of the
other are computed with ``scipy.ndimage.distance_transform_edt(sampling=spacing)``, both directions
are pooled, and their 95th percentile (linear interpolation) is returned.

Conventions for empty masks: both empty -> NaN (nothing to measure; Dice is NaN too), exactly one
empty -> ``inf`` (the prediction missed or hallucinated the structure entirely). Means skip NaN and
keep ``inf``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from napari_medseg.engine.data import DATASET_FILE_ENDINGS
from napari_medseg.engine.data.dataset import read_label_volume
from napari_medseg.errors import MedsegError
from napari_medseg.io.grid import volume_grid_difference

logger = logging.getLogger(__name__)


class EvaluationError(MedsegError, ValueError):
    """Predictions and references that cannot be compared (missing files, other shapes)."""


def dice_per_class(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice ``2|P∩R| / (|P| + |R|)`` of every label; NaN where both masks are empty."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise EvaluationError(f"Prediction shape {pred.shape} differs from reference shape {ref.shape}")
    out = {}
    for lab in labels:
        p, r = pred == lab, ref == lab
        denom = int(p.sum()) + int(r.sum())
        out[int(lab)] = float("nan") if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom
    return out


def mask_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face-neighbour outside it (or on the image border)."""
    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from pred's surface voxels to ref's surface, and from ref's to pred's.

    Both masks must be non-empty. The distance transforms run on the union bounding box only.
    """
    pred_mask, ref_mask = np.asarray(pred_mask, bool), np.asarray(ref_mask, bool)
    if pred_mask.shape != ref_mask.shape:
        raise EvaluationError(f"Mask shapes differ: {pred_mask.shape} vs {ref_mask.shape}")
    spacing = tuple(float(s) for s in (spacing if spacing is not None else [1.0] * pred_mask.ndim))
    if len(spacing) != pred_mask.ndim:
        raise EvaluationError(f"Spacing {spacing} does not have one entry per axis of {pred_mask.shape}")
    union = pred_mask | ref_mask
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(union))
    sp, sr = mask_surface(pred_mask[box]), mask_surface(ref_mask[box])
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_ref[sp], to_pred[sr]


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (medpy's definition, see the module doc).

    Args:
        pred_mask: Boolean mask of the prediction.
        ref_mask: Boolean mask of the reference, same shape.
        spacing: Voxel spacing per axis (mm); default 1.

    Returns:
        The distance; NaN when both masks are empty, ``inf`` when exactly one is.
    """
    p_any, r_any = bool(np.any(pred_mask)), bool(np.any(ref_mask))
    if not p_any and not r_any:
        return float("nan")
    if p_any != r_any:
        return float("inf")
    d1, d2 = surface_distances(pred_mask, ref_mask, spacing)
    return float(np.percentile(np.concatenate([d1, d2]), 95))


def nan_mean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN (NaN when none is)."""
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def evaluate_case(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Mapping[int, str]
) -> dict[str, dict[str, float]]:
    """``{label_name: {"dice": ..., "hd95": ...}}`` of one case for the given labels."""
    dice = dice_per_class(pred, ref, list(labels))
    return {
        name: {"dice": dice[int(lab)], "hd95": hd95(pred == lab, ref == lab, spacing)}
        for lab, name in labels.items()
    }


def _label_files(folder: str) -> dict[str, str]:
    """``{case name: path}`` of the label files in ``folder`` (the endings a dataset may use)."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith("."):
            continue
        for end in DATASET_FILE_ENDINGS:
            if f.endswith(end):
                out[f[: -len(end)]] = os.path.join(folder, f)
                break
    return out


def evaluate_folder(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    labels: Mapping[int, str],
    include_background: bool = False,
) -> dict:
    """Compare every reference label map with the prediction of the same name.

    Args:
        pred_dir: Folder of predicted label maps (``{case}.nii.gz``).
        ref_dir: Folder of reference label maps; every one needs a prediction.
        labels: ``{value: name}`` (e.g. dataset.json's labels).
        include_background: Also evaluate label 0.

    Returns:
        ``{"cases": {case: {label_name: {"dice", "hd95"}}}, "mean": {label_name: {"dice", "hd95"}},
        "foreground_mean_dice": float}``; HD95 in mm using the reference's spacing.

    Raises:
        EvaluationError: no references, missing predictions, or a prediction on another grid than
            its reference (shape, voxel size, axis directions or origin: compared as the training
            data are, :func:`napari_medseg.io.grid.grid_difference`).
    """
    pred_dir, ref_dir = os.fspath(pred_dir), os.fspath(ref_dir)
    for d in (pred_dir, ref_dir):
        if not os.path.isdir(d):
            raise EvaluationError(f"{d} is not a folder")
    refs, preds = _label_files(ref_dir), _label_files(pred_dir)
    if not refs:
        raise EvaluationError(f"No label maps ({', '.join(DATASET_FILE_ENDINGS)}) in {ref_dir}")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise EvaluationError(f"{len(missing)} reference case(s) have no prediction in {pred_dir}: {missing[:5]}")
    evaluated = {int(k): str(v) for k, v in labels.items() if include_background or int(k) != 0}
    cases = {}
    for name, ref_path in refs.items():
        ref_vol, pred_vol = read_label_volume(ref_path), read_label_volume(preds[name])
        problem = volume_grid_difference(pred_vol, ref_vol, ref_name="the reference's")
        if problem:  # Dice and HD95 of voxels that are not the same place mean nothing
            raise EvaluationError(
                f"Case {name}: the prediction {preds[name]} is not on the reference's grid ({ref_path}): {problem}. "
                "Predict on the reference's image (or resample the prediction onto it)."
            )
        ref, pred = np.asarray(ref_vol.data), np.asarray(pred_vol.data)
        cases[name] = evaluate_case(pred, ref, ref_vol.spacing, evaluated)
        logger.debug("evaluated %s: %s", name, cases[name])
    mean = {
        lname: {m: nan_mean([c[lname][m] for c in cases.values()]) for m in ("dice", "hd95")}
        for lname in evaluated.values()
    }
    fg = [mean[n]["dice"] for lab, n in evaluated.items() if lab != 0]
    return {"cases": cases, "mean": mean, "foreground_mean_dice": nan_mean(fg)}


def _fmt(v: float, digits: int) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def format_table(result: dict, per_case: bool = True) -> str:
    """A plain-text table of :func:`evaluate_folder`'s result (one row per case, then the mean)."""
    names = list(result["mean"])
    header = ["case"] + [f"{n} {m}" for n in names for m in ("Dice", "HD95")]
    rows = []
    if per_case:
        for case, res in result["cases"].items():
            rows.append([case] + [_fmt(res[n][m], 4 if m == "dice" else 2) for n in names
                                  for m in ("dice", "hd95")])
    rows.append(["mean"] + [_fmt(result["mean"][n][m], 4 if m == "dice" else 2) for n in names
                            for m in ("dice", "hd95")])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "-" * len(line(header))]
    out += [line(r) for r in rows]
    out.append(f"foreground mean Dice: {_fmt(result['foreground_mean_dice'], 4)}")
    return "\n".join(out)
