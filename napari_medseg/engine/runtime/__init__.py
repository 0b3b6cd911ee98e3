"""Where and how compute runs: devices, memory estimates and the out-of-memory ladder, and
distributed training (``torch.distributed``; use ``runtime.distributed`` for its functions)."""

from napari_medseg.engine.runtime import distributed  # noqa: F401
from napari_medseg.engine.runtime.devices import DeviceError, available_devices, resolve_device
from napari_medseg.engine.runtime.oom import InsufficientMemoryError, is_oom_error, release_memory

__all__ = [
    "DeviceError",
    "InsufficientMemoryError",
    "available_devices",
    "distributed",
    "is_oom_error",
    "release_memory",
    "resolve_device",
]
