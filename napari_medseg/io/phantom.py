"""Synthetic phantoms for tests, demos and smoke training: bright ellipsoids in noise.

Nothing here downloads anything; every array is made from a seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np


def make_phantom(
    shape: Sequence[int] = (32, 48, 48),
    num_classes: int = 2,
    seed: int = 0,
    noise: float = 0.3,
    num_channels: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Make an image with ``num_classes - 1`` ellipsoids of different brightness, and its labels.

    Args:
        shape: Spatial shape, napari order (2 or 3 axes).
        num_classes: Classes including background; class ``c`` is the ``c``-th ellipsoid.
        seed: Random seed; the same seed gives the same phantom.
        noise: Standard deviation of the Gaussian noise added to the image.
        num_channels: Channels of the image; extra channels are scaled, differently noisy copies.

    Returns:
        ``(image, labels)``: image float32 ``(C, *shape)`` when ``num_channels > 1`` else ``shape``,
        labels uint8 ``shape``.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    labels = np.zeros(shape, np.uint8)
    base = np.zeros(shape, np.float32)
    for c in range(1, num_classes):
        center = [rng.uniform(0.3 * s, 0.7 * s) for s in shape]
        radii = [rng.uniform(0.12 * s, 0.25 * s) for s in shape]
        dist = sum(((g - c0) / r) ** 2 for g, c0, r in zip(grids, center, radii))
        inside = dist <= 1.0
        labels[inside] = c
        base[inside] = 1.0 + 0.5 * (c - 1)
    chans = []
    for ch in range(num_channels):
        img = base * (1.0 + 0.25 * ch) + rng.normal(0.0, noise, shape).astype(np.float32)
        chans.append(img.astype(np.float32))
    image = np.stack(chans) if num_channels > 1 else chans[0]
    return image, labels


def write_phantom_dataset(
    folder: str | os.PathLike,
    num_cases: int = 6,
    shape: Sequence[int] = (32, 48, 48),
    num_classes: int = 2,
    spacing: Sequence[float] = (2.0, 1.0, 1.0),
    num_test: int = 0,
    seed: int = 0,
) -> str:
    """Write a dataset in the nnU-Net raw format (``imagesTr``, ``labelsTr``, ``dataset.json``).

    Images are ``{name}_0000.nii.gz``; spacing is napari order (it becomes the NIfTI zooms reversed).
    Returns the folder path.
    """
    import nibabel as nib

    folder = os.fspath(folder)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    zooms = list(spacing)[::-1]
    affine = np.diag(zooms + [1.0])
    names = []
    for i in range(num_cases + num_test):
        name = f"phantom_{i:03d}"
        image, labels = make_phantom(shape, num_classes=num_classes, seed=seed + i)
        split = "Tr" if i < num_cases else "Ts"
        # napari order (z, y, x) -> NIfTI (i, j, k)
        img = nib.Nifti1Image(np.ascontiguousarray(image.T), affine)
        img.header.set_zooms(zooms)
        nib.save(img, os.path.join(folder, f"images{split}", f"{name}_0000.nii.gz"))
        lab = nib.Nifti1Image(np.ascontiguousarray(labels.T), affine)
        lab.header.set_zooms(zooms)
        nib.save(lab, os.path.join(folder, f"labels{split}", f"{name}.nii.gz"))
        if split == "Tr":
            names.append(name)
    dataset = {
        "name": "Phantom",
        "description": "Synthetic ellipsoids in noise (napari-medseg test data)",
        "channel_names": {"0": "MRI"},
        "modality": {"0": "MRI"},
        "labels": {"background": 0, **{f"ellipsoid_{c}": c for c in range(1, num_classes)}},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    with open(os.path.join(folder, "dataset.json"), "w") as fh:
        json.dump(dataset, fh, indent=2)
    return folder
