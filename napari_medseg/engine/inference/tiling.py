"""The tiling of the sliding window: tile starts, tile weights and their blending (nnU-Net's rules).

Isensee et al., Nature Methods 18, 2021 (see ARCHITECTURES.md section 1): tiles start on an even
grid that covers the image exactly (:func:`compute_tile_starts`), each tile is weighted by a
Gaussian importance map (:func:`gaussian_importance`), and mirroring TTA predicts every flip
combination (:func:`mirror_combos`). The weight is kept as per-axis factors (:func:`axis_weights`),
so the sum of the weights over the grid never needs a volume (:func:`normalise_by_coverage`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from napari_medseg.engine.inference.config import InferenceError


def gaussian_importance(
    patch_size: Sequence[int], sigma_scale: float = 1 / 8, device: Any = None
) -> torch.Tensor:
    """Gaussian importance map for blending tiles (nnU-Net): sigma = ``sigma_scale`` * patch.

    The map is centred at ``(p - 1) / 2`` on each axis, so it is mirror-symmetric (nnU-Net centres
    at ``p // 2``, half a voxel off for even sizes), normalised to a maximum of 1, and any zeros
    (float underflow far from the centre) are replaced by the smallest non-zero value so every voxel
    of a tile has a positive weight.

    Returns:
        float32 tensor of shape ``patch_size``.
    """
    patch = tuple(int(p) for p in patch_size)
    if not patch or any(p < 1 for p in patch):
        raise InferenceError(f"Patch size must be positive integers, got {tuple(patch_size)}.")
    if not sigma_scale > 0:
        raise InferenceError(f"sigma_scale must be positive, got {sigma_scale}.")
    weight = outer_product(axis_weights(patch, True, sigma_scale)).to(torch.float32)
    nonzero = weight[weight > 0]
    if nonzero.numel() < weight.numel():
        weight[weight == 0] = nonzero.min()
    return weight.to(device) if device is not None else weight


def axis_weights(patch: Sequence[int], gaussian: bool, sigma_scale: float = 1 / 8) -> list[torch.Tensor]:
    """Per-axis float64 factors of the tile weight, each with maximum 1.

    Their :func:`outer_product` is :func:`gaussian_importance` before its underflow guard (or all
    ones without ``gaussian``). The window keeps the weight as these factors, so the sum of the
    weights over the tile grid is a product of per-axis sums (see :func:`normalise_by_coverage`).
    """
    out = []
    for p in patch:
        if not gaussian:
            out.append(torch.ones(p, dtype=torch.float64))
            continue
        x = torch.arange(p, dtype=torch.float64)
        g = torch.exp(-0.5 * ((x - (p - 1) / 2) / (p * sigma_scale)) ** 2)
        out.append(g / g.max())
    return out


def outer_product(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Outer product of 1D tensors: shape ``tuple(len(f) for f in factors)``."""
    out = factors[0]
    for f in factors[1:]:
        out = out[..., None] * f
    return out


def compute_tile_starts(
    image_shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5
) -> list[list[int]]:
    """Tile start positions per axis (nnU-Net's rule).

    Per axis: ``n = ceil((size - patch) / (patch * step)) + 1`` tiles, evenly spaced from 0 to
    ``size - patch`` so the image is covered exactly. An axis not larger than the patch gets ``[0]``
    (the caller pads it to the patch size).
    """
    if not 0 < step <= 1:
        raise InferenceError(f"Tile step must be in (0, 1] (a fraction of the patch), got {step}.")
    if len(image_shape) != len(patch_size):
        raise InferenceError(f"Image shape {tuple(image_shape)} and patch {tuple(patch_size)} differ in rank.")
    starts = []
    for size, p in zip(image_shape, patch_size):
        size, p = int(size), int(p)
        if size <= p:
            starts.append([0])
            continue
        n = math.ceil((size - p) / (p * step)) + 1
        actual = (size - p) / (n - 1)
        starts.append([int(round(actual * i)) for i in range(n)])
    return starts


def mirror_combos(mirror_axes: Sequence[int], ndim: int) -> list[tuple[int, ...]]:
    """Every flip combination of ``mirror_axes`` (the empty one first): ``2 ** len(axes)`` tuples.

    Raises:
        InferenceError: an axis outside ``0..ndim - 1``.
    """
    axes = tuple(sorted({int(a) for a in mirror_axes}))
    if any(a < 0 or a >= ndim for a in axes):
        raise InferenceError(f"Mirror axes {tuple(mirror_axes)} must be spatial axes 0..{ndim - 1}.")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def count_tiles(
    image_shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5, mirror_axes: Sequence[int] = ()
) -> int:
    """Number of predictor tile evaluations :func:`sliding_window` will make (its Progress total).

    ``image_shape`` is spatial; a patch with one axis fewer means slice-wise along axis 0.
    """
    spatial, patch = full_patch_size(image_shape, patch_size)
    padded = [max(s, p) for s, p in zip(spatial, patch)]
    starts = compute_tile_starts(padded, patch, step)
    if len(patch_size) == len(spatial) - 1:
        starts[0] = list(range(padded[0]))
    return math.prod(len(s) for s in starts) * 2 ** len(set(mirror_axes))


def full_patch_size(spatial: Sequence[int], patch_size: Sequence[int]) -> tuple[tuple, tuple]:
    """``(spatial, patch)`` as int tuples of equal rank: a patch with one axis fewer than the image
    (a 2D model on a volume, slice-wise along axis 0) gets a leading 1.

    Raises:
        InferenceError: the ranks differ otherwise.
    """
    spatial = tuple(int(s) for s in spatial)
    patch = tuple(int(p) for p in patch_size)
    if len(patch) == len(spatial) - 1:
        return spatial, (1, *patch)
    if len(patch) != len(spatial):
        raise InferenceError(
            f"A {len(patch)}D patch cannot tile an image with {len(spatial)} spatial axes."
        )
    return spatial, patch



def normalise_by_coverage(
    logits: torch.Tensor, weight: torch.Tensor, factors: list[torch.Tensor], starts: list[list[int]],
    regions: list[tuple[slice, ...]], separable: bool, slab_voxels: int = 1 << 22,
) -> None:
    """Divide the accumulated logits by the summed tile weights, in place (the window's last step).

    Args:
        logits: ``(K, *padded)`` accumulated ``sum(weight * tile logits)``.
        weight: The tile weight ``(*full_patch)`` (used only when not ``separable``).
        factors: Its per-axis factors (:func:`axis_weights`), one per axis of ``full_patch``.
        starts: Tile starts per axis; ``regions`` the tiles (their product).
        separable: The weight is exactly the outer product of ``factors``. Then the sum is the
            outer product of per-axis sums (float64), computed for a slab of axis-0 positions at a
            time (``slab_voxels`` per slab), so no weight volume is ever allocated; otherwise one
            weight-sum volume is built.
    """
    if not separable:  # the general case: one weight-sum volume
        coverage = torch.zeros(logits.shape[1:], dtype=torch.float32, device=logits.device)
        for region in regions:
            coverage[region] += weight
        logits /= coverage
        return
    per_axis = []
    for size, axis_starts, f in zip(logits.shape[1:], starts, factors):
        c = torch.zeros(size, dtype=torch.float64)
        for s in axis_starts:
            c[s : s + len(f)] += f
        per_axis.append(c)
    rest = outer_product(per_axis[1:]) if len(per_axis) > 1 else torch.ones((), dtype=torch.float64)
    step = max(1, slab_voxels // max(rest.numel(), 1))
    for z0 in range(0, logits.shape[1], step):
        cz = per_axis[0][z0 : z0 + step].reshape(-1, *([1] * rest.ndim))
        exact = logits.dtype in (torch.float32, torch.float64)
        # float64 on the CPU, cast before moving (MPS has no float64)
        denom = (cz * rest).to(logits.dtype if exact else torch.float32).to(logits.device)
        if exact:
            logits[:, z0 : z0 + step] /= denom
        else:  # divide in float32: the weight sums can be outside half precision's range
            sl = logits[:, z0 : z0 + step]
            logits[:, z0 : z0 + step] = (sl.float() / denom).to(logits.dtype)


__all__ = [
    "axis_weights",
    "compute_tile_starts",
    "count_tiles",
    "full_patch_size",
    "gaussian_importance",
    "mirror_combos",
    "normalise_by_coverage",
    "outer_product",
]
