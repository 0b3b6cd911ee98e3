"""How much memory a job may plan to use, and where inference should keep its large buffers.

Two questions come up before a memory-hungry step (a whole-volume forward, a logits accumulator):
how many bytes are free on a device (:func:`available_memory_bytes`, which honours the user's
``MEDSEG_MAX_MEMORY_GB`` cap and a container's cgroup limit), and whether a buffer of a given
size should live on the accelerator or in main memory (:func:`accumulation_device`).

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import logging

import torch

from napari_medseg.io.limits import (
    MEMORY_ENV,
    cgroup_free_bytes,
    host_available_bytes,
    memory_cap_bytes,
)

logger = logging.getLogger(__name__)


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory for a job on ``device`` (``None`` when it cannot be told).

    CUDA: ``torch.cuda.mem_get_info``. CPU: ``MemAvailable`` of ``/proc/meminfo``, lowered to the
    cgroup's remaining limit when one is set (:func:`cgroup_free_bytes`). ``MEDSEG_MAX_MEMORY_GB``
    (:func:`memory_cap_bytes`) caps the result on every device.
    """
    free: int | None = None
    if device.type == "cuda":
        try:
            free = int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            free = None
    elif device.type == "cpu":
        free = host_available_bytes()
    cap = memory_cap_bytes()
    if cap is not None:
        free = cap if free is None else min(free, cap)
    return free


def accumulation_device(device: torch.device, nbytes: int) -> torch.device:
    """Where inference should keep ``nbytes`` of accumulators when its model runs on ``device``.

    On CUDA: the GPU when the buffers take less than half of its free memory, else the CPU. MPS
    accumulates on MPS; every other device on the CPU.
    """
    if device.type != "cuda":
        return device if device.type == "mps" else torch.device("cpu")
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return torch.device("cpu")
    return device if nbytes < 0.5 * free else torch.device("cpu")


__all__ = [
    "MEMORY_ENV",
    "accumulation_device",
    "available_memory_bytes",
    "cgroup_free_bytes",
    "memory_cap_bytes",
]
