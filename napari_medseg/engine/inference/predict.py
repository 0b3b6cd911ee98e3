"""Model-agnostic sliding-window inference with Gaussian weighting, mirroring TTA and ensembling.

One sliding window (DESIGN.md convention 7) serves every model: :func:`sliding_window` runs any
predictor callable over tiles of a channels-first tensor. :func:`predict` builds on it: it loads
checkpoints, preprocesses the image with each checkpoint's plan, runs the window, restores the
softmax to the source geometry, averages over checkpoints and returns labels. Both are generators
(convention 2): they yield :class:`~napari_medseg.engine.events.Progress` and *return* their result,
so closing them cancels the job between tiles.

The tiling rule, the Gaussian importance map and mirroring over all flip combinations follow
nnU-Net (Isensee et al., Nature Methods 18, 2021); see ARCHITECTURES.md section 1.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    build_model,
    check_compatible,
    load_checkpoint,
)
from napari_medseg.engine.devices import resolve_device
from napari_medseg.engine.events import Progress
from napari_medseg.engine.oom import sliding_window_with_fallback
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.postprocessing import keep_largest_component

logger = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], Any]


class InferenceError(ValueError):
    """Inference cannot run with these inputs (shapes, predictor output, settings)."""


# ----------------------------------------------------------------------------------- the window
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
    weight = _outer(_axis_weights(patch, True, sigma_scale)).to(torch.float32)
    nonzero = weight[weight > 0]
    if nonzero.numel() < weight.numel():
        weight[weight == 0] = nonzero.min()
    return weight.to(device) if device is not None else weight


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


def _mirror_combos(mirror_axes: Sequence[int], ndim: int) -> list[tuple[int, ...]]:
    axes = tuple(sorted({int(a) for a in mirror_axes}))
    if any(a < 0 or a >= ndim for a in axes):
        raise InferenceError(f"Mirror axes {tuple(mirror_axes)} must be spatial axes 0..{ndim - 1}.")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _call_predictor(predictor: Predictor | Sequence[Predictor], x: torch.Tensor) -> torch.Tensor:
    def first(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, (list, tuple)) else out

    if isinstance(predictor, (list, tuple)):  # ensemble of predictors: mean logits
        outs = [first(p(x)).float() for p in predictor]
        return sum(outs[1:], outs[0]) / len(outs)
    return first(predictor(x))


def count_tiles(
    image_shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5, mirror_axes: Sequence[int] = ()
) -> int:
    """Number of predictor tile evaluations :func:`sliding_window` will make (its Progress total).

    ``image_shape`` is spatial; a patch with one axis fewer means slice-wise along axis 0.
    """
    spatial, patch = _full_patch(image_shape, patch_size)
    padded = [max(s, p) for s, p in zip(spatial, patch)]
    starts = compute_tile_starts(padded, patch, step)
    if len(patch_size) == len(spatial) - 1:
        starts[0] = list(range(padded[0]))
    return math.prod(len(s) for s in starts) * 2 ** len(set(mirror_axes))


def _full_patch(spatial: Sequence[int], patch_size: Sequence[int]) -> tuple[tuple, tuple]:
    spatial = tuple(int(s) for s in spatial)
    patch = tuple(int(p) for p in patch_size)
    if len(patch) == len(spatial) - 1:
        return spatial, (1, *patch)
    if len(patch) != len(spatial):
        raise InferenceError(
            f"A {len(patch)}D patch cannot tile an image with {len(spatial)} spatial axes."
        )
    return spatial, patch


def _axis_weights(patch: Sequence[int], gaussian: bool, sigma_scale: float = 1 / 8) -> list[torch.Tensor]:
    """Per-axis float64 factors of the tile weight (each with maximum 1); their outer product is
    :func:`gaussian_importance` before its underflow guard (or all ones without ``gaussian``)."""
    out = []
    for p in patch:
        if not gaussian:
            out.append(torch.ones(p, dtype=torch.float64))
            continue
        x = torch.arange(p, dtype=torch.float64)
        g = torch.exp(-0.5 * ((x - (p - 1) / 2) / (p * sigma_scale)) ** 2)
        out.append(g / g.max())
    return out


def _outer(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Outer product of 1D tensors: shape ``tuple(len(f) for f in factors)``."""
    out = factors[0]
    for f in factors[1:]:
        out = out[..., None] * f
    return out


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
            nothing is lost; :func:`predict` uses it when only labels are wanted.

    Yields:
        ``Progress("tiles", done, total)`` after every predictor call; ``total`` is the number of
        tiles times the number of mirror combinations (see :func:`count_tiles`).

    Returns:
        Blended logits ``(K, *spatial)`` (``(K - 1, *spatial)`` when ``relative``) in
        ``accumulate_dtype`` (float32 by default) on ``accumulate_device``.
    """
    lazy = not isinstance(image, torch.Tensor) and hasattr(image, "materialize")
    if not isinstance(image, torch.Tensor) and not lazy:
        image = torch.as_tensor(np.asarray(image))
    if image.ndim not in (3, 4):
        raise InferenceError(f"Expected a (C, y, x) or (C, z, y, x) image tensor, got shape {tuple(image.shape)}.")
    if batch_size < 1:
        raise InferenceError(f"batch_size must be at least 1, got {batch_size}.")
    if accumulate_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise InferenceError(f"accumulate_dtype must be a floating dtype, got {accumulate_dtype}.")
    spatial, full_patch = _full_patch(image.shape[1:], patch_size)
    slicewise = len(full_patch) != len(patch_size)
    patch = full_patch[1:] if slicewise else full_patch
    combos = _mirror_combos(mirror_axes, len(patch))
    image_device = torch.device("cpu") if lazy else image.device
    device = torch.device(device) if device is not None else image_device
    acc_dev = torch.device(accumulate_device) if accumulate_device is not None else image_device
    amp = device.type == "cuda" if amp is None else bool(amp)
    if not lazy and image.device != device and acc_dev == device:
        image = image.to(device)  # once, not per tile
    memory_format = None
    if channels_last:
        memory_format = torch.channels_last_3d if len(patch) == 3 else torch.channels_last

    # Pad axes smaller than the patch (centred, constant 0), remember how to crop back.
    pad_lo = [max(p - s, 0) // 2 for s, p in zip(spatial, full_patch)]
    pad_hi = [max(p - s, 0) - lo for s, p, lo in zip(spatial, full_patch, pad_lo)]
    if any(pad_lo) or any(pad_hi):
        if lazy:  # an axis smaller than the patch: small enough to hold whole
            image = torch.from_numpy(image.materialize())
        pairs = [v for lo, hi in zip(reversed(pad_lo), reversed(pad_hi)) for v in (lo, hi)]
        image = F.pad(image, pairs, mode="constant", value=0.0)
    padded = tuple(image.shape[1:])
    starts = compute_tile_starts(padded, full_patch, step)
    if slicewise:
        starts[0] = list(range(padded[0]))
    regions = [
        tuple(slice(s, s + p) for s, p in zip(pos, full_patch)) for pos in itertools.product(*starts)
    ]
    total = len(regions) * len(combos)

    # The tile weight, a product of per-axis factors; the mirror average (a power of two: exact) is
    # folded into it, so each tile costs one fused multiply-add into the accumulator.
    factors = _axis_weights(patch, gaussian)
    if accumulate_dtype in (torch.float16, torch.bfloat16):
        # Corner weights (~1e-10 in 3D) would round to 0 in half precision: floor each axis at 0.1.
        factors = [f.clamp(min=0.1) for f in factors]
    if slicewise:
        factors = [torch.ones(1, dtype=torch.float64), *factors]
    weight = _outer(factors).to(torch.float32)
    separable = bool((weight > 0).all())
    if not separable:  # float underflow far from the centre (tiny sigma): gaussian_importance's guard
        weight[weight == 0] = weight[weight > 0].min()
    weight = weight.to(acc_dev)
    tile_weight = weight / len(combos) if len(combos) > 1 else weight
    if relative and num_classes < 2:
        raise InferenceError("relative logits need at least 2 classes.")
    channels = num_classes - 1 if relative else num_classes
    logits = torch.zeros((channels, *padded), dtype=accumulate_dtype, device=acc_dev)
    logger.debug("Sliding window: %d tiles x %d mirrorings, patch %s", len(regions), len(combos), full_patch)

    done = 0
    for b0 in range(0, len(regions), batch_size):
        batch = regions[b0 : b0 + batch_size]
        with torch.inference_mode():
            tiles = torch.stack([image[(slice(None), *r)] for r in batch])
            tiles = tiles.to(device=device, dtype=torch.float32)
            if slicewise:
                tiles = tiles.squeeze(2)
            if memory_format is not None:
                tiles = tiles.contiguous(memory_format=memory_format)
            summed = None
        for flips in combos:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                dims = [2 + a for a in flips]
                out = _call_predictor(predictor, tiles.flip(dims) if flips else tiles)
                expected = (len(batch), num_classes, *patch)
                if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise InferenceError(
                        f"The predictor returned {got} for tiles {tuple(tiles.shape)}; expected {expected}."
                    )
                if flips:
                    out = out.flip(dims)
                if summed is None:  # a copy when it will be added to (out may alias the tiles)
                    summed = out.to(device=acc_dev, dtype=torch.float32, copy=len(combos) > 1)
                else:
                    summed += out.to(device=acc_dev, dtype=torch.float32)
            done += len(batch)
            yield Progress("tiles", done, total)
        with torch.inference_mode():
            if slicewise:
                summed = summed.unsqueeze(2)
            if relative:  # in place: summed is ours (a copy, or the predictor's fresh output)
                summed = summed[:, 1:].sub_(summed[:, :1])
            for i, region in enumerate(batch):
                logits[(slice(None), *region)].addcmul_(summed[i], tile_weight)
        del summed, tiles, out

    with torch.inference_mode():
        _normalise_by_coverage(logits, weight, factors, starts, regions, separable)
    crop = tuple(slice(lo, lo + s) for lo, s in zip(pad_lo, spatial))
    return logits[(slice(None), *crop)].contiguous() if any(pad_lo) or any(pad_hi) else logits


def _normalise_by_coverage(
    logits: torch.Tensor, weight: torch.Tensor, factors: list[torch.Tensor], starts: list[list[int]],
    regions: list[tuple[slice, ...]], separable: bool, slab_voxels: int = 1 << 22,
) -> None:
    """Divide the accumulated logits by the summed tile weights, in place.

    With a separable weight the sum is the outer product of per-axis sums (float64), computed for a
    slab of axis-0 positions at a time, so no weight volume is ever allocated.
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
    rest = _outer(per_axis[1:]) if len(per_axis) > 1 else torch.ones((), dtype=torch.float64)
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


# ----------------------------------------------------------------------------------- predict
@dataclass
class PredictionResult:
    """What :func:`predict` returns, in the source geometry.

    Attributes:
        labels: ``(z, y, x)`` (or ``(y, x)`` for a 2D image), uint8, or uint16 beyond 256 classes.
        probabilities: ``(K, *spatial)`` float32 mean softmax, when requested.
        uncertainty: ``(*spatial)`` float32 entropy of the mean softmax / log K, in [0, 1], when requested.
        label_names: Class index -> name.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    label_names: dict[int, str] = field(default_factory=dict)


def _relay(gen: Generator, offset: int, total: int) -> Generator[Progress, None, Any]:
    """Forward a sliding window's events with a global tile count; close it if we are closed."""
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            yield Progress("tiles", offset + event.current, total, event.message)
    finally:
        gen.close()


def _as_channels_first(image: Any, spacing: Sequence[float]) -> tuple[np.ndarray, tuple, bool]:
    """Return ``(C, *spatial)``, the spacing, and whether the image is 2D.

    Numbers keep their dtype (preprocessing casts them: a lazily preprocessed integer CT is cast
    tile by tile, never as a float32 volume); anything else is cast to float32 here."""
    image = np.asarray(image)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) not in (2, 3):
        raise InferenceError(f"Spacing must have 2 or 3 entries (one per spatial axis), got {spacing}.")
    if image.ndim == len(spacing):
        image = image[None]
    elif image.ndim != len(spacing) + 1:
        raise InferenceError(
            f"Image of shape {image.shape} does not match a {len(spacing)}D spacing {spacing}: expected "
            f"{len(spacing)} spatial axes, optionally after a channel axis."
        )
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InferenceError(f"Spacing must be finite and positive, got {spacing}.")
    if image.dtype.kind not in "biuf":
        image = image.astype(np.float32)
    return image, spacing, len(spacing) == 2


def _accumulation_device(device: torch.device, nbytes: int) -> torch.device:
    """Accumulate on the GPU when it comfortably fits, else on the CPU."""
    if device.type != "cuda":
        return device if device.type == "mps" else torch.device("cpu")
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return torch.device("cpu")
    return device if nbytes < 0.5 * free else torch.device("cpu")


def _load_all(checkpoints: Any) -> list[Checkpoint]:
    if isinstance(checkpoints, (str, os.PathLike, Checkpoint)):
        checkpoints = [checkpoints]
    ckpts = [c if isinstance(c, Checkpoint) else load_checkpoint(c) for c in checkpoints]
    if not ckpts:
        raise InferenceError("No checkpoint given: predict needs at least one trained model.")
    classes = {c.num_classes for c in ckpts}
    if len(classes) > 1:
        raise CheckpointError(f"Checkpoints of an ensemble must predict the same classes; got counts {sorted(classes)}.")
    return ckpts


def tta_mirror_axes(ckpt: Checkpoint, mirror: bool = True) -> tuple[int, ...]:
    """Patch axes to mirror at test time: those the model was trained to see mirrored (nnU-Net's
    rule), all of them when the checkpoint does not say, none without ``mirror``."""
    if not mirror:
        return ()
    trained = ckpt.train_config.get("mirror_axes")
    return tuple(range(ckpt.spatial_dims)) if trained is None else tuple(int(a) for a in trained)


def _plan_of(ckpt: Checkpoint) -> Plan:
    try:
        plan = Plan.from_dict(ckpt.plan)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"The checkpoint's preprocessing plan is invalid: {err}") from err
    if len(plan.patch_size) != ckpt.spatial_dims:
        raise CheckpointError(
            f"The checkpoint's plan has a {len(plan.patch_size)}D patch but its model is {ckpt.spatial_dims}D."
        )
    return plan


def predict(
    image: np.ndarray,
    spacing: Sequence[float],
    checkpoints: Sequence[str | os.PathLike | Checkpoint] | str | Checkpoint,
    *,
    device: Any = "auto",
    mirror: bool = True,
    step: float = 0.5,
    batch_size: int = 1,
    largest_component: bool = False,
    return_probabilities: bool = False,
    return_uncertainty: bool = False,
) -> Generator[Progress, None, PredictionResult]:
    """Segment an image with one checkpoint or an ensemble (softmax averaged over checkpoints).

    Each checkpoint's own plan preprocesses the image (checkpoints sharing a plan share the work),
    the sliding window runs (slice by slice for a 2D model), the softmax is restored to the source
    geometry and averaged; labels are its argmax.

    Args:
        image: ``(z, y, x)`` or ``(C, z, y, x)`` (or 2D ``(y, x)`` / ``(C, y, x)``), napari order.
        spacing: One value per spatial axis, napari order, mm.
        checkpoints: Paths or loaded :class:`Checkpoint` s.
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"``, ``"mps"``.
        mirror: Mirroring test-time augmentation over all spatial axes of the patch.
        step: Tile stride as a fraction of the patch.
        batch_size: Tiles (or slices) per model call.
        largest_component: Keep only the largest connected component of each class.
        return_probabilities: Also return the mean softmax ``(K, *spatial)``.
        return_uncertainty: Also return normalised entropy of the mean softmax.

    Yields:
        ``Progress`` with stages ``"preprocess"``, ``"tiles"`` (one count over all checkpoints and
        mirrorings, total known up front) and ``"postprocess"``.

    Returns:
        :class:`PredictionResult`.

    Raises:
        CheckpointError: unreadable checkpoints, or an image they cannot take (checked before compute).
    """
    from napari_medseg.engine.preprocessing import (
        LazyNormalizedImage,
        is_resampled,
        preprocess_case,
        restore_labels,
        restore_probabilities,
    )

    ckpts = _load_all(checkpoints)
    data, spacing, is_2d = _as_channels_first(image, spacing)
    from napari_medseg.engine.patchfree import is_patchfree, predict_patchfree

    if any(is_patchfree(ck) for ck in ckpts):  # whole-volume super-resolving models (PFSeg)
        return (yield from predict_patchfree(
            data, spacing, ckpts, device=device, mirror=mirror, largest_component=largest_component,
            return_probabilities=return_probabilities, return_uncertainty=return_uncertainty,
        ))
    for ck in ckpts:
        check_compatible(ck, data.shape[0], 2 if is_2d else 3)
    plans = [_plan_of(ck) for ck in ckpts]
    dev = resolve_device(device)
    num_classes = ckpts[0].num_classes

    groups: dict[str, list[int]] = {}  # checkpoints sharing a plan share the preprocessing
    for i, plan in enumerate(plans):
        key = json.dumps(plan.to_dict(), sort_keys=True)
        if plan.previous_stage:  # a cascade's input depends on its own previous stage too
            key += str(ckpts[i].path or i)
        groups.setdefault(key, []).append(i)
    prepared = []
    yield Progress("preprocess", 0, len(groups))
    for g, members in enumerate(groups.values()):
        plan = plans[members[0]]
        if plan.previous_stage:  # the cascade: the low-res stage first, its one-hot as extra channels
            from .cascade import cascade_input, previous_stage_checkpoint, previous_stage_labels

            prev = yield from previous_stage_labels(
                data, spacing, previous_stage_checkpoint(ckpts[members[0]]), device=device, mirror=mirror,
                step=step, batch_size=batch_size,
            )
            pre, _, props = cascade_input(data, spacing, plan, prev)
        else:
            # A 2D image becomes one slice; without resampling the image stays lazy (tiles are
            # normalised when read: no float32 copy of the volume).
            pre, _, props = preprocess_case(data, spacing, plan, lazy=True)
        prepared.append((plan, members, pre, props))
        yield Progress("preprocess", g + 1, len(groups))

    def axes(i: int) -> tuple[int, ...]:
        return tta_mirror_axes(ckpts[i], mirror)

    counts = {
        i: count_tiles(pre.shape[1:], plan.patch_size, step, axes(i))
        for plan, members, pre, _ in prepared
        for i in members
    }
    total = sum(counts.values())
    done = 0
    # Labels only, one checkpoint, no resampling back: accumulate logits relative to class 0
    # (num_classes - 1 volumes) and take the argmax on the plan grid; the softmax, the restore of
    # K probability volumes and their mean are never needed (the same labels: argmax is unchanged
    # by softmax and by the shift, and restoring without resampling is a crop and a transpose).
    labels_only = (
        len(ckpts) == 1 and num_classes >= 2 and not (return_probabilities or return_uncertainty)
        and not is_resampled(prepared[0][3], prepared[0][0])
    )
    mean: np.ndarray | None = None
    for idx, (plan, members, pre, props) in enumerate(prepared):
        nbytes = (num_classes * (1 if labels_only else 2) + 1 + pre.shape[0]) * int(np.prod(pre.shape[1:])) * 4
        acc_dev = _accumulation_device(dev, nbytes)
        if isinstance(pre, LazyNormalizedImage) and acc_dev.type != "cpu":
            pre = pre.materialize()  # accumulating on the GPU: the image goes there once
        tensor = pre if isinstance(pre, LazyNormalizedImage) else (
            torch.from_numpy(np.ascontiguousarray(pre, dtype=np.float32)).to(acc_dev)
        )
        group_sum = None
        for i in members:
            model = build_model(ckpts[i], dev)

            def window(bs, acc, model=model, tensor=tensor, plan=plan, i=i, done=done):
                # One rung of the out-of-memory ladder (engine.oom): fewer tiles, then CPU accumulation.
                lazy = isinstance(tensor, LazyNormalizedImage)
                src = tensor if lazy or acc == tensor.device else tensor.to(acc)
                return _relay(sliding_window(
                    model, src, plan.patch_size, num_classes, step=step, batch_size=bs,
                    mirror_axes=axes(i), device=dev, accumulate_device=acc, relative=labels_only,
                ), done, total)

            logits = yield from sliding_window_with_fallback(
                window, batch_size, acc_dev, dev, what=f"an image of {'x'.join(map(str, pre.shape))} voxels",
            )
            done += counts[i]
            if labels_only:
                del model, tensor, window, pre
                prepared[idx] = None
                yield Progress("postprocess", 0, 1)
                labels = _argmax_relative(logits)
                del logits  # before the restore: the K - 1 volumes are the peak
                labels = restore_labels(labels, props, plan)
                if largest_component:
                    labels = keep_largest_component(labels, range(1, num_classes))
                result = PredictionResult(labels=labels)
                result.label_names = _label_names(ckpts[0])
                yield Progress("postprocess", 1, 1)
                return result
            with torch.inference_mode():
                probs = _softmax_(logits)  # in place: no second K-channel volume
                if group_sum is not None and group_sum.device != probs.device:  # one member fell back to CPU
                    group_sum, probs = group_sum.cpu(), probs.cpu()
                group_sum = probs if group_sum is None else group_sum.add_(probs)
            del model, logits, probs
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        with torch.inference_mode():
            group_mean = (group_sum.div_(len(members)) if len(members) > 1 else group_sum).cpu().numpy()
        del group_sum, tensor, window, pre
        prepared[idx] = None  # free the preprocessed image before the restore (peak memory)
        restored = np.asarray(restore_probabilities(group_mean, props, plan, overwrite_input=True), dtype=np.float32)
        restored *= len(members) / len(ckpts)
        mean = restored if mean is None else np.add(mean, restored, out=mean)
        del group_mean

    yield Progress("postprocess", 0, 1)
    result = _finish(mean, largest_component, return_probabilities, return_uncertainty)
    result.label_names = _label_names(ckpts[0])
    yield Progress("postprocess", 1, 1)
    return result


def _softmax_(logits: torch.Tensor, slab_voxels: int = 1 << 22) -> torch.Tensor:
    """Softmax over axis 0, in place, a slab of axis-1 positions at a time (the same values as
    ``torch.softmax(logits, 0)`` without a second ``(K, *spatial)`` tensor)."""
    if logits.ndim < 2:
        return torch.softmax(logits, dim=0)
    per_row = max(1, math.prod(logits.shape[2:]))
    step = max(1, slab_voxels // per_row)
    for z0 in range(0, logits.shape[1], step):
        logits[:, z0 : z0 + step] = torch.softmax(logits[:, z0 : z0 + step], dim=0)
    return logits


def _argmax_labels(mean: np.ndarray, slab_voxels: int = 1 << 22) -> np.ndarray:
    """``argmax`` over axis 0 as uint8 (uint16 beyond 256 classes), a slab at a time, so the int64
    index array numpy makes exists for one slab only."""
    labels = np.empty(mean.shape[1:], np.uint8 if mean.shape[0] <= 256 else np.uint16)
    if labels.ndim == 0:
        labels[()] = np.argmax(mean)
        return labels
    step = max(1, slab_voxels // max(1, math.prod(mean.shape[2:])))
    for z0 in range(0, mean.shape[1], step):
        labels[z0 : z0 + step] = np.argmax(mean[:, z0 : z0 + step], axis=0)
    return labels


def _argmax_relative(relative: torch.Tensor, slab_voxels: int = 1 << 22) -> np.ndarray:
    """Labels from logits relative to class 0 (``(K - 1, *spatial)``, see ``sliding_window(...,
    relative=True)``): ``argmax`` over ``[0, l_1 - l_0, ...]``, first class on ties, as uint8
    (uint16 beyond 256 classes), a slab at a time."""
    k = relative.shape[0] + 1
    labels = np.empty(tuple(relative.shape[1:]), np.uint8 if k <= 256 else np.uint16)
    step = max(1, slab_voxels // max(1, math.prod(relative.shape[2:])))
    with torch.inference_mode():
        for z0 in range(0, relative.shape[1], step):
            slab = relative[:, z0 : z0 + step].float()
            best, idx = slab.max(0)  # the first maximum on ties
            idx += 1
            idx.masked_fill_(best <= 0, 0)  # class 0 (relative logit 0) wins ties
            labels[z0 : z0 + step] = idx.cpu().numpy()
    return labels


def _finish(
    mean: np.ndarray, largest: bool, want_probs: bool, want_uncertainty: bool
) -> PredictionResult:
    num_classes = mean.shape[0]
    labels = _argmax_labels(mean)
    if largest:
        labels = keep_largest_component(labels, range(1, num_classes))
    uncertainty = None
    if want_uncertainty:
        if num_classes < 2:
            uncertainty = np.zeros(mean.shape[1:], np.float32)
        else:
            p = np.clip(mean, 1e-12, 1.0)
            entropy = -(p * np.log(p)).sum(axis=0) / math.log(num_classes)
            uncertainty = np.clip(entropy, 0.0, 1.0).astype(np.float32)
    return PredictionResult(
        labels=labels, probabilities=mean if want_probs else None, uncertainty=uncertainty
    )


def _label_names(ckpt: Checkpoint) -> dict[int, str]:
    names = {i: ("background" if i == 0 else f"class_{i}") for i in range(ckpt.num_classes)}
    names.update({int(k): v for k, v in ckpt.label_names.items()})
    return names


def predict_file(
    path_in: str | os.PathLike | Sequence[str | os.PathLike],
    path_out: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike | Checkpoint] | str | Checkpoint,
    *,
    save_probabilities: bool = False,
    **kwargs: Any,
) -> Generator[Progress, None, PredictionResult]:
    """Segment a NIfTI file (or one file per channel, nnU-Net style) and write the label map.

    The labels are written with the source file's geometry, so they overlay it in any viewer.

    Args:
        path_in: The image file, or one file per channel (``case_0000.nii.gz``, ``case_0001...``).
        path_out: Label file to write (``.nii`` / ``.nii.gz``); its folder is created.
        checkpoints: As for :func:`predict`.
        save_probabilities: Also write the mean softmax beside the labels as ``<name>.npz``
            (``probabilities`` float32 ``(K, z, y, x)``, ``spacing``, ``label_names`` as JSON), as
            nnU-Net does; an ``.npz`` keeps the output folder evaluable as label maps only.
        **kwargs: Passed to :func:`predict`.

    Returns:
        The :class:`PredictionResult`.
    """
    from napari_medseg.io import is_nifti_path, read_nifti, write_nifti

    paths = [path_in] if isinstance(path_in, (str, os.PathLike)) else list(path_in)
    if not paths:
        raise InferenceError("predict_file needs at least one input file.")
    path_out = os.fspath(path_out)
    if not is_nifti_path(path_out):  # fail before the compute, not after
        raise InferenceError(f"{path_out}: the output name must end with .nii or .nii.gz.")
    os.makedirs(os.path.dirname(os.path.abspath(path_out)), exist_ok=True)
    volumes = [read_nifti(p) for p in paths]
    channels = [v.data if v.channel_axis == 0 else v.data[None] for v in volumes]
    shapes = {c.shape[1:] for c in channels}
    if len(shapes) > 1:
        raise InferenceError(f"The channel files of one case differ in shape: {sorted(shapes)}.")
    data = channels[0] if len(channels) == 1 else np.concatenate(channels, axis=0)
    if save_probabilities:
        kwargs["return_probabilities"] = True
    result = yield from predict(data, volumes[0].spacing, checkpoints, **kwargs)
    write_nifti(path_out, result.labels, geometry=volumes[0], is_label=True)
    logger.info("Wrote %s", path_out)
    if save_probabilities:
        _save_probabilities(_probabilities_path(path_out), result, volumes[0].spacing)
    return result


def _probabilities_path(label_path: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if label_path.endswith(ext):
            return label_path[: -len(ext)] + ".npz"
    return label_path + ".npz"


def _save_probabilities(path: str, result: PredictionResult, spacing: Sequence[float]) -> None:
    """Write the probabilities as a compressed ``.npz``, atomically."""
    tmp = path + ".tmp.npz"
    try:
        np.savez_compressed(
            tmp, probabilities=result.probabilities, spacing=np.asarray(spacing, np.float64),
            label_names=np.asarray(json.dumps({str(k): v for k, v in result.label_names.items()})),
        )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.info("Wrote %s", path)


__all__ = [
    "InferenceError",
    "PredictionResult",
    "compute_tile_starts",
    "count_tiles",
    "gaussian_importance",
    "optimize_predictor",
    "predict",
    "predict_file",
    "sliding_window",
    "tta_mirror_axes",
]
