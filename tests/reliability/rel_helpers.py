"""Helpers shared by the reliability tests: tiny checkpoints, file hashes, phantom cases."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

TINY_KWARGS = {"pool_kernels": [[2, 2, 2], [2, 2, 2]], "conv_kernels": [[3, 3, 3]] * 3, "base_width": 4}


def make_tiny_checkpoint(path, in_channels: int = 1, num_classes: int = 2, patch=(16, 16, 16),
                         model_name: str = "unet-3d-fullres", kwargs=None, seed: int = 0) -> str:
    """An untrained tiny ``unet-3d-fullres`` (base width 4) with a hand-made plan."""
    from napari_medseg.engine.checkpoint import save_checkpoint
    from napari_medseg.engine.planning import Plan
    from napari_medseg.models import create_model

    kwargs = dict(TINY_KWARGS if kwargs is None else kwargs)
    torch.manual_seed(seed)
    model = create_model(model_name, in_channels, num_classes, 3, **kwargs)
    plan = Plan(
        configuration="3d_fullres", spacing=(1.0, 1.0, 1.0), patch_size=tuple(patch), batch_size=1,
        pool_kernels=TINY_KWARGS["pool_kernels"], conv_kernels=TINY_KWARGS["conv_kernels"],
        normalization=["zscore"] * in_channels, num_channels=in_channels, num_classes=num_classes,
        use_mask_for_norm=[False] * in_channels,
    )
    names = {0: "background", **{c: f"organ_{c}" for c in range(1, num_classes)}}
    return save_checkpoint(
        path, model, model_name=model_name, model_kwargs=kwargs, in_channels=in_channels,
        num_classes=num_classes, spatial_dims=3, plan=plan, label_names=names, train_config={},
    )


def tree_hashes(folder) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (what "nothing on disk changed" means)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def phantom_cases(n=2, shape=(16, 32, 32)):
    from napari_medseg.io.phantom import make_phantom

    out = []
    for i in range(n):
        image, labels = make_phantom(shape, num_classes=2, seed=i)
        out.append((image.astype(np.float32), labels, (1.0, 1.0, 1.0)))
    return out
