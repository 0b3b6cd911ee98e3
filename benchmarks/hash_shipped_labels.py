"""Hash the labels the shipped checkpoint gives on the shipped sample (and on a whole-head-sized
mirror-padded copy), so that a refactor can show it changed nothing: run it on two trees and compare.

    PYTHONPATH=OTHER_TREE python benchmarks/hash_shipped_labels.py
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

import napari_medseg
from napari_medseg.io import read_nifti

try:  # the public API (after the engine-layout change)
    from napari_medseg import predict as _predict

    def run(image, spacing, ckpt):
        return _predict(image, spacing, ckpt, device="cpu").labels
except ImportError:  # the tree before it
    from napari_medseg.engine.inference import predict
    from napari_medseg.engine.jobs import drive

    def run(image, spacing, ckpt):
        return drive(predict(image, spacing, [ckpt], device="cpu")).labels


def main() -> None:
    torch.set_num_threads(2)
    pkg = os.path.dirname(napari_medseg.__file__)
    ckpt = os.path.join(pkg, "checkpoints", "colin27_deepgm_unet3d.pt")
    image = read_nifti(os.path.join(pkg, "data", "colin27_t1_deepgm.nii.gz"))
    print("tree:", pkg)
    for name, arr in (("sample", image.data), ("padded", np.pad(image.data, 12, mode="reflect"))):
        labels = np.ascontiguousarray(run(arr, image.spacing, ckpt))
        digest = hashlib.sha256(labels.tobytes() + str(labels.shape).encode()).hexdigest()[:16]
        print(f"{name:7s} shape {labels.shape} counts {np.bincount(labels.ravel()).tolist()} sha256 {digest}")


if __name__ == "__main__":
    main()
