"""The one sliding window: Gaussian-weighted tiles, mirroring TTA, any predictor callable.

DESIGN.md convention 7: :func:`sliding_window` runs any predictor (a model in eval mode, a list of
them, a compiled wrapper) over overlapping tiles of a channels-first tensor and blends the logits.
It is a generator (convention 2): it yields :class:`~napari_medseg.engine.jobs.Progress` after
every predictor call and *returns* the blended logits, so closing it cancels between tiles.

The tiling rule, the Gaussian importance map and mirroring over all flip combinations follow
nnU-Net (Isensee et al., Nature Methods 18, 2021); they live in :mod:`.tiling`.
:func:`optimize_predictor` applies the optional speed levers (channels-last, ``torch.compile``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.engine.inference.config import InferenceError
from napari_medseg.engine.inference.tiling import (
    axis_weights,
    compute_tile_starts,
    full_patch_size,
    mirror_combos,
    normalise_by_coverage,
    outer_product,
)
from napari_medseg.engine.jobs import Progress

logger = logging.getLogger(__name__)

#: A callable ``(B, C, *patch) -> (B, K, *patch)`` logits (or a list/tuple whose first item is).
Predictor = Callable[[torch.Tensor], Any]

_HALF = (torch.float16, torch.bfloat16)


def optimize_predictor(model: torch.nn.Module, *, channels_last: bool = False, compile: bool = False,
                       compile_mode: str | None = None, compile_backend: str = "inductor") -> Any:
    """Apply the optional speed levers of :func:`sliding_window` to a model (eval mode).

    Args:
        model: A ``torch.nn.Module``; converted *in place* when ``channels_last``.
        channels_last: Store the weights channels-last (``channels_last_3d`` for 3D convolutions);
            pair with ``sliding_window(..., channels_last=True)``. Results are unchanged up to
            float rounding.
        compile: Wrap the model in ``torch.compile`` (the first call compiles: tens of seconds to
            minutes; needs a C++ compiler on the CPU). Results are unchanged up to float rounding.
            Inductor's *freezing* is on: the weights become constants (folded and pre-packed for
            oneDNN on the CPU), so the compiled predictor must not be trained further. Each new tile
            batch shape compiles again (a smaller last batch does).
        compile_mode: ``torch.compile``'s ``mode`` (e.g. ``"max-autotune"``).
        compile_backend: ``torch.compile``'s ``backend``.

    Returns:
        The predictor to pass to :func:`sliding_window` (the model, or its compiled wrapper).
    """
    model.eval()
    if channels_last:
        has_3d = any(p.ndim == 5 for p in model.parameters())
        model.to(memory_format=torch.channels_last_3d if has_3d else torch.channels_last)
    if compile:
        # Inductor fuses the stock graph itself; the hand-written channels-last CPU forward of
        # NNUNet (models/cpu_inference.py) would only get in its way.
        for module in model.modules():
            if hasattr(module, "cpu_fast_path"):
                module.cpu_fast_path = False
        options = {"freezing": True} if compile_backend == "inductor" and compile_mode is None else None
        return torch.compile(model, mode=compile_mode, backend=compile_backend, dynamic=False, options=options)
    return model


# ----------------------------------------------------------------------------------- the window
@dataclass(frozen=True)
class _Run:
    """The fixed settings of one window run, shared by its batches."""

    predictor: Predictor | Sequence[Predictor]
    combos: list[tuple[int, ...]]
    device: torch.device
    acc_dev: torch.device
    amp: bool
    memory_format: Any
    num_classes: int
    patch: tuple[int, ...]
    slicewise: bool
    relative: bool
    total: int


def sliding_window(
    predictor: Predictor | Sequence[Predictor],
    image: torch.Tensor,
    patch_size: Sequence[int],
    num_classes: int,
    *,
    step: float = 0.5,
    batch_size: int = 1,
    mirror_axes: Sequence[int] = (),
    device: Any = None,
    accumulate_device: Any = None,
    gaussian: bool = True,
    channels_last: bool = False,
    amp: bool | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    relative: bool = False,
) -> Generator[Progress, None, torch.Tensor]:
    """Run ``predictor`` over overlapping tiles of ``image`` and blend the logits.

    The logits of each tile (averaged over mirrorings) are added, times the tile weight, in place
    into one preallocated accumulator; the sum of the weights is never stored as a volume: the tile
    grid is a product of per-axis start lists and the weight a product of per-axis factors, so the
    weight sum is the product of per-axis sums, applied slab by slab at the end. Peak memory is the
    image plus ``num_classes`` volumes plus the tiles in flight.

    Args:
        predictor: Callable ``(B, C, *patch) -> (B, K, *patch)`` logits (a model in eval mode), or a
            list of them (their logits are averaged). A list/tuple output (deep supervision) uses
            its first element.
        image: ``(C, *spatial)`` tensor, 2D or 3D. With a 2D ``patch_size`` on a 3D image, the
            image is processed slice by slice along spatial axis 0 (slices batched as tiles).
            A :class:`~.preprocessing.LazyNormalizedImage` is read tile by tile (on the CPU).
        patch_size: Tile size (spatial). Axes of the image smaller than the patch are zero-padded
            (centred) and cropped back afterwards.
        num_classes: ``K``, channels of the predictor output.
        step: Tile stride as a fraction of the patch (0.5 = half overlap, 1 = no overlap).
        batch_size: Tiles per predictor call.
        mirror_axes: Spatial axes of the patch to mirror for test-time augmentation; all
            ``2 ** len(mirror_axes)`` flip combinations are predicted, flipped back and averaged.
        device: Where the predictor runs (default: the image's device).
        accumulate_device: Where logits are accumulated and returned (default: the image's device).
            When it is ``device``, the image is moved there once (no per-tile host copies).
        gaussian: Weight tiles with :func:`gaussian_importance`; else uniformly.
        channels_last: Hand tiles to the predictor in channels-last memory format (pair with
            :func:`optimize_predictor`).
        amp: Run the predictor under ``torch.autocast`` (float16) -- ``None``: on CUDA only.
        accumulate_dtype: dtype of the accumulator and of the result; ``torch.float16`` halves the
            accumulator's memory on a GPU (on the CPU it is slower than float32). In half
            precision each axis of the tile weight is floored at 0.1, so that no weight rounds to 0.
        relative: Accumulate the logits relative to class 0 (``l_k - l_0`` for ``k >= 1``): the
            result has ``num_classes - 1`` channels, one volume less. Softmax and argmax do not
            change under that shift (class 0's relative logit is 0), and blending is linear, so
            nothing is lost; :func:`~napari_medseg.engine.inference.predict` uses it when only
            labels are wanted.

    Yields:
        ``Progress("tiles", done, total, "N tiles x P mirror passes")`` after every predictor call;
        ``total`` is the number of tiles times the number of mirror combinations (:func:`count_tiles`).

    Returns:
        Blended logits ``(K, *spatial)`` (``(K - 1, *spatial)`` when ``relative``) in
        ``accumulate_dtype`` (float32 by default) on ``accumulate_device``.
    """
    image, lazy = _window_input(image, batch_size, accumulate_dtype)
    spatial, full_patch = full_patch_size(image.shape[1:], patch_size)
    slicewise = len(full_patch) != len(patch_size)
    patch = full_patch[1:] if slicewise else full_patch
    combos = mirror_combos(mirror_axes, len(patch))
    image_device = torch.device("cpu") if lazy else image.device
    device = torch.device(device) if device is not None else image_device
    acc_dev = torch.device(accumulate_device) if accumulate_device is not None else image_device
    if not lazy and image.device != device and acc_dev == device:
        image = image.to(device)  # once, not per tile
    memory_format = None
    if channels_last:
        memory_format = torch.channels_last_3d if len(patch) == 3 else torch.channels_last

    image, pad_lo, pad_hi = _pad_to_patch(image, spatial, full_patch, lazy)
    padded = tuple(image.shape[1:])
    starts, regions = _tile_regions(padded, full_patch, step, slicewise)
    weight, factors, separable = _blend_weight(patch, gaussian, accumulate_dtype, slicewise)
    weight = weight.to(acc_dev)
    # The mirror average (a power of two: exact) is folded into the tile weight, so each tile costs
    # one fused multiply-add into the accumulator.
    tile_weight = weight / len(combos) if len(combos) > 1 else weight
    if relative and num_classes < 2:
        raise InferenceError("relative logits need at least 2 classes.")
    channels = num_classes - 1 if relative else num_classes
    logits = torch.zeros((channels, *padded), dtype=accumulate_dtype, device=acc_dev)
    logger.debug("Sliding window: %d tiles x %d mirrorings, patch %s", len(regions), len(combos), full_patch)
    run = _Run(
        predictor, combos, device, acc_dev, device.type == "cuda" if amp is None else bool(amp), memory_format,
        num_classes, patch, slicewise, relative, len(regions) * len(combos),
    )

    done = 0
    for b0 in range(0, len(regions), batch_size):
        batch = regions[b0 : b0 + batch_size]
        summed, done = yield from _predict_batch(run, image, batch, done)
        _accumulate(logits, summed, batch, tile_weight, run)
        del summed

    with torch.inference_mode():
        normalise_by_coverage(logits, weight, factors, starts, regions, separable)
    crop = tuple(slice(lo, lo + s) for lo, s in zip(pad_lo, spatial))
    return logits[(slice(None), *crop)].contiguous() if any(pad_lo) or any(pad_hi) else logits


def _window_input(image: Any, batch_size: int, accumulate_dtype: torch.dtype) -> tuple[Any, bool]:
    """The image as a tensor (or a lazy image, read tile by tile) and whether it is lazy; checks."""
    lazy = not isinstance(image, torch.Tensor) and hasattr(image, "materialize")
    if not isinstance(image, torch.Tensor) and not lazy:
        image = torch.as_tensor(np.asarray(image))
    if image.ndim not in (3, 4):
        raise InferenceError(f"Expected a (C, y, x) or (C, z, y, x) image tensor, got shape {tuple(image.shape)}.")
    if batch_size < 1:
        raise InferenceError(f"batch_size must be at least 1, got {batch_size}.")
    if accumulate_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise InferenceError(f"accumulate_dtype must be a floating dtype, got {accumulate_dtype}.")
    return image, lazy


def _pad_to_patch(image: Any, spatial: tuple, full_patch: tuple, lazy: bool) -> tuple[Any, list, list]:
    """Pad axes smaller than the patch (centred, constant 0); return the pads to crop back."""
    pad_lo = [max(p - s, 0) // 2 for s, p in zip(spatial, full_patch)]
    pad_hi = [max(p - s, 0) - lo for s, p, lo in zip(spatial, full_patch, pad_lo)]
    if any(pad_lo) or any(pad_hi):
        if lazy:  # an axis smaller than the patch: small enough to hold whole
            image = torch.from_numpy(image.materialize())
        pairs = [v for lo, hi in zip(reversed(pad_lo), reversed(pad_hi)) for v in (lo, hi)]
        image = F.pad(image, pairs, mode="constant", value=0.0)
    return image, pad_lo, pad_hi


def _tile_regions(
    padded: tuple, full_patch: tuple, step: float, slicewise: bool
) -> tuple[list[list[int]], list[tuple[slice, ...]]]:
    """Per-axis start lists (every slice along axis 0 when slice-wise) and the tile regions."""
    starts = compute_tile_starts(padded, full_patch, step)
    if slicewise:
        starts[0] = list(range(padded[0]))
    regions = [
        tuple(slice(s, s + p) for s, p in zip(pos, full_patch)) for pos in itertools.product(*starts)
    ]
    return starts, regions


def _blend_weight(
    patch: tuple, gaussian: bool, accumulate_dtype: torch.dtype, slicewise: bool
) -> tuple[torch.Tensor, list[torch.Tensor], bool]:
    """The float32 tile weight, its per-axis factors and whether it is their exact product."""
    factors = axis_weights(patch, gaussian)
    if accumulate_dtype in _HALF:
        # Corner weights (~1e-10 in 3D) would round to 0 in half precision: floor each axis at 0.1.
        factors = [f.clamp(min=0.1) for f in factors]
    if slicewise:
        factors = [torch.ones(1, dtype=torch.float64), *factors]
    weight = outer_product(factors).to(torch.float32)
    separable = bool((weight > 0).all())
    if not separable:  # float underflow far from the centre (tiny sigma): gaussian_importance's guard
        weight[weight == 0] = weight[weight > 0].min()
    return weight, factors, separable


def _call_predictor(predictor: Predictor | Sequence[Predictor], x: torch.Tensor) -> torch.Tensor:
    def first(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, (list, tuple)) else out

    if isinstance(predictor, (list, tuple)):  # ensemble of predictors: mean logits
        outs = [first(p(x)).float() for p in predictor]
        return sum(outs[1:], outs[0]) / len(outs)
    return first(predictor(x))


def _predict_batch(
    run: _Run, image: Any, batch: list[tuple[slice, ...]], done: int
) -> Generator[Progress, None, tuple[torch.Tensor, int]]:
    """Predict one batch of tiles under every flip combination; return the summed logits
    ``(B, K, *patch)`` (float32, on the accumulation device) and the new tile count."""
    with torch.inference_mode():
        tiles = torch.stack([image[(slice(None), *r)] for r in batch])
        tiles = tiles.to(device=run.device, dtype=torch.float32)
        if run.slicewise:
            tiles = tiles.squeeze(2)
        if run.memory_format is not None:
            tiles = tiles.contiguous(memory_format=run.memory_format)
        summed = None
    for flips in run.combos:
        with torch.inference_mode(), torch.autocast(run.device.type, dtype=torch.float16, enabled=run.amp):
            dims = [2 + a for a in flips]
            out = _call_predictor(run.predictor, tiles.flip(dims) if flips else tiles)
            expected = (len(batch), run.num_classes, *run.patch)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InferenceError(
                    f"The predictor returned {got} for tiles {tuple(tiles.shape)}; expected {expected}."
                )
            if flips:
                out = out.flip(dims)
            if summed is None:  # a copy when it will be added to (out may alias the tiles)
                summed = out.to(device=run.acc_dev, dtype=torch.float32, copy=len(run.combos) > 1)
            else:
                summed += out.to(device=run.acc_dev, dtype=torch.float32)
        done += len(batch)
        passes = len(run.combos)
        yield Progress("tiles", done, run.total, f"{run.total // passes} tiles x {passes} mirror pass"
                       + ("es" if passes > 1 else ""))
    return summed, done


def _accumulate(
    logits: torch.Tensor, summed: torch.Tensor, batch: list[tuple[slice, ...]], tile_weight: torch.Tensor,
    run: _Run,
) -> None:
    """Add each tile's logits (relative to class 0 when asked) times the tile weight, in place."""
    with torch.inference_mode():
        if run.slicewise:
            summed = summed.unsqueeze(2)
        if run.relative:  # in place: summed is ours (a copy, or the predictor's fresh output)
            summed = summed[:, 1:].sub_(summed[:, :1])
        for i, region in enumerate(batch):
            logits[(slice(None), *region)].addcmul_(summed[i], tile_weight)


__all__ = [
    "Predictor",
    "optimize_predictor",
    "sliding_window",
]
