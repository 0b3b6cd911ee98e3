"""Device selection: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` / ``mps``."""

from __future__ import annotations

import torch

from napari_medseg.errors import MedsegError


class DeviceError(MedsegError, ValueError):
    """The requested device does not exist on this machine."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Devices usable on this machine, best first; always ends with ``"cpu"``."""
    devices = []
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's device string into a :class:`torch.device`, checking it exists.

    Args:
        spec: ``"auto"`` (first CUDA GPU, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"``, or a ``torch.device``.

    Raises:
        DeviceError: if the device is not available here, with the list of those that are.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device(available_devices()[0])
    try:
        dev = torch.device(spec)
    except RuntimeError as err:
        raise DeviceError(f"Unknown device {spec!r}; use one of {available_devices()} or 'auto'.") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"Device {spec!r} was requested but CUDA is not available on this machine; "
                f"available: {available_devices()}."
            )
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"Device {spec!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)."
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and not _mps_available():
        raise DeviceError(f"Device 'mps' is not available here; available: {available_devices()}.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"Unsupported device type {dev.type!r}; use cpu, cuda:N or mps.")
    return dev
