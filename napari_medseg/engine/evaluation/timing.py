"""Model facts the library shows: parameter counts and a CPU forward time, measured on this machine
and cached in the user folder."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from napari_medseg.engine.checkpoints.catalog import medseg_home, read_json_dict, write_json_dict
from napari_medseg.models import count_parameters, create_model, get_model_spec

logger = logging.getLogger(__name__)

TIMINGS_FILE = "model_timings.json"


def default_patch(model_name: str, model: Any = None) -> tuple[int, ...]:
    """The "default patch" the library times: 128^3 in 3D, 256^2 in 2D, rounded up to the
    model's input divisor."""
    spec = get_model_spec(model_name)
    dims = spec.spatial_dims[0]
    if model is None:
        model = create_model(model_name, 1, 2, dims)
    divisor = getattr(model, "input_divisor", None) or (1,) * dims
    if callable(divisor):
        divisor = divisor()
    base = 128 if dims == 3 else 256
    return tuple(int(-(-base // d) * d) for d in divisor)


def default_parameter_count(model_name: str) -> int:
    """Trainable parameters of ``model_name`` in its default configuration: its default kwargs,
    1 channel, 2 classes, its highest dimensionality (3D for a 2D/3D family). The one figure that
    the model library, ``napari-medseg models`` and the README show."""
    spec = get_model_spec(model_name)
    return int(count_parameters(create_model(model_name, 1, 2, spec.spatial_dims[-1], **spec.default_kwargs)))


def _timing_key(model_name: str, patch: tuple[int, ...]) -> str:
    return f"{model_name}|{'x'.join(map(str, patch))}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def cached_cpu_time(model_name: str) -> tuple[float, tuple[int, ...]] | None:
    """``(seconds, patch)`` measured earlier on this machine, if any (no model is built)."""
    data = read_json_dict(medseg_home() / TIMINGS_FILE)
    for key, value in data.items():
        if key.split("|", 1)[0] == model_name and isinstance(value, dict):
            try:
                return float(value["seconds"]), tuple(int(p) for p in value["patch"])
            except (KeyError, TypeError, ValueError):
                continue
    return None


def measure_cpu_time(model_name: str, repeats: int = 1, warmup: bool = False) -> tuple[float, tuple[int, ...]]:
    """Time one forward pass over the default patch on the CPU; cache it in the user folder.

    Args:
        model_name: Registry name.
        repeats: Timed passes; the best is kept.
        warmup: Run one untimed pass first (a 128^3 pass takes tens of seconds on a small CPU).

    Returns:
        ``(seconds, patch)``.
    """
    spec = get_model_spec(model_name)
    dims = spec.spatial_dims[0]
    model = create_model(model_name, 1, 2, dims).eval()
    patch = default_patch(model_name, model)
    x = torch.randn(1, spec.network_in_channels(1, 2), *patch)
    best = float("inf")
    with torch.inference_mode():
        if warmup:
            model(x)
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    path = medseg_home() / TIMINGS_FILE
    data = read_json_dict(path)
    data[_timing_key(model_name, patch)] = {"seconds": best, "patch": list(patch), "measured_at": time.time()}
    try:
        write_json_dict(path, data)
    except OSError as err:
        logger.warning("Could not cache the timing in %s: %s", path, err)
    return best, patch


__all__ = ["TIMINGS_FILE", "cached_cpu_time", "default_parameter_count", "default_patch", "measure_cpu_time"]
