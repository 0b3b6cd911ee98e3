"""Lazy access to ``timm``: import it on demand, and find pretrained weights offline.

``napari_medseg`` and ``napari_medseg.models`` never import ``timm`` at import time (it takes
seconds and pulls in ``torchvision``); the models that need it (Omnia-Net, DS-Net, DX-Net's 2D
weight source) call :func:`import_timm` when they are built.

A broken ``torchvision`` beside a CPU-only ``torch``: ``timm`` imports ``torchvision``, and a
``torchvision`` wheel whose compiled operators do not match the installed ``torch`` build fails on
import with ``RuntimeError: operator torchvision::nms does not exist``. That happens while
``torchvision._meta_registrations`` (and ``torchvision._autograd_registrations``) register meta /
autograd kernels for the compiled operators that are missing. ``timm`` itself only needs
``torchvision``'s pure-Python parts (transforms), so :func:`import_timm` handles exactly that error:
it removes the partially imported ``torchvision`` modules from ``sys.modules``, registers empty
placeholder modules under those two names so that their import is a no-op, and imports again. The
compiled operators (``nms``, ``roi_align``...) stay unavailable, which no model here uses. Any other
import error propagates unchanged.

Pretrained weights are never downloaded here: :func:`pretrained_weights_file` looks for them in
the Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HOME``) and in torch's hub cache
(``TORCH_HOME``) only, and raises a :class:`ModelError` saying how to fetch them otherwise, so that
``pretrained=True`` on an offline machine fails at once instead of hanging on the network.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import types
import warnings

from napari_medseg.models.registry import ModelError

logger = logging.getLogger(__name__)

_PLACEHOLDERS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")
_NMS_ERROR = "torchvision::nms does not exist"


def _patch_torchvision() -> None:
    """Make ``import torchvision`` work when its compiled operators cannot load (see module doc)."""
    try:
        importlib.import_module("torchvision")
        return
    except ModuleNotFoundError:
        return  # timm reports what is missing itself
    except RuntimeError as err:
        if _NMS_ERROR not in str(err):
            raise
        logger.debug("torchvision's compiled operators do not load (%s); importing without them.", err)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name in _PLACEHOLDERS:
        sys.modules[name] = types.ModuleType(name)
    importlib.import_module("torchvision")


def import_timm() -> types.ModuleType:
    """Import and return ``timm`` (lazily; working around a torchvision without compiled ops).

    Raises:
        ModelError: ``timm`` is not installed.
    """
    if "timm" in sys.modules:
        return sys.modules["timm"]
    _patch_torchvision()
    try:
        with warnings.catch_warnings():  # timm's own torch.jit.interface use, not the user's concern
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
            return importlib.import_module("timm")
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] != "timm":
            raise
        raise ModelError(
            "This model needs the 'timm' package for its 2D backbone: pip install timm"
        ) from err


def _hub_cache_dir() -> str:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def _torch_hub_dir() -> str:
    """torch's hub folder (``$TORCH_HOME/hub``), read from the environment at call time."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return os.path.join(home, "hub")


def pretrained_weights_file(backbone: str) -> str:
    """Path of locally cached pretrained weights for the timm model ``backbone`` (no download).

    Args:
        backbone: timm model name, optionally with a pretrained tag (``"efficientnet_b0.ra_in1k"``).

    Raises:
        ModelError: unknown backbone, no pretrained weights, or none in the local caches.
    """
    timm = import_timm()
    try:
        cfg = timm.models.get_pretrained_cfg(backbone, allow_unregistered=False)
    except (RuntimeError, ValueError) as err:
        raise ModelError(f"timm knows no pretrained weights for {backbone!r}: {err}") from err
    if cfg is None:
        raise ModelError(f"timm knows no pretrained weights for {backbone!r}.")
    candidates = []
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        folder = os.path.join(_hub_cache_dir(), "models--" + hub_id.replace("/", "--"), "snapshots")
        if os.path.isdir(folder):
            for snap in sorted(os.listdir(folder)):
                for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                    candidates.append(os.path.join(folder, snap, fname))
    url = getattr(cfg, "url", None)
    if url:
        candidates.append(os.path.join(_torch_hub_dir(), "checkpoints", os.path.basename(url)))
    for path in candidates:
        if os.path.isfile(path):
            return path
    where = f"the Hugging Face cache {_hub_cache_dir()!r}" + (
        f" (hub id {hub_id!r})" if hub_id else ""
    ) + f" or torch's hub cache {os.path.join(_torch_hub_dir(), 'checkpoints')!r}"
    raise ModelError(
        f"Pretrained weights for {backbone!r} are not available offline: nothing in {where}. "
        f"Download them once on a machine with internet access (python -c \"import timm; "
        f"timm.create_model('{backbone}', pretrained=True)\") and copy the cache here, "
        "or build the model with pretrained=False."
    )


def load_pretrained_state_dict(backbone: str) -> dict:
    """The pretrained state dict of ``backbone`` as timm builds it, from the local cache only.

    The weights are loaded into a ``features_only`` model with 3 input channels, so the keys are
    those of the encoders built here and the classifier head is dropped.
    """
    timm = import_timm()
    path = pretrained_weights_file(backbone)
    try:
        model = timm.create_model(
            backbone, pretrained=True, features_only=True, pretrained_cfg_overlay={"file": path, "source": "timm"}
        )
    except Exception as err:  # a corrupt or incompatible file: say which one
        raise ModelError(f"Cannot load the pretrained weights of {backbone!r} from {path}: {err}") from err
    return model.state_dict()
