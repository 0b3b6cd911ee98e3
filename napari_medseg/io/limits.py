"""Size guards: estimate the memory a step will need before it allocates, and refuse with the numbers.

A corrupt or crafted header (a gzip bomb announcing gigabytes, a voxel size in the wrong unit that
makes resampling explode, a checkpoint whose architecture settings describe a giant network) would
otherwise run until the operating system kills the process, or end in a bare ``MemoryError``.
Each guard estimates its peak from headers and settings alone and compares it with the memory this
process may use (:func:`available_bytes`): ``MemAvailable`` of the host, lowered to a container's
cgroup limit and to the user's ``MEDSEG_MAX_MEMORY_GB``.

``MEDSEG_SIZE_GUARD=off`` turns every guard off (for a user who means it: swap, or an estimate
that is too cautious). Plain Python and numpy only: no torch, usable from ``io`` and the engine.
"""

from __future__ import annotations

import logging
import os

__all__ = [
    "GUARD_ENV", "MEMORY_ENV", "available_bytes", "cgroup_free_bytes", "check_memory", "format_bytes",
    "guard_enabled", "host_available_bytes", "memory_cap_bytes",
]

logger = logging.getLogger(__name__)

#: The user's memory budget in GiB (also read by ``engine.runtime.memory``).
MEMORY_ENV = "MEDSEG_MAX_MEMORY_GB"
#: ``off`` (or ``0``/``false``/``no``) turns the size guards off.
GUARD_ENV = "MEDSEG_SIZE_GUARD"


def guard_enabled() -> bool:
    """False when the user turned the size guards off (``MEDSEG_SIZE_GUARD=off``)."""
    return os.environ.get(GUARD_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # other platforms
        import psutil  # noqa: PLC0415 - optional, only where /proc is missing

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no estimate rather than a failure
        return None


def cgroup_free_bytes() -> int | None:
    """Bytes left under the cgroup (v2) memory limit of this process, ``None`` without a limit
    (or when ``/sys/fs/cgroup/memory.max`` / ``memory.current`` cannot be read)."""
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as fh:
            return max(int(limit) - int(fh.read().strip()), 0)
    except (OSError, ValueError):
        return None


def memory_cap_bytes() -> int | None:
    """The user's memory budget from ``MEDSEG_MAX_MEMORY_GB`` in bytes; ``None`` when unset.

    A value that is not a number is ignored (with a warning).
    """
    text = os.environ.get(MEMORY_ENV)
    if not text:
        return None
    try:
        return int(float(text) * 2**30)
    except ValueError:
        logger.warning("Ignoring %s=%r: not a number of GiB.", MEMORY_ENV, text)
        return None


def host_available_bytes() -> int | None:
    """``MemAvailable`` of the host, lowered to the cgroup's remaining limit (``None``: unknown)."""
    values = [v for v in (_meminfo_available(), cgroup_free_bytes()) if v is not None]
    return min(values) if values else None


def available_bytes() -> int | None:
    """Bytes of main memory this process may plan to use: :func:`host_available_bytes` capped by
    :func:`memory_cap_bytes`; ``None`` when it cannot be told."""
    values = [v for v in (host_available_bytes(), memory_cap_bytes()) if v is not None]
    return min(values) if values else None


def format_bytes(n: float) -> str:
    """``1.5 GB``-style text (powers of 1024)."""
    n = float(n)
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PB"  # pragma: no cover


def check_memory(nbytes: float, what: str, error: type[Exception] = MemoryError, hint: str = "") -> None:
    """Refuse a step that would need ``nbytes`` of memory when less is available.

    Args:
        nbytes: The step's estimated peak.
        what: The step, e.g. ``"scan.nii.gz: reading 512x512x400 int16 voxels"``.
        error: The exception type to raise (the caller's own error class).
        hint: What the user can do, appended to the message.

    Raises:
        error: with the estimate and the memory available (unless ``MEDSEG_SIZE_GUARD=off``).
    """
    if not guard_enabled():
        return
    free = available_bytes()
    if free is None or nbytes <= free:
        return
    cap = " (your MEDSEG_MAX_MEMORY_GB)" if memory_cap_bytes() == free else ""
    raise error(
        f"{what} would need about {format_bytes(nbytes)} of memory; {format_bytes(free)} is available{cap}. "
        f"{hint + ' ' if hint else ''}Set {GUARD_ENV}=off to try anyway."
    )
