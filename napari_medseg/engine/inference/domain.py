"""Is this image like the ones the model was trained on? A cheap check before any compute.

A checkpoint may record its training **domain** (``Checkpoint.domain``, see
:mod:`napari_medseg.engine.checkpoints.fields`): the modality, the voxel sizes and fields of view,
the raw (unnormalised) intensity percentiles of the labelled foreground, and the fraction of
*strongly negative* voxels. The trainer computes it from its cases (:func:`case_domain_stats` per
case, :func:`summarise_domain` over them); :func:`check_domain` compares an input with it and gives
one line per thing that is far off. :func:`~napari_medseg.engine.inference.predict` raises
:class:`~napari_medseg.engine.inference.config.DomainError` with those lines unless ``force=True``.

What counts as far off (deliberately coarse: a warning the user can override, never a silent
refusal of an unusual but valid image):

* **voxel size**: an axis at least 2.5 times coarser than the coarsest training spacing along it,
  or finer than 0.4 times the finest (5 mm slices into a 1 mm model, or into the shipped model,
  trained at 2 mm and fitted on 1 mm images);
* **negative intensities**: the image has many strongly negative voxels (CT in Hounsfield units:
  air near -1000) while the training images had none (MRI). MRI intensities are arbitrary units,
  so their *scale* is never compared (a scanner writing 0..4000 instead of 0..255 passes): a voxel
  is strongly negative when it is below -5 % of the image's own intensity scale
  (``max(|p0.5|, |p99.5|)``). Into a channel the model z-scores per image, negatives count only
  when they reach Hounsfield air (the 0.5th percentile at or below :data:`HU_AIR_LIKE`): an MRI
  already normalised to zero mean (background near -1) is the same image to such a model up to an
  offset and a scale, so it passes;
* **no negative intensities** into a CT-normalised channel trained on images with many of them
  (an MRI into a CT model, or a CT stored without its rescale to Hounsfield units).

Everything is measured on a strided subsample of at most :data:`MAX_SAMPLES` voxels per channel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_medseg.engine.checkpoints import Checkpoint, as_checkpoint
from napari_medseg.engine.preprocessing.normalization import scheme_of

__all__ = [
    "MAX_SAMPLES",
    "case_domain_stats",
    "check_domain",
    "intensity_features",
    "merge_domains",
    "summarise_domain",
]

#: Voxels sampled per channel (a regular stride over the whole image).
MAX_SAMPLES = 200_000
#: Foreground voxels kept per case and channel for the training percentiles.
FOREGROUND_SAMPLES = 10_000
PERCENTILES = ("0.5", "50", "99.5")
#: A voxel is strongly negative below ``-NEGATIVE_LEVEL * max(|p0.5|, |p99.5|)`` of its image.
NEGATIVE_LEVEL = 0.05
#: Spacing factors beyond which an axis is far from the training's.
COARSER, FINER = 2.5, 0.4
#: Training "without negative values": at most this fraction strongly negative; an input "with many": at least.
TRAINED_NON_NEGATIVE, MANY_NEGATIVE = 0.001, 0.02
#: A CT channel trained "with many negative values" (air): at least this fraction.
TRAINED_NEGATIVE = 0.05
#: Lows at or below this look like air in Hounsfield units (-1000), not a zero-mean MRI (about -1).
HU_AIR_LIKE = -500.0


def _subsample(channel: np.ndarray, max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """A strided subsample (at most about ``max_samples`` voxels) of ``channel``, finite values only, float64."""
    channel = np.asarray(channel)
    size = max(int(channel.size), 1)
    step = max(1, math.ceil((size / max_samples) ** (1.0 / max(channel.ndim, 1))))
    values = np.asarray(channel[(slice(None, None, step),) * channel.ndim], dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def _negative_fraction(values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    lo, hi = np.percentile(values, [0.5, 99.5])
    scale = max(abs(float(lo)), abs(float(hi)))
    if scale <= 0:
        return 0.0
    return float(np.mean(values < -NEGATIVE_LEVEL * scale))


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {k: None for k in PERCENTILES}
    return {k: float(v) for k, v in zip(PERCENTILES, np.percentile(values, [float(k) for k in PERCENTILES]))}


def intensity_features(channel: np.ndarray) -> dict:
    """Scale-free features of one channel: ``{"intensity_percentiles", "strongly_negative_fraction",
    "negative_fraction"}`` (the last: any value below 0), from a strided subsample."""
    values = _subsample(channel)
    return {
        "intensity_percentiles": _percentiles(values),
        "strongly_negative_fraction": _negative_fraction(values),
        "negative_fraction": float(np.mean(values < 0)) if values.size else 0.0,
    }


def case_domain_stats(
    image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], seed: int = 0
) -> dict:
    """What one training case contributes to the domain (raw intensities, before normalisation).

    Args:
        image: ``(C, *spatial)`` raw image in the training layout.
        label: Its label map (foreground: values > 0), or ``None``.
        spacing: Spacing per spatial axis.
        seed: Seed of the foreground subsample.

    Returns:
        ``{"spacing", "field_of_view", "foreground": [samples per channel], "negative": [fraction per channel]}``.
    """
    image = np.asarray(image)
    spacing = [float(s) for s in spacing]
    spatial = image.shape[-len(spacing):]
    rng = np.random.default_rng(seed)
    mask = np.asarray(label) > 0 if label is not None else None
    foreground, negative = [], []
    for channel in image.reshape((-1, *spatial)):
        values = channel[mask] if mask is not None and mask.any() else _subsample(channel)
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size > FOREGROUND_SAMPLES:
            values = rng.choice(values, FOREGROUND_SAMPLES, replace=False)
        foreground.append(values.astype(np.float32))  # kept per case until the summary: small
        negative.append(_negative_fraction(_subsample(channel)))
    return {
        "spacing": spacing,
        "field_of_view": [float(n) * s for n, s in zip(spatial, spacing)],
        "foreground": foreground,
        "negative": negative,
    }


def summarise_domain(stats: Sequence[dict], modality: str | None = None) -> dict | None:
    """The checkpoint's ``domain`` from the :func:`case_domain_stats` of every training case.

    Returns:
        The plain domain dict (:mod:`napari_medseg.engine.checkpoints.fields`), or ``None`` without cases.
    """
    stats = [s for s in stats if s]
    if not stats:
        return None
    spacings = np.asarray([s["spacing"] for s in stats if len(s["spacing"]) == len(stats[0]["spacing"])])
    fovs = np.asarray([s["field_of_view"] for s in stats if len(s["field_of_view"]) == len(stats[0]["field_of_view"])])
    channels = []
    for c in range(min(len(s["foreground"]) for s in stats)):
        values = np.concatenate([s["foreground"][c] for s in stats])
        channels.append({
            "intensity_percentiles": _percentiles(values),
            "strongly_negative_fraction": float(np.mean([s["negative"][c] for s in stats])),
        })
    domain = {
        "modality": modality,
        "spacing_mm": [spacings.min(0).tolist(), spacings.max(0).tolist()],
        "field_of_view_mm": [fovs.min(0).tolist(), fovs.max(0).tolist()],
        **(channels[0] if channels else {}),
        "num_cases": len(stats),
    }
    if len(channels) > 1:
        domain["channels"] = channels
    return domain


def _ranges(a: Any, b: Any) -> Any:
    if not a or not b or len(a[0]) != len(b[0]):
        return a or b
    return [np.minimum(a[0], b[0]).tolist(), np.maximum(a[1], b[1]).tolist()]


def _mean_fraction(a: dict, b: dict, na: int, nb: int) -> float | None:
    fa, fb = a.get("strongly_negative_fraction"), b.get("strongly_negative_fraction")
    if fa is None or fb is None:
        return fa if fb is None else fb
    return (fa * na + fb * nb) / (na + nb)


def merge_domains(first: dict | None, second: dict | None) -> dict | None:
    """The domain of a model fitted on the images of both: spacing and field-of-view ranges joined,
    cases added, strongly negative fractions averaged over the cases; the intensity percentiles
    (and unknown keys) of the one with more cases; ``None`` only when both are.

    Used for a fine-tune on the parent's classes (the parent's images and the new ones) and for a
    checkpoint fitted after training on other images than its training set (the shipped model's
    class weights, on 1 mm images).
    """
    if not first or not second:
        return first or second
    na, nb = int(first.get("num_cases") or 1), int(second.get("num_cases") or 1)
    merged = dict(first if na >= nb else second)
    for key in ("spacing_mm", "field_of_view_mm"):
        merged[key] = _ranges(first.get(key), second.get(key))
    fraction = _mean_fraction(first, second, na, nb)
    if fraction is not None:
        merged["strongly_negative_fraction"] = fraction
    ca, cb = first.get("channels"), second.get("channels")
    if ca and cb and len(ca) == len(cb):
        merged["channels"] = [
            {**(x if na >= nb else y), "strongly_negative_fraction": _mean_fraction(x, y, na, nb)}
            for x, y in zip(ca, cb)
        ]
    modalities = [m for m in (first.get("modality"), second.get("modality")) if m]
    merged["modality"] = modalities[0] if len(set(modalities)) == 1 else (", ".join(modalities) or None)
    merged["num_cases"] = na + nb
    return merged


# -------------------------------------------------------------------------------------------- check
def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def _spacing_reasons(spacing: Sequence[float], trained: Any) -> list[str]:
    if not trained:
        return []
    lo, hi = (list(v) for v in trained)
    n = min(len(lo), len(spacing))
    mine = list(spacing)[-n:]
    lo, hi = lo[-n:], hi[-n:]
    far = [a for a in range(n) if mine[a] >= COARSER * hi[a] or mine[a] < FINER * lo[a]]
    if not far:
        return []
    ranges = " x ".join(f"{a:.3g}" if math.isclose(a, b, rel_tol=1e-3) else f"{a:.3g}-{b:.3g}" for a, b in zip(lo, hi))
    how = ", ".join(
        f"axis {a} coarser by at least {COARSER:.3g}x" if mine[a] > hi[a] else f"axis {a} finer by more than {1 / FINER:.3g}x"
        for a in far
    )
    return [f"voxel size {_mm(mine)} mm, trained on {ranges} mm ({how})"]


def _intensity_reasons(image: np.ndarray, domain: dict, normalization: Sequence[Any]) -> list[str]:
    channels = domain.get("channels") or [domain]
    what = domain.get("modality") or "its training images"
    reasons = []
    for c in range(min(len(channels), image.shape[0])):
        trained = channels[c].get("strongly_negative_fraction")
        if trained is None:
            continue
        mine = intensity_features(image[c])
        name = f"channel {c}" if image.shape[0] > 1 else "the image"
        low = mine["intensity_percentiles"]["0.5"]
        scheme = scheme_of(normalization[c]) if c < len(normalization) else None
        offset_free = scheme == "zscore" and low is not None and low > HU_AIR_LIKE
        if trained <= TRAINED_NON_NEGATIVE and mine["strongly_negative_fraction"] >= MANY_NEGATIVE and not offset_free:
            reasons.append(
                f"{name} has {100 * mine['strongly_negative_fraction']:.0f} % strongly negative voxels "
                f"(down to {low:.4g}; CT in Hounsfield units?) but the model ({what}) was trained on "
                "images without negative values"
            )
        is_ct = scheme == "ct"
        if is_ct and trained >= TRAINED_NEGATIVE and mine["negative_fraction"] == 0:
            reasons.append(
                f"{name} has no negative values but the model ({what}) was trained on Hounsfield units "
                "(air near -1000): not CT, or CT without its rescale to Hounsfield units?"
            )
    return reasons


def check_domain(
    image: np.ndarray, spacing: Sequence[float], checkpoint: Checkpoint | str | os.PathLike
) -> list[str]:
    """Reasons (one line each) why ``image`` lies far outside ``checkpoint``'s training domain.

    Args:
        image: ``(C, *spatial)`` or ``(*spatial)`` raw image, napari order, in the checkpoint's
            training orientation (``predict`` reorients first).
        spacing: Spacing per spatial axis, same order.
        checkpoint: A :class:`Checkpoint` or its path.

    Returns:
        ``[]`` when nothing is far off, or when the checkpoint records no domain (older files).
    """
    ckpt = as_checkpoint(checkpoint)
    domain = ckpt.domain
    if not domain:
        return []
    image = np.asarray(image)
    if image.ndim == len(spacing):
        image = image[None]
    normalization = (ckpt.plan or {}).get("normalization") or []
    return _spacing_reasons(spacing, domain.get("spacing_mm")) + _intensity_reasons(image, domain, normalization)
