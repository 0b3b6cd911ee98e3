"""Out-of-memory recovery: recognise allocation failures and step down a ladder of cheaper settings.

Inference (:func:`sliding_window_with_fallback`) retries a sliding window that ran out of memory
with half as many tiles per batch, down to one; then, when the logits were accumulated on an
accelerator, once more with accumulation on the CPU; and only then raises
:class:`InsufficientMemoryError`, whose message says what was tried and what the user can do.

Training (:func:`halve_batch_and_patch`) halves the batch and the patch (keeping the patch
divisible by the network's pooling), and refuses to go below one sample of the smallest patch.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch

from napari_medseg.engine.jobs import Progress
from napari_medseg.errors import MedsegError

logger = logging.getLogger(__name__)

#: Lower-case fragments of allocator error messages (CUDA, CPU, MPS, cuDNN/cuBLAS) that mean
#: "an allocation failed".
_OOM_FRAGMENTS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "failed to allocate",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
)


class InsufficientMemoryError(MedsegError, RuntimeError):
    """A job ran out of memory even at the cheapest settings the recovery ladder allows."""


def is_oom_error(exc: BaseException) -> bool:
    """True when ``exc`` means an allocation failed (CUDA, MPS or CPU), false otherwise.

    Recognises ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``), Python's
    ``MemoryError`` and ``RuntimeError`` s whose message is an allocator's out-of-memory message
    (``"CUDA out of memory"``, ``"DefaultCPUAllocator: can't allocate memory"``, ``"MPS backend
    out of memory"``, ``CUDNN_STATUS_ALLOC_FAILED``). :class:`InsufficientMemoryError` (the ladder's
    own verdict) is not retried, so it is not counted.
    """
    if isinstance(exc, InsufficientMemoryError):
        return False
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(fragment in text for fragment in _OOM_FRAGMENTS)
    return False


def release_memory(device: Any = None) -> None:
    """Collect garbage and return cached accelerator memory to the driver (best effort)."""
    gc.collect()
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if dev is not None and dev.type == "mps" and mps is not None and hasattr(mps, "empty_cache"):
        mps.empty_cache()


def inference_ladder(batch_size: int, accumulate_device: Any) -> list[tuple[int, torch.device]]:
    """The settings :func:`sliding_window_with_fallback` tries, in order.

    ``batch_size`` halves down to 1 on ``accumulate_device``; then, if that is not the CPU, one
    more rung with one tile per batch accumulated on the CPU.

    Example:
        ``inference_ladder(4, "cuda")`` is ``[(4, cuda), (2, cuda), (1, cuda), (1, cpu)]``.
    """
    acc = torch.device(accumulate_device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    rungs = []
    bs = int(batch_size)
    while True:
        rungs.append((bs, acc))
        if bs == 1:
            break
        bs = max(1, bs // 2)
    if acc.type != "cpu":
        rungs.append((1, torch.device("cpu")))
    return rungs


def sliding_window_with_fallback(
    make_window: Callable[[int, torch.device], Generator[Progress, None, Any]],
    batch_size: int,
    accumulate_device: Any,
    device: Any,
    *,
    what: str = "the image",
) -> Generator[Progress, None, Any]:
    """Run ``make_window(batch_size, accumulate_device)`` and step down the ladder on OOM.

    Args:
        make_window: Builds the (relayed) sliding-window generator for one rung's settings.
        batch_size: Tiles per batch asked for.
        accumulate_device: Where logits are accumulated first.
        device: Where the predictor runs (named in the messages only).
        what: What is being segmented, for the final message (e.g. ``"an image of 1x96x96x96"``).

    Yields:
        The window's ``Progress`` events; before each retry, a ``Progress("tiles", 0, 0, text)``
        whose message says what failed and what is tried next.

    Returns:
        The window's result.

    Raises:
        InsufficientMemoryError: every rung ran out of memory; the message lists the settings tried
            and what to do (a smaller tile step or patch, another device, closing other programs).
    """
    rungs = inference_ladder(batch_size, accumulate_device)
    tried: list[str] = []
    for n, (bs, acc) in enumerate(rungs):
        gen = None
        failure: BaseException | None = None
        try:
            gen = make_window(bs, acc)  # may allocate too (moving the image)
            return (yield from gen)
        except Exception as exc:  # noqa: BLE001 - anything but OOM is re-raised below
            if not is_oom_error(exc):
                raise
            failure = exc
        finally:
            if gen is not None:
                gen.close()
        reason = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200] if str(failure) else ''}"
        del failure  # drop the traceback (and the tensors its frames hold) before retrying
        tried.append(f"{bs} tile(s) per batch, accumulating on {acc}")
        release_memory(device)
        release_memory(acc)
        if n + 1 < len(rungs):
            nbs, nacc = rungs[n + 1]
            text = (
                f"Out of memory on {device} with {tried[-1]} ({reason}); retrying with {nbs} tile(s) "
                f"per batch, accumulating on {nacc}."
            )
            logger.warning(text)
            yield Progress("tiles", 0, 0, text)
    raise InsufficientMemoryError(
        f"Not enough memory to segment {what} on {device}: ran out of memory with "
        + "; then with ".join(tried)
        + ". Close other programs using the device, choose the CPU device (slower, uses main "
        "memory), or segment a smaller region or crop."
    )


def halve_batch_and_patch(
    batch_size: int, patch_size: Sequence[int], divisors: Sequence[int], min_patch: Sequence[int] | None = None
) -> tuple[int, tuple[int, ...]]:
    """One step down the training ladder: halve the batch and the patch together.

    The batch halves (at least 1); the patch halves on every axis, rounded down to a multiple of
    that axis' divisor (the product of the network's pooling strides), never below the divisor or
    ``min_patch``.

    Returns:
        ``(new_batch_size, new_patch_size)``.

    Raises:
        InsufficientMemoryError: the batch is already 1 and no axis of the patch can shrink.
    """
    patch = tuple(int(p) for p in patch_size)
    divs = tuple(max(1, int(d)) for d in divisors)
    floor = tuple(max(d, int(m)) for d, m in zip(divs, min_patch or divs))
    new_batch = max(1, int(batch_size) // 2)
    new_patch = tuple(
        max(lo, (p // 2) // d * d) if p > lo else p for p, d, lo in zip(patch, divs, floor)
    )
    if new_batch == batch_size and new_patch == patch:
        raise InsufficientMemoryError(
            f"Not enough memory to train even one sample of patch {patch} (the smallest this network's "
            f"pooling allows is {floor}). Choose the CPU device, a smaller network (e.g. a smaller "
            "base width), or a machine with more memory."
        )
    return new_batch, new_patch


def pooling_divisors(pool_kernels: Sequence[Sequence[int]] | None, ndim: int) -> tuple[int, ...]:
    """Per-axis product of the pooling strides (what each patch axis must be divisible by)."""
    if not pool_kernels:
        return (1,) * ndim
    return tuple(math.prod(int(k[a]) for k in pool_kernels if len(k) > a) or 1 for a in range(ndim))


__all__ = [
    "InsufficientMemoryError",
    "halve_batch_and_patch",
    "inference_ladder",
    "is_oom_error",
    "pooling_divisors",
    "release_memory",
    "sliding_window_with_fallback",
]
