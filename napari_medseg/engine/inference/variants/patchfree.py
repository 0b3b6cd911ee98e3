"""Patch-free inference for super-resolving whole-volume models (PFSeg, ARCHITECTURES.md section 4).

A patch-free model sees the whole preprocessed volume at once, downsampled 2x (linear), and returns
the segmentation at the preprocessed (HR) resolution: no sliding window. This module registers
:class:`PatchFreeInferer`, which claims such checkpoints (a model spec with ``output_scale != 1``), so
:func:`napari_medseg.engine.inference.predict` runs :func:`predict_patchfree` for them:

1. each checkpoint's plan preprocesses the image (``preprocess_case``) to the HR grid;
2. the grid is zero-padded centrally to a multiple of :data:`HR_DIVISOR` per axis;
3. the LR input is the padded volume downsampled 2x (trilinear, ``align_corners=False``, which for
   a factor 1/2 is the mean of each 2x2x2 block), and the guidance patch is the central crop (a
   quarter per axis) of the padded **HR** volume: the engine has the full-resolution image, so it
   feeds the same kind of guidance as in training (the paper: "at inference the guidance patch is
   the central HR crop");
4. the softmax is cropped back, restored to the source geometry (``restore_probabilities``) and
   averaged over checkpoints and mirrorings.

Memory is bounded up front: :func:`estimate_peak_bytes` (a linear model of the peak resident
memory of one forward, measured with ``benchmarks/bench_pfseg.py --memory``) is checked against
the free memory of the device (:func:`napari_medseg.engine.runtime.memory.available_memory_bytes`,
capped by ``MEDSEG_MAX_MEMORY_GB``), and a volume that would not fit is refused with
:class:`VolumeTooLargeError` instead of being killed by the operating system.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.engine.checkpoints import (
    Checkpoint,
    CheckpointError,
    build_model,
    check_compatible,
)
from napari_medseg.engine.inference.config import PredictConfig
from napari_medseg.engine.inference.inferers import (
    Inferer,
    finish_ensemble,
    plan_of,
    register_inferer,
    tta_mirror_axes,
)
from napari_medseg.engine.inference.postprocessing import PredictionResult
from napari_medseg.engine.jobs import Progress, relay
from napari_medseg.engine.preprocessing import preprocess_case, restore_probabilities
from napari_medseg.engine.runtime import resolve_device
from napari_medseg.engine.runtime.memory import available_memory_bytes
from napari_medseg.errors import MedsegError
from napari_medseg.models import get_model_spec
from napari_medseg.models.pfseg import GUIDANCE_FRACTION, central_crop_slices
from napari_medseg.models.registry import ModelError

logger = logging.getLogger(__name__)

#: Each axis of the HR volume fed to PFSeg is padded to a multiple of this (LR: 16).
HR_DIVISOR = 32

# Peak resident memory of one eval forward of the paper's configuration (width 32, 1 channel,
# 2 classes, float32, CPU, torch 2.13), fitted as ``BASE + PER_VOXEL * hr_voxels`` on fresh
# processes (``python benchmarks/bench_pfseg.py --memory``): HR 64x96x96 0.64 GiB, 96x128x128
# 1.07 GiB, 128x192x192 2.26 GiB -> 0.460 GB + 418.9 B/voxel (max residual 30 MiB), so about
# 60 M HR voxels (a 392^3 cube, or 299x449x449) fit in 24 GiB. See :func:`estimate_peak_bytes`;
# the per-voxel term scales with the width.
MEMORY_BASE_BYTES = 0.46e9
MEMORY_PER_HR_VOXEL = 420.0
#: Fraction of the free memory a forward may use (the rest is for the caller and the OS).
MEMORY_HEADROOM = 0.85


class VolumeTooLargeError(MedsegError, MemoryError):
    """A whole-volume forward would need more memory than is available."""


# ----------------------------------------------------------------- geometry helpers
def padded_shape(shape: Sequence[int], multiple: int = HR_DIVISOR) -> tuple[int, ...]:
    """``shape`` rounded up to a multiple of ``multiple`` per axis."""
    return tuple(int(-(-int(s) // multiple) * multiple) for s in shape)


def whole_volume_grid(shape: Sequence[int]) -> tuple[int, ...]:
    """The padded HR grid a patch-free model runs on for a volume of spatial ``shape``.

    Each axis rounded up to a multiple of :data:`HR_DIVISOR`; when that leaves a single voxel at
    the bottleneck (every axis 32), the last axis becomes 64, because instance normalisation needs
    more than one voxel in training (and inference must see the grid training saw).
    """
    grid = padded_shape(shape)
    if all(g == HR_DIVISOR for g in grid):
        grid = (*grid[:-1], 2 * HR_DIVISOR)
    return grid


def center_pad_slices(shape: Sequence[int], target: Sequence[int]) -> tuple[slice, ...]:
    """Where an array of ``shape`` sits inside a centrally padded array of shape ``target``."""
    out = []
    for s, t in zip(shape, target):
        if t < s:
            raise ValueError(f"Cannot pad shape {tuple(shape)} to the smaller {tuple(target)}.")
        lo = (t - s) // 2
        out.append(slice(lo, lo + s))
    return tuple(out)


def center_pad(x: torch.Tensor, target: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Zero-pad (or ``value``-pad) the trailing spatial axes of ``x`` centrally to ``target``."""
    spatial = tuple(x.shape[-len(target):])
    if spatial == tuple(target):
        return x
    pads: list[int] = []
    for s, t in zip(reversed(spatial), reversed(tuple(target))):
        lo = (t - s) // 2
        pads += [lo, t - s - lo]
    return F.pad(x, pads, value=value)


def guidance_slices(hr_shape: Sequence[int]) -> tuple[slice, ...]:
    """Central ``size // 4`` crop of each axis of an HR volume (the SGM's guidance patch)."""
    return central_crop_slices(tuple(int(s) for s in hr_shape), GUIDANCE_FRACTION)


def guidance_crop(hr: torch.Tensor) -> torch.Tensor:
    """The guidance patch of ``hr`` ``(B, C, z, y, x)``."""
    return hr[(slice(None), slice(None), *guidance_slices(hr.shape[2:]))]


def guidance_mask(hr_shape: Sequence[int], device: Any = None, dtype=torch.float32) -> torch.Tensor:
    """``(1, 1, *hr_shape)``: 1 inside the guidance region, 0 elsewhere."""
    mask = torch.zeros((1, 1, *hr_shape), device=device, dtype=dtype)
    mask[(slice(None), slice(None), *guidance_slices(hr_shape))] = 1
    return mask


def downsample(hr: torch.Tensor) -> torch.Tensor:
    """The LR input: ``hr`` ``(B, C, z, y, x)`` downsampled 2x per axis, trilinear."""
    if any(s % 2 for s in hr.shape[2:]):
        raise ValueError(f"The HR volume needs even axes to downsample 2x, got {tuple(hr.shape[2:])}.")
    return F.interpolate(hr, scale_factor=0.5, mode="trilinear", align_corners=False)


# ----------------------------------------------------------------- memory
def estimate_peak_bytes(hr_shape: Sequence[int], width: int = 32, in_channels: int = 1,
                        num_classes: int = 2) -> int:
    """Estimated peak memory of one eval forward on an HR (padded) volume of ``hr_shape``.

    ``MEMORY_BASE_BYTES + MEMORY_PER_HR_VOXEL * (width / 32) * voxels``, plus the input, the LR
    input and the softmax (``4 * (1.2 * in_channels + 2 * num_classes)`` bytes per voxel). The
    coefficients come from peak-RSS measurements of the paper's configuration on CPU.
    """
    voxels = float(np.prod([int(s) for s in hr_shape]))
    per_voxel = MEMORY_PER_HR_VOXEL * (width / 32.0) + 4.0 * (1.2 * in_channels + 2 * num_classes)
    return int(MEMORY_BASE_BYTES + per_voxel * voxels)


def largest_cube_side(budget_bytes: float, width: int = 32) -> int:
    """Side (a multiple of 32) of the largest cubic HR volume whose forward fits ``budget_bytes``."""
    side = 0
    while estimate_peak_bytes((side + HR_DIVISOR,) * 3, width) <= budget_bytes:
        side += HR_DIVISOR
    return side


def check_memory(hr_shape: Sequence[int], device: torch.device, width: int, in_channels: int,
                 num_classes: int) -> None:
    """Raise :class:`VolumeTooLargeError` when a whole-volume forward would not fit in memory."""
    need = estimate_peak_bytes(hr_shape, width, in_channels, num_classes)
    if device.type == "cuda":
        need -= int(MEMORY_BASE_BYTES)  # the interpreter and libraries live in host memory
    free = available_memory_bytes(device)
    if free is None:
        logger.debug("Free memory unknown on %s; skipping the patch-free memory check.", device)
        return
    budget = MEMORY_HEADROOM * free
    if need > budget:
        side = largest_cube_side(budget if device.type != "cuda" else budget + MEMORY_BASE_BYTES, width)
        raise VolumeTooLargeError(
            f"This patch-free model segments the volume in one piece: on a grid of "
            f"{'x'.join(map(str, hr_shape))} voxels it would need about {need / 2**30:.1f} GiB, but only "
            f"{free / 2**30:.1f} GiB is free on {device} (up to {budget / 2**30:.1f} GiB usable; at most "
            f"about {side}^3 voxels fit). Use a device with more memory, crop the image to the region "
            "of interest, or use a patch-based model such as unet-3d-fullres."
        )


# ----------------------------------------------------------------- inference
@torch.inference_mode()
def forward_whole_volume(
    model: torch.nn.Module, hr: torch.Tensor, mirror_axes: Sequence[int] = (), device: Any = None
) -> Generator[Progress, None, torch.Tensor]:
    """Softmax of a patch-free model on a whole HR-grid volume; a generator (one event per forward).

    Args:
        model: A PFSeg-like model (``model(lr, guidance)`` returns HR logits) in eval mode.
        hr: ``(C, *spatial)`` on the preprocessed grid (any size: it is padded to a multiple of 32).
        mirror_axes: Spatial axes (0-based) mirrored for test-time augmentation (all combinations).
        device: Where the forward runs (default: the model's device).

    Returns:
        Probabilities ``(K, *spatial)`` float32 on the CPU.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    spatial = tuple(hr.shape[1:])
    target = whole_volume_grid(spatial)
    inside = center_pad_slices(spatial, target)
    x = center_pad(hr.to(dev, torch.float32)[None], target)
    combos = [()] + [
        c for n in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, n)
    ]
    total = None
    for i, combo in enumerate(combos):
        dims = [a + 2 for a in combo]
        xi = torch.flip(x, dims) if dims else x
        logits = model(downsample(xi), guidance_crop(xi))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        probs = torch.softmax(logits.float(), dim=1)
        if dims:
            probs = torch.flip(probs, dims)
        total = probs if total is None else total.add_(probs)
        del logits
        yield Progress("tiles", i + 1, len(combos), f"whole volume {'x'.join(map(str, target))}")
    probs = (total / len(combos))[0][(slice(None), *inside)]
    return probs.float().cpu()


def predict_patchfree(
    data: np.ndarray,
    spacing: Sequence[float],
    ckpts: Sequence[Checkpoint],
    config: PredictConfig | dict | None = None,
    **overrides: Any,
) -> Generator[Progress, None, PredictionResult]:
    """Segment a channels-first image ``(C, z, y, x)`` with patch-free checkpoints (an ensemble).

    What :class:`PatchFreeInferer` runs; see the module docstring. Yields ``Progress`` stages
    ``"preprocess"``, ``"tiles"`` (one per forward over all checkpoints and mirrorings) and
    ``"postprocess"``; returns a ``PredictionResult``.

    Args:
        data: ``(C, *spatial)`` source image, napari order.
        spacing: Its spacing, one value per spatial axis.
        ckpts: Patch-free checkpoints.
        config: A :class:`PredictConfig` (or a dict of its fields); ``step`` and ``batch_size``
            do not apply (there are no tiles).
        **overrides: :class:`PredictConfig` fields to change.

    Raises:
        VolumeTooLargeError: the whole volume does not fit in the device's free memory.
        CheckpointError: a checkpoint cannot take this image.
    """
    cfg = PredictConfig.build(config, **overrides)
    for ck in ckpts:
        if not is_patchfree(ck):
            raise CheckpointError(
                f"A {ck.model_name!r} checkpoint cannot be ensembled with patch-free models: they "
                "segment whole volumes at another resolution. Predict with them separately."
            )
        check_compatible(ck, data.shape[0], data.ndim - 1)  # a 2D image: a clear CheckpointError
    dev = resolve_device(cfg.device)
    prepared = yield from _prepare_patchfree(data, spacing, ckpts, dev)
    axes = [tta_mirror_axes(ck, cfg.mirror) for ck in ckpts]
    total = sum(2 ** len(a) for a in axes)
    done = 0
    mean: np.ndarray | None = None
    for ck, ck_axes, (plan, pre, props) in zip(ckpts, axes, prepared):
        model = build_model(ck, dev)
        offset = done

        def tiles(event: Progress, offset: int = offset) -> Progress:
            return Progress("tiles", offset + event.current, total, event.message)

        hr = torch.from_numpy(np.ascontiguousarray(pre))
        probs = yield from relay(forward_whole_volume(model, hr, ck_axes, dev), tiles)
        done += 2 ** len(ck_axes)
        del model, hr
        restored = np.asarray(restore_probabilities(probs.numpy(), props, plan), dtype=np.float32)
        restored /= len(ckpts)
        mean = restored if mean is None else np.add(mean, restored, out=mean)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    return (yield from finish_ensemble(mean, cfg, ckpts))


def _prepare_patchfree(
    data: np.ndarray, spacing: Sequence[float], ckpts: Sequence[Checkpoint], dev: torch.device
) -> Generator[Progress, None, list[tuple[Any, np.ndarray, Any]]]:
    """Preprocess the image for each checkpoint and check that its whole-volume forward fits."""
    yield Progress("preprocess", 0, len(ckpts))
    prepared = []
    for i, ck in enumerate(ckpts):
        plan = plan_of(ck)
        pre, _, props = preprocess_case(data, spacing, plan)
        width = int(ck.model_kwargs.get("width", 32))
        check_memory(whole_volume_grid(pre.shape[1:]), dev, width, ck.in_channels, ck.num_classes)
        prepared.append((plan, pre, props))
        yield Progress("preprocess", i + 1, len(ckpts))
    return prepared


def is_patchfree(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` holds a patch-free (whole-volume, super-resolving) model."""
    try:
        spec = get_model_spec(ckpt.model_name)
    except ModelError:
        return False
    return spec.output_scale != 1


class PatchFreeInferer(Inferer):
    """The inferer of patch-free models: one whole-volume forward per checkpoint and mirroring.

    Claims every checkpoint :func:`is_patchfree` recognises; refuses ensembles that mix them with
    patch-based models.
    """

    name = "patch_free"

    def claims(self, ckpt: Checkpoint) -> bool:
        """Whether ``ckpt`` is patch-free (:func:`is_patchfree`)."""
        return is_patchfree(ckpt)

    def run(
        self, image: np.ndarray, spacing: tuple[float, ...], ckpts: Sequence[Checkpoint], config: PredictConfig
    ) -> Generator[Progress, None, PredictionResult]:
        """Segment ``image`` with :func:`predict_patchfree`; see :meth:`Inferer.run`."""
        return predict_patchfree(image, spacing, ckpts, config)


register_inferer(PatchFreeInferer())


__all__ = [
    "HR_DIVISOR",
    "PatchFreeInferer",
    "VolumeTooLargeError",
    "check_memory",
    "center_pad",
    "downsample",
    "estimate_peak_bytes",
    "forward_whole_volume",
    "guidance_crop",
    "guidance_mask",
    "is_patchfree",
    "largest_cube_side",
    "padded_shape",
    "whole_volume_grid",
    "predict_patchfree",
]
