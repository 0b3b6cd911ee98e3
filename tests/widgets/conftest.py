"""Fixtures for the widget tests: a private user folder and tiny checkpoints made on the spot."""

from __future__ import annotations

import numpy as np
import pytest
from medseg_testing import TINY_KWARGS, make_tiny_checkpoint  # noqa: F401  (used by the widget tests)


@pytest.fixture(autouse=True)
def medseg_home(tmp_path, monkeypatch):
    """Every test gets its own ``MEDSEG_HOME`` (user checkpoint index, timings, runs)."""
    home = tmp_path / "medseg_home"
    monkeypatch.setenv("MEDSEG_HOME", str(home))
    return home


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: ``tiny_checkpoint(name, **kw)`` -> path of a registered tiny checkpoint."""
    from napari_medseg.engine.checkpoints import register_checkpoint

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
