"""Shared timing helpers for the benchmarks (run on demand, never collected by pytest).

The machine the benchmarks run on may be shared and noisy, so contenders are *interleaved*
(A B C A B C ...) rather than timed one after the other, every repeat is kept (print them so the
noise is visible) and the median is what the ratios use.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Run ``fn`` once; return ``(seconds, result)``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    return statistics.median(repeat_times(fn, repeats, warmup))


def repeat_times(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[0] for _ in range(repeats)]


def interleaved(
    contenders: Mapping[str, Callable[[], object]],
    repeats: int = 3,
    warmup: int = 1,
    on_repeat: Callable[[int, str, float], None] | None = None,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time several contenders round-robin: ``warmup`` rounds untimed, then ``repeats`` timed rounds.

    The order rotates from round to round. Interleaving spreads the machine's background load evenly over the contenders, so their ratio
    is fairer than timing one block after another.

    Args:
        contenders: Name -> zero-argument callable.
        repeats: Timed rounds.
        warmup: Untimed rounds first (first-call allocations, oneDNN kernel selection).
        on_repeat: Called as ``on_repeat(round, name, seconds)`` after every timed call.
        cpu_times: If given, filled with each call's process CPU time (all threads,
            ``time.process_time``): on a shared machine it varies less with other people's load
            than wall time does (other processes' time is not counted), so print both.

    Returns:
        Name -> list of per-round seconds.
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        # Rotate the order every round (A B C, B C A, C A B, ...): under a load that drifts during
        # a round, no contender is always first.
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = contenders[name]
            c0 = time.process_time()
            dt, _ = timed(fn)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - c0)
            times[name].append(dt)
            if on_repeat is not None:
                on_repeat(r, name, dt)
    return times


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return statistics.median(values)


def fmt_times(values: Sequence[float], unit: str = "s") -> str:
    """``"1.23 s (1.20, 1.23, 1.31)"``: the median and each repeat."""
    scale = {"s": 1.0, "ms": 1e3}[unit]
    each = ", ".join(f"{v * scale:.2f}" for v in values)
    return f"{median(values) * scale:.2f} {unit} ({each})"


def report(times: Mapping[str, Sequence[float]], baseline: str, unit: str = "s", label: str = "") -> None:
    """Print each contender's median and repeats, and its ratio to ``baseline`` (below 1 is faster)."""
    base = median(times[baseline])
    width = max(len(n) for n in times)
    for name, values in times.items():
        ratio = median(values) / base
        print(f"  {label}{name:<{width}s} {fmt_times(values, unit)}   ratio to {baseline}: {ratio:.3f}")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
