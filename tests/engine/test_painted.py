"""Partly painted cases: paint axis, held-out slices, sampling on the paint; time budgets."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_medseg.engine.data import Case
from napari_medseg.engine.data.painted import (
    PaintedSampler,
    hold_out_slices,
    paint_axis,
    painted_slices,
)
from napari_medseg.engine.training.schedule import TimeBudget, scheduled_lr

IGNORE = 9


def _painted_case(slices=(5, 12, 20, 27, 34), axis=0, shape=(40, 32, 36)) -> Case:
    rng = np.random.default_rng(0)
    truth = np.zeros(shape, np.int16)
    truth[8:30, 10:22, 12:26] = 1
    truth[8:30, 4:8, 4:10] = 2
    label = np.full(shape, IGNORE, np.int16)
    index = [slice(None)] * 3
    for s in slices:
        index[axis] = s
        label[tuple(index)] = truth[tuple(index)]
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    return Case("painted", image, label, None)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_paint_axis_and_slices(axis):
    case = _painted_case(slices=(3, 9, 15), axis=axis)
    assert paint_axis(case.label, IGNORE) == axis
    assert painted_slices(case.label, IGNORE, axis).tolist() == [3, 9, 15]


def test_no_paint_axis_for_full_labels_or_strokes():
    full = _painted_case().label.copy()
    full[full == IGNORE] = 0
    assert paint_axis(full, IGNORE) is None
    strokes = np.full((20, 20, 20), IGNORE, np.int16)
    strokes[2:18, 5, 5] = 1  # a line through every slice of axis 0
    strokes[5, 2:18, 7] = 1
    strokes[7, 9, 2:18] = 1
    assert paint_axis(strokes, IGNORE) is None


def test_hold_out_slices_keeps_the_outermost_and_splits_honestly():
    case = _painted_case(slices=(2, 7, 12, 17, 22, 27, 32, 37))
    train, val, held = hold_out_slices(case, IGNORE)
    assert held and 2 not in held and 37 not in held
    assert len(held) == 1  # every fifth of 8
    for s in held:
        assert np.all(train.label[s] == IGNORE)
        assert np.array_equal(val.label[s], case.label[s])
    others = [s for s in range(40) if s not in held]
    assert np.all(val.label[others] == IGNORE)
    assert np.array_equal(train.label[others], case.label[others])


def test_too_few_slices_means_no_validation():
    case = _painted_case(slices=(5, 20, 34))
    train, val, held = hold_out_slices(case, IGNORE)
    assert val is None and held == [] and train is case


def test_painted_sampler_visits_every_painted_slice_and_centres_on_paint():
    slices = (5, 12, 20, 27, 34)
    case = _painted_case(slices=slices)
    sampler = PaintedSampler([case], (8, 16, 16), batch_size=5, seed=0, ignore_label=IGNORE)
    assert sampler.num_slices == 5
    images, labels = sampler.sample_numpy()
    assert images.shape == (5, 1, 8, 16, 16) and labels.shape == (5, 1, 8, 16, 16)
    for b in range(5):
        assert (labels[b] != IGNORE).any(), "a patch without any painted voxel"
    # random patches of a thin shape mostly miss sparse paint; the painted sampler never does
    from napari_medseg.engine.data import PatchSampler

    sparse = _painted_case(slices=(5, 20, 34))
    kwargs = dict(batch_size=30, seed=0, ignore_label=IGNORE)
    plain = PatchSampler([sparse], (4, 16, 16), oversample_foreground=0.0, **kwargs)
    on_paint = PaintedSampler([sparse], (4, 16, 16), **kwargs)
    share = [np.mean([(lab != IGNORE).any() for lab in s.sample_numpy()[1]]) for s in (plain, on_paint)]
    assert share[0] < 0.7 and share[1] == 1.0


def test_painted_sampler_2d_patches_on_axial_paint():
    case = _painted_case(slices=(5, 12, 20))
    sampler = PaintedSampler([case], (16, 16), batch_size=3, seed=1, ignore_label=IGNORE)
    _, labels = sampler.sample_numpy()
    assert labels.shape == (3, 1, 16, 16)
    assert all((lab != IGNORE).all() for lab in labels)  # the whole 2D patch lies on a painted slice


def test_time_budget_and_schedule():
    budget = TimeBudget(0.001)  # 60 ms
    assert budget.fraction == 0.0 and not budget.exhausted
    budget.start()
    time.sleep(0.08)
    assert budget.exhausted and budget.fraction == 1.0
    assert "of 0:00" in budget.describe()
    with pytest.raises(ValueError):
        TimeBudget(0)
    assert scheduled_lr(0.01, "poly", 0.0) == pytest.approx(0.01)
    assert scheduled_lr(0.01, "poly", 1.0) == 0.0
    assert scheduled_lr(0.01, "poly", 0.5) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert scheduled_lr(0.01, "constant", 0.7) == 0.01
    assert scheduled_lr(0.01, "constant", 0.0, warmup=0.1) == pytest.approx(0.001)
    assert scheduled_lr(0.01, "constant", 0.05, warmup=0.1) == pytest.approx(0.0055)
    with pytest.raises(ValueError):
        scheduled_lr(0.01, "plateau", 0.5)


@pytest.mark.parametrize("odd", [False, True])
def test_shrinking_a_painted_case_keeps_every_painted_slice(odd):
    """1 mm slices painted, trained at 2 mm: each painted slice lands in one coarse slice, with
    the classes it holds; unpainted voxels stay ignored (one-hot interpolation lost some)."""
    from napari_medseg.engine.preprocessing.resampling import resize_segmentation

    slices = (7, 19, 31) if odd else (6, 18, 30)
    case = _painted_case(slices=slices, shape=(41, 32, 36))
    out = resize_segmentation(case.label, (20, 16, 18), ignore_label=IGNORE)
    kept = painted_slices(out, IGNORE, 0).tolist()
    assert len(kept) == len(slices)
    assert kept == [int((s + 0.5) * 20 / 41) for s in slices]  # the coarse slice holding its centre
    for s, k in zip(slices, kept):
        assert set(np.unique(out[k])) == set(np.unique(case.label[s]))  # every painted class, nothing else
        assert abs(np.count_nonzero(out[k] == 1) * 4 - np.count_nonzero(case.label[s] == 1)) <= 2 * 40
    # one-hot interpolation (the ignore label as a class) lost all three even slices here
    plain = painted_slices(resize_segmentation(case.label, (20, 16, 18)), IGNORE, 0)
    assert len(plain) == (3 if odd else 0)


def test_growing_a_painted_case_uses_the_plain_rule():
    from napari_medseg.engine.preprocessing.resampling import resize_segmentation

    case = _painted_case(slices=(5, 12), shape=(20, 16, 18))
    up = resize_segmentation(case.label, (40, 32, 36), ignore_label=IGNORE)
    assert np.array_equal(up, resize_segmentation(case.label, (40, 32, 36)))
