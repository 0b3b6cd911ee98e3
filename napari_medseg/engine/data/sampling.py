"""Random training patches with nnU-Net's (v1) foreground oversampling.

Isensee et al., "nnU-Net", Nature Methods 18, 2021: random cases, random crops, and the last samples
of every batch forced to contain foreground.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from napari_medseg.engine.data.cases import Case


def crop_patch(arr: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value) -> np.ndarray:
    """Crop the trailing ``len(size)`` axes of ``arr`` at ``start``, padding with ``pad_value``."""
    lead = arr.shape[: arr.ndim - len(size)]
    out = np.full((*lead, *size), pad_value, dtype=arr.dtype)
    src, dst = [], []
    for s0, n, dim in zip(start, size, arr.shape[len(lead):]):
        a, b = max(s0, 0), min(s0 + n, dim)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - s0, a - s0 + max(b - a, 0)))
    out[(..., *dst)] = arr[(..., *src)]
    return out


class PatchSampler:
    """Random training patches with nnU-Net's foreground oversampling.

    Every batch draws ``batch_size`` cases at random (with replacement). The last
    ``round(batch_size * oversample_foreground)`` samples of a batch are *forced*: a foreground class
    present in the case is chosen at random, then one of its voxels, and the patch is placed so that
    this voxel lies at a random position inside it (inside the central ``final_patch_size`` window
    when given, so that it survives the augmenter's centre crop). The other samples are random crops.
    With batch size 1 (where the rounding gives 0 forced samples), the sample is forced with
    probability ``oversample_foreground`` instead.

    Crops may reach outside a case by half of what it lacks to fill a patch (as nnU-Net); padding is
    0 for the image and, for the label, ``ignore_label`` when set (so padding does not teach
    "background") or else 0. With a 2-entry ``patch_size`` on 3D cases, 2D slices along axis 0 are
    sampled (the ``2d`` configuration).

    Args:
        cases: Preprocessed cases with labels.
        patch_size: 2 or 3 entries.
        batch_size: Samples per batch.
        oversample_foreground: Fraction of forced-foreground samples per batch.
        seed: Seed; the same seed and cases give the same batches.
        ignore_label: Label value excluded from the foreground classes and used for label padding.
        final_patch_size: Size of the patch after the augmenter's centre crop (default: the patch).
        max_locations: Voxel locations remembered per class and case.
        foreground_classes: The label values forced samples may centre on (default: every
            nonzero value but the ignore label); e.g. the target classes of a full label map whose
            other values are generation-only.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        batch_size: int,
        oversample_foreground: float = 0.33,
        seed: int | None = 0,
        ignore_label: int | None = None,
        final_patch_size: Sequence[int] | None = None,
        max_locations: int = 10000,
        foreground_classes: Sequence[int] | None = None,
    ) -> None:
        self.cases = list(cases)
        if not self.cases:
            raise ValueError("PatchSampler needs at least one case")
        missing = [c.name for c in self.cases if c.label is None]
        if missing:
            raise ValueError(f"PatchSampler needs labelled cases; without label: {missing[:5]}")
        channels = {c.image.shape[0] for c in self.cases}
        if len(channels) != 1:
            raise ValueError(f"Cases have different numbers of channels: {sorted(channels)}")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must have 2 or 3 positive entries, got {patch_size}")
        for c in self.cases:
            if c.image.ndim - 1 < len(self.patch_size):
                raise ValueError(f"Case {c.name} has {c.image.ndim - 1} spatial axes, patch {self.patch_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError(f"oversample_foreground must be in [0, 1], got {oversample_foreground}")
        self.batch_size = int(batch_size)
        self.oversample_foreground = float(oversample_foreground)
        self.ignore_label = ignore_label
        final = self.patch_size if final_patch_size is None else tuple(int(p) for p in final_patch_size)
        if len(final) != len(self.patch_size) or any(f > p for f, p in zip(final, self.patch_size)):
            raise ValueError(f"final_patch_size {final_patch_size} must fit inside patch_size {self.patch_size}")
        self.final_patch_size = final
        self.max_locations = int(max_locations)
        self.foreground_classes = None if foreground_classes is None else {int(c) for c in foreground_classes}
        self.rng = np.random.default_rng(seed)
        self._locations: dict[int, dict[int, np.ndarray]] = {}
        self.num_channels = channels.pop()

    @property
    def num_forced(self) -> int:
        """Samples per batch forced to contain foreground (see the class docstring)."""
        return int(round(self.batch_size * self.oversample_foreground))

    def _class_locations(self, idx: int) -> dict[int, np.ndarray]:
        """Flat indices of (up to ``max_locations``) voxels per foreground class of case ``idx``."""
        if idx not in self._locations:
            label = self.cases[idx].label
            flat = label.ravel()
            locs = {}
            for c in np.unique(flat):
                if c == 0 or (self.ignore_label is not None and c == self.ignore_label):
                    continue
                if self.foreground_classes is not None and int(c) not in self.foreground_classes:
                    continue
                where = np.flatnonzero(flat == c)
                n = max(min(self.max_locations, where.size), int(np.ceil(where.size * 0.01)))
                if n < where.size:
                    where = np.sort(self.rng.choice(where, n, replace=False))
                locs[int(c)] = where
            self._locations[idx] = locs
        return self._locations[idx]

    def _start(self, shape: Sequence[int], voxel: Sequence[int] | None) -> list[int]:
        start = []
        for d, (dim, p, f) in enumerate(zip(shape, self.patch_size, self.final_patch_size)):
            need = max(p - dim, 0)
            lb, ub = -(need // 2), dim + need // 2 + need % 2 - p
            if voxel is None:
                start.append(int(self.rng.integers(lb, ub + 1)))
                continue
            m = (p - f) // 2
            lo, hi = max(lb, voxel[d] - m - f + 1), min(ub, voxel[d] - m)
            if lo > hi:
                start.append(int(np.clip(voxel[d] - p // 2, lb, ub)))
            else:
                start.append(int(self.rng.integers(lo, hi + 1)))
        return start

    def _one(self, force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
        idx = int(self.rng.integers(len(self.cases)))
        case = self.cases[idx]
        image, label = case.image, case.label
        voxel = None
        if force_fg:
            locs = self._class_locations(idx)
            if locs:
                classes = sorted(locs)
                cls = classes[int(self.rng.integers(len(classes)))]
                flat = locs[cls][int(self.rng.integers(locs[cls].size))]
                voxel = [int(v) for v in np.unravel_index(flat, label.shape)]
        if len(self.patch_size) == 2 and label.ndim == 3:
            z = voxel[0] if voxel is not None else int(self.rng.integers(label.shape[0]))
            image, label = image[:, z], label[z]
            voxel = voxel[1:] if voxel is not None else None
        start = self._start(label.shape, voxel)
        pad_label = self.ignore_label if self.ignore_label is not None else 0
        img = crop_patch(image, start, self.patch_size, 0)
        lab = crop_patch(label, start, self.patch_size, pad_label)
        return img, lab

    def sample_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """One batch as numpy: images float32 ``(B, C, *patch)``, labels int64 ``(B, 1, *patch)``."""
        n_forced = self.num_forced
        if n_forced == 0 and self.oversample_foreground > 0 and self.batch_size == 1:
            n_forced = int(self.rng.random() < self.oversample_foreground)
        images = np.empty((self.batch_size, self.num_channels, *self.patch_size), np.float32)
        labels = np.empty((self.batch_size, 1, *self.patch_size), np.int64)
        for b in range(self.batch_size):
            images[b], labels[b, 0] = self._one(force_fg=b >= self.batch_size - n_forced)
        return images, labels

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch as CPU tensors: images float32 ``(B, C, *patch)``, labels int64 ``(B, 1, *patch)``."""
        images, labels = self.sample_numpy()
        return torch.from_numpy(images), torch.from_numpy(labels)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample()


__all__ = ["PatchSampler", "crop_patch"]
