"""Fixtures for the widget tests: a private user folder and tiny checkpoints made on the spot."""

from __future__ import annotations

import numpy as np
import pytest

TINY_KWARGS = {"pool_kernels": [[2, 2, 2], [2, 2, 2]], "conv_kernels": [[3, 3, 3]] * 3, "base_width": 4}


@pytest.fixture(autouse=True)
def medseg_home(tmp_path, monkeypatch):
    """Every test gets its own ``MEDSEG_HOME`` (user checkpoint index, timings, runs)."""
    home = tmp_path / "medseg_home"
    monkeypatch.setenv("MEDSEG_HOME", str(home))
    return home


def make_tiny_checkpoint(path, in_channels: int = 1, num_classes: int = 2, spacing=(1.0, 1.0, 1.0),
                         patch=(16, 16, 16), seed: int = 0, label_names=None) -> str:
    """An untrained ``unet-3d-fullres`` with base width 4 and a hand-made plan."""
    import torch

    from napari_medseg.engine.checkpoint import save_checkpoint
    from napari_medseg.engine.planning import Plan
    from napari_medseg.models import create_model

    torch.manual_seed(seed)
    model = create_model("unet-3d-fullres", in_channels, num_classes, 3, **TINY_KWARGS)
    plan = Plan(
        configuration="3d_fullres", spacing=tuple(spacing), patch_size=tuple(patch), batch_size=1,
        pool_kernels=TINY_KWARGS["pool_kernels"], conv_kernels=TINY_KWARGS["conv_kernels"],
        normalization=["zscore"] * in_channels, num_channels=in_channels, num_classes=num_classes,
        use_mask_for_norm=[False] * in_channels,
    )
    names = label_names or {0: "background", **{c: f"organ_{c}" for c in range(1, num_classes)}}
    return save_checkpoint(
        path, model, model_name="unet-3d-fullres", model_kwargs=TINY_KWARGS, in_channels=in_channels,
        num_classes=num_classes, spatial_dims=3, plan=plan, label_names=names, train_config={},
    )


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: ``tiny_checkpoint(name, **kw)`` -> path of a registered tiny checkpoint."""
    from napari_medseg.engine.catalog import register_checkpoint

    def make(name: str = "tiny", register: bool = True, **kw) -> str:
        path = make_tiny_checkpoint(tmp_path / "ckpts" / f"{name}.pt", **kw)
        if register:
            register_checkpoint(path, name=name, description=f"test checkpoint {name}")
        return path

    return make


@pytest.fixture
def phantom():
    """``(image, labels)`` of a small two-class phantom, (16, 32, 32)."""
    from napari_medseg.io.phantom import make_phantom

    image, labels = make_phantom((16, 32, 32), num_classes=2, seed=1)
    return image.astype(np.float32), labels
