"""Helpers shared by the reliability tests: tiny checkpoints, file hashes, phantom cases."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from medseg_testing import TINY_KWARGS, make_tiny_checkpoint  # noqa: F401  (re-exported)


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
