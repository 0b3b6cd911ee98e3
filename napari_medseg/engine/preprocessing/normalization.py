"""Intensity normalisation (nnU-Net v1): CT clipping to the foreground's 0.5-99.5 percentiles and
the dataset's z-score, or a per-image z-score (inside the nonzero mask when the plan says so)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from napari_medseg.engine.planning.plan import Plan
from napari_medseg.errors import MedsegError

_NORM_ALIASES = {"ct": "ct", "zscore": "zscore", "nonct": "zscore", "none": "none", "nonorm": "none"}


def scheme_of(name: object) -> str | None:
    """The normalisation scheme a plan's entry names (``"ct"``, ``"zscore"``, ``"none"``; nnU-Net's
    aliases ``"nonCT"``, ``"noNorm"`` included), or ``None`` for an unknown name."""
    return _NORM_ALIASES.get(str(name).lower())


class PreprocessingError(MedsegError, ValueError):
    """The image, label map, spacing or plan given to preprocessing do not fit together."""


def per_channel(values: Sequence, n: int, what: str) -> list:
    values = list(values)
    if len(values) == 1 and n > 1:
        values = values * n
    if len(values) != n:
        raise PreprocessingError(f"The plan has {len(values)} {what} entries for {n} image channels")
    return values


@dataclass(frozen=True)
class ChannelNorm:
    """How one channel is normalised: ``scheme`` ``"ct"`` (clip to ``[lo, hi]``, then
    ``(x - mean) / std``), ``"zscore"`` (``(x - mean) / std``) or ``"none"``; ``masked``: voxels
    outside the nonzero mask are set to 0 afterwards."""

    scheme: str
    mean: float = 0.0
    std: float = 1.0
    lo: float = -np.inf
    hi: float = np.inf
    masked: bool = False

    @property
    def extreme(self) -> bool:
        """Statistics so large that float32 arithmetic could overflow (values near float32's limit)."""
        values = [self.mean, self.std] + [v for v in (self.lo, self.hi) if np.isfinite(v)]
        return max(abs(float(v)) for v in values) > EXTREME

    def apply(self, x: np.ndarray, out: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Normalise ``x`` into float32 ``out`` (same shape): in-place float32 arithmetic, or float64
        slice by slice when the statistics are :attr:`extreme` (values near 1e38 would overflow)."""
        if self.extreme and self.scheme != "none":
            self._apply_float64(x, out)
        else:
            self._apply_float32(x, out)
        if self.masked and mask is not None:
            out[~mask] = 0
        return out

    def _apply_float64(self, x: np.ndarray, out: np.ndarray) -> None:
        flat_in, flat_out = (x[None], out[None]) if x.ndim == 0 else (x, out)
        for i in range(len(flat_in)):
            v = np.asarray(flat_in[i], dtype=np.float64)
            if self.scheme == "ct":
                flat_out[i] = (np.clip(v, self.lo, self.hi) - self.mean) / max(self.std, 1e-8)
            else:
                flat_out[i] = (v - self.mean) / (self.std + 1e-8)

    def _apply_float32(self, x: np.ndarray, out: np.ndarray) -> None:
        if x.dtype.itemsize < 8 or x.dtype.kind != "f":  # float64 is narrowed by the ufuncs below
            x = x.astype(np.float32, copy=False)
        if self.scheme == "ct":
            np.clip(x, self.lo, self.hi, out=out)
            out -= self.mean
            out /= max(self.std, 1e-8)
        elif self.scheme == "zscore":
            np.subtract(x, self.mean, out=out)
            out /= self.std + 1e-8
        else:
            out[...] = x


#: Statistics beyond this magnitude take the float64 path (float32 arithmetic could overflow).
EXTREME = 1e18
_CHUNK = 1 << 20


#: Hounsfield units: air is -1000 (scanners pad with -1024 ... -3024); an MR channel is never this negative.
HU_AIR, HU_FLOOR = -900.0, -3100.0


def guess_modality(channel: np.ndarray, max_samples: int = 1 << 18) -> str:
    """``"CT"`` when ``channel`` holds Hounsfield units (air), else ``"MRI"`` (z-score normalisation).

    For arrays that come without a modality (napari layers, ``(image, labels, spacing)`` tuples): a
    CT in HU normalised by z-score squeezes every soft tissue into a few hundredths, where the
    organs cannot be told apart. HU: at least 1 % of the voxels at or below air (-900) and none
    below the scanners' padding (-3100); a strided subsample decides.
    """
    channel = np.asarray(channel)
    step = max(1, int(np.ceil((channel.size / max_samples) ** (1.0 / max(channel.ndim, 1)))))
    values = np.asarray(channel[(slice(None, None, step),) * channel.ndim], dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() < HU_FLOOR:
        return "MRI"
    return "CT" if np.mean(values <= HU_AIR) >= 0.01 and values.max() > 0 else "MRI"


def mean_std(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of ``x``. numpy's (in ``x``'s float type) when they are finite and
    moderate; else accumulated in float64, scaled, in chunks along the first axis (no full-size
    float64 copy): float32 sums of values near 1e38 overflow to infinity."""
    if x.dtype.kind in "biuf":
        xf = x if x.dtype.kind == "f" else x.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            mean, std = float(xf.mean()), float(xf.std())
        del xf
        if np.isfinite(mean) and np.isfinite(std) and max(abs(mean), std) <= EXTREME:
            return mean, std
    x = x[None] if x.ndim == 0 else x
    step = max(1, _CHUNK // max(1, x[0].size))
    chunks = [slice(i, i + step) for i in range(0, len(x), step)]
    total, scale = 0.0, 0.0
    for sl in chunks:
        chunk = x[sl].astype(np.float64)
        total += float(chunk.sum())
        scale = max(scale, float(np.abs(chunk).max()) if chunk.size else 0.0)
    mean = total / x.size
    scale = scale or 1.0  # squares of values near float64's limit would overflow: sum them scaled
    squares = 0.0
    for sl in chunks:
        d = ((x[sl].astype(np.float64) - mean) / scale).ravel()
        squares += float(np.vdot(d, d))
    return mean, float(scale * np.sqrt(squares / x.size))


def normalization_params(image: np.ndarray, plan: Plan, mask: np.ndarray | None = None) -> list[ChannelNorm]:
    """Per-channel :class:`ChannelNorm` of ``image`` ``(C, *spatial)`` under the plan's scheme
    (``zscore`` reads the image's own mean and std, inside ``mask`` where ``use_mask_for_norm``)."""
    n = image.shape[0]
    schemes = per_channel(plan.normalization, n, "normalization")
    use_mask = per_channel(plan.use_mask_for_norm or [False], n, "use_mask_for_norm")
    params = []
    for c in range(n):
        scheme = scheme_of(schemes[c])
        masked = bool(use_mask[c]) and mask is not None
        if scheme is None:
            raise PreprocessingError(
                f"Unknown normalization {schemes[c]!r} for channel {c}; use 'ct', 'zscore' or 'none'"
            )
        if scheme == "ct":
            all_stats = plan.intensity_stats or []
            stats = all_stats[c] if c < len(all_stats) else None
            if not stats:
                raise PreprocessingError(f"Channel {c} uses 'ct' normalization but the plan has no intensity_stats")
            try:
                lo, hi = float(stats["percentile_00_5"]), float(stats["percentile_99_5"])
                mean, std = float(stats["mean"]), float(stats.get("std", stats.get("sd")))
            except (KeyError, TypeError) as err:
                raise PreprocessingError(
                    f"intensity_stats[{c}] needs mean, std, percentile_00_5 and percentile_99_5; got {stats}"
                ) from err
            params.append(ChannelNorm("ct", mean, std, lo, hi, masked))
        elif scheme == "zscore":
            if image[c].dtype.kind == "c":
                raise PreprocessingError(f"Channel {c} holds complex values; take the magnitude first")
            vals = image[c][mask] if masked else image[c]
            mean, std = mean_std(vals) if vals.size else (0.0, 1.0)
            del vals
            params.append(ChannelNorm("zscore", mean, std, masked=masked))
        else:
            params.append(ChannelNorm("none", masked=masked))
    return params


def normalize(
    image: np.ndarray, plan: Plan, mask: np.ndarray | None = None
) -> np.ndarray:
    """Normalise every channel of ``image`` ``(C, *spatial)`` by the plan's scheme (float32 copy).

    Args:
        image: Resampled image.
        plan: Provides ``normalization``, ``intensity_stats`` and ``use_mask_for_norm``.
        mask: Nonzero mask on the same grid (needed where ``use_mask_for_norm`` is set).
    """
    return LazyNormalizedImage(image, normalization_params(image, plan, mask), mask).materialize()


class LazyNormalizedImage:
    """A preprocessed image that is never stored: tiles are normalised when they are read.

    For a case that needs no resampling, preprocessing is a crop and a transpose (views of the
    caller's array) and a per-channel affine map: :func:`sliding_window` reads tiles from this
    object, so prediction does not hold a float32 copy of the whole volume (one volume less at the
    peak). Indexing (``image[:, z0:z1, y0:y1, x0:x1]``) returns the same float32 values as
    :func:`normalize` would, as a ``torch`` tensor.
    """

    def __init__(self, raw: np.ndarray, norms: Sequence[ChannelNorm], mask: np.ndarray | None) -> None:
        self.raw, self.norms, self.mask = raw, list(norms), mask
        self.shape = tuple(int(s) for s in raw.shape)
        self.ndim = raw.ndim

    def __getitem__(self, key) -> torch.Tensor:

        if not (isinstance(key, tuple) and key and key[0] == slice(None)):
            raise TypeError("LazyNormalizedImage takes [:, spatial slices...]")
        spatial = key[1:]
        mask = self.mask[spatial] if self.mask is not None else None
        raw = self.raw[(slice(None), *spatial)]
        out = np.empty(raw.shape, np.float32)
        for c, norm in enumerate(self.norms):
            norm.apply(raw[c], out[c], mask)
        return torch.from_numpy(out)

    def materialize(self) -> np.ndarray:
        """The whole preprocessed image ``(C, *spatial)`` float32 (what :func:`normalize` returns);
        each channel is written in place: no full-size temporaries."""
        out = np.empty(self.shape, np.float32)
        for c, norm in enumerate(self.norms):
            norm.apply(self.raw[c], out[c], self.mask)
        return out



__all__ = [
    "HU_AIR", "HU_FLOOR", "guess_modality", "ChannelNorm", "LazyNormalizedImage", "PreprocessingError", "normalization_params",
    "normalize", "per_channel", "scheme_of",
]
