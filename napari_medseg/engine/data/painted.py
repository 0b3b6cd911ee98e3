"""Partly painted cases: where the paint is, hold some of it out, and sample patches on it.

A user who corrects a scan in the viewer paints a few slices (or strokes); every other voxel
carries the ignore label (``TrainConfig.ignore_label``), so the loss skips it. Random patches then
mostly hold nothing to learn from. This module:

* :func:`paint_axis` / :func:`painted_slices` -- the axis the user painted along (the one whose
  labelled voxels lie in the fewest slices) and those slices;
* :func:`hold_out_slices` -- honest validation: with enough painted slices, every fifth (evenly
  spread, never the first or last) becomes validation-only (ignore in the training copy, the only
  labels in the validation copy); with fewer, there is no validation;
* :class:`PaintedSampler` -- patches centred on painted voxels: painted slices in turn (all of
  them, round robin over cases), a foreground voxel of the slice half of the time (any labelled
  voxel otherwise), placed at a random position inside the patch's central window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from napari_medseg.engine.data.sampling import PatchSampler, crop_patch

#: Fewest painted slices from which some are held out for validation.
MIN_SLICES_TO_HOLD_OUT = 4


def labelled(label: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """Mask of the voxels that count (not the ignore label)."""
    return np.ones(label.shape, bool) if ignore_label is None else label != ignore_label


def paint_axis(label: np.ndarray, ignore_label: int | None) -> int | None:
    """The axis the user painted slices along, or ``None`` (painted everywhere, or strokes).

    The axis whose labelled voxels fall in the fewest slices, if that is at most half of them.
    """
    mask = labelled(label, ignore_label)
    if not mask.any() or mask.all():
        return None
    best, best_count = None, None
    for axis in range(label.ndim):
        count = int(mask.any(axis=tuple(a for a in range(label.ndim) if a != axis)).sum())
        if best_count is None or count < best_count:
            best, best_count = axis, count
    return best if best_count <= label.shape[best] // 2 else None


def painted_slices(label: np.ndarray, ignore_label: int | None, axis: int) -> np.ndarray:
    """Indices of the slices along ``axis`` holding at least one labelled voxel."""
    mask = labelled(label, ignore_label)
    return np.flatnonzero(mask.any(axis=tuple(a for a in range(label.ndim) if a != axis)))


def hold_out_slices(case, ignore_label: int, min_slices: int = MIN_SLICES_TO_HOLD_OUT):
    """Split one painted case into ``(training case, validation case or None, held-out slices)``.

    With at least ``min_slices`` painted slices, every fifth painted slice (evenly spread, never
    the outermost two) is held out: the training copy has the ignore label there, the validation
    copy has labels only there. With fewer (or no paint axis) the case trains whole and there is
    no validation case.
    """
    axis = paint_axis(case.label, ignore_label)
    if axis is None:
        return case, None, []
    slices = painted_slices(case.label, ignore_label, axis)
    if len(slices) < min_slices:
        return case, None, []
    n_hold = max(1, len(slices) // 5)
    inner = slices[1:-1]
    picks = inner[np.round(np.linspace(0, len(inner) - 1, n_hold + 2)[1:-1]).astype(int)] if n_hold < len(inner) else inner
    picks = sorted({int(s) for s in np.atleast_1d(picks)})
    train_label = case.label.copy()
    val_label = np.full_like(case.label, ignore_label)
    index = [slice(None)] * case.label.ndim
    for s in picks:
        index[axis] = s
        val_label[tuple(index)] = case.label[tuple(index)]
        train_label[tuple(index)] = ignore_label
    return replace(case, label=train_label), replace(case, name=case.name + " (held-out slices)", label=val_label), picks


class PaintedSampler(PatchSampler):
    """Patches centred on painted voxels of partly painted cases (see the module docstring).

    Args:
        cases, patch_size, batch_size, seed, ignore_label, final_patch_size: As
            :class:`~napari_medseg.engine.data.sampling.PatchSampler`.
        p_foreground: Chance that a sample centres on a foreground voxel of its slice (when the
            slice has one) rather than on any labelled voxel.
    """

    def __init__(
        self,
        cases,
        patch_size: Sequence[int],
        batch_size: int,
        seed: int | None = 0,
        ignore_label: int | None = None,
        final_patch_size: Sequence[int] | None = None,
        p_foreground: float = 0.5,
    ) -> None:
        super().__init__(cases, patch_size, batch_size, oversample_foreground=0.0, seed=seed,
                         ignore_label=ignore_label, final_patch_size=final_patch_size)
        self.p_foreground = float(p_foreground)
        self._queue: list[tuple[int, int | None, int]] = []
        for i, case in enumerate(self.cases):
            axis = paint_axis(case.label, ignore_label)
            if axis is None:
                self._queue.append((i, None, -1))
            else:
                self._queue.extend((i, axis, int(s)) for s in painted_slices(case.label, ignore_label, axis))
        self._next = 0

    @property
    def num_slices(self) -> int:
        """Painted slices the sampler visits in turn (cases without a paint axis count once)."""
        return len(self._queue)

    def _voxel(self, case, axis: int | None, s: int) -> list[int] | None:
        label = case.label
        if axis is None:
            region, offset = label, None
        else:
            index = [slice(None)] * label.ndim
            index[axis] = s
            region, offset = label[tuple(index)], (axis, s)
        ok = labelled(region, self.ignore_label)
        fg = ok & (region != 0)
        pool = fg if fg.any() and self.rng.random() < self.p_foreground else ok
        flat = np.flatnonzero(pool)
        if flat.size == 0:
            return None
        voxel = list(np.unravel_index(int(flat[self.rng.integers(flat.size)]), region.shape))
        if offset is not None:
            voxel.insert(offset[0], offset[1])
        return [int(v) for v in voxel]

    def _one(self, force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
        i, axis, s = self._queue[self._next % len(self._queue)]
        self._next += 1
        case = self.cases[i]
        voxel = self._voxel(case, axis, s)
        image, label = case.image, case.label
        if len(self.patch_size) == 2 and label.ndim == 3:  # 2D configuration: slices along axis 0
            z = voxel[0] if voxel is not None else int(self.rng.integers(label.shape[0]))
            image, label = image[:, z], label[z]
            voxel = voxel[1:] if voxel is not None else None
        start = self._start(label.shape, voxel)
        pad_label = self.ignore_label if self.ignore_label is not None else 0
        return crop_patch(image, start, self.patch_size, 0), crop_patch(label, start, self.patch_size, pad_label)


__all__ = ["MIN_SLICES_TO_HOLD_OUT", "PaintedSampler", "hold_out_slices", "paint_axis", "painted_slices"]
