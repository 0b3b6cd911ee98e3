"""Helpers shared by the test folders (importable as ``medseg_testing``: ``tests/`` is on the path
through its conftest)."""

from __future__ import annotations

import torch

from napari_medseg.engine.checkpoints import save_checkpoint
from napari_medseg.engine.planning import Plan
from napari_medseg.models import create_model

TINY_KWARGS = {"pool_kernels": [[2, 2, 2], [2, 2, 2]], "conv_kernels": [[3, 3, 3]] * 3, "base_width": 4}


def make_tiny_checkpoint(path, in_channels: int = 1, num_classes: int = 2, patch=(16, 16, 16),
                         model_name: str = "unet-3d-fullres", kwargs=None, seed: int = 0,
                         spacing=(1.0, 1.0, 1.0), label_names=None, extra=None) -> str:
    """An untrained tiny ``unet-3d-fullres`` (base width 4) with a hand-made plan; its path."""
    kwargs = dict(TINY_KWARGS if kwargs is None else kwargs)
    torch.manual_seed(seed)
    model = create_model(model_name, in_channels, num_classes, 3, **kwargs)
    plan = Plan(
        configuration="3d_fullres", spacing=tuple(spacing), patch_size=tuple(patch), batch_size=1,
        pool_kernels=TINY_KWARGS["pool_kernels"], conv_kernels=TINY_KWARGS["conv_kernels"],
        normalization=["zscore"] * in_channels, num_channels=in_channels, num_classes=num_classes,
        use_mask_for_norm=[False] * in_channels,
    )
    names = label_names or {0: "background", **{c: f"organ_{c}" for c in range(1, num_classes)}}
    return save_checkpoint(
        path, model, model_name=model_name, model_kwargs=kwargs, in_channels=in_channels,
        num_classes=num_classes, spatial_dims=3, plan=plan, label_names=names, train_config={}, extra=extra,
    )


def select_checkpoint(picker, path, refresh: bool = True) -> None:
    """Choose ``path`` in a widget's ``CheckpointPicker`` (after re-reading the catalogue unless
    ``refresh`` is False: a widget opened after training lists the new checkpoint by itself)."""
    import os

    if refresh:
        picker.refresh()
    idx = picker.combo.findData(os.path.realpath(path))
    assert idx >= 0, [picker.combo.itemData(i) for i in range(picker.combo.count())]
    picker.combo.setCurrentIndex(idx)
