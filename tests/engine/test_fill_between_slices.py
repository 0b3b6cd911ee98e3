"""Fill between slices (engine.annotation): shape-based interpolation of sparsely painted labels."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from napari_medseg.engine.annotation import fill_between_slices, painted_slices


def _ellipsoid(shape, center, radii) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _sparse(truth: np.ndarray, axis: int, painted) -> np.ndarray:
    """Keep only the painted slices of ``truth`` along ``axis``."""
    out = np.zeros_like(truth)
    src, dst = np.moveaxis(truth, axis, 0), np.moveaxis(out, axis, 0)
    dst[list(painted)] = src[list(painted)]
    return out


def _every_fifth(truth: np.ndarray, axis: int = 0) -> list[int]:
    held = painted_slices(truth, axis)
    return list(range(held[0], held[-1] + 1, 5))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _between(painted, axis_len) -> list[int]:
    return [i for i in range(painted[0] + 1, painted[-1]) if i not in painted and i < axis_len]


@pytest.mark.parametrize(
    "radii", [(14, 14, 14), (18, 9, 13)], ids=["sphere", "ellipsoid"]
)
def test_shapes_painted_every_fifth_slice_are_recovered(radii):
    truth = _ellipsoid((48, 44, 52), (24, 22, 26), radii).astype(np.uint8)
    painted = _every_fifth(truth)
    sparse = _sparse(truth, 0, painted)
    filled = fill_between_slices(sparse)
    between = _between(painted, truth.shape[0])
    assert _dice(filled[between] == 1, truth[between] == 1) > 0.9
    np.testing.assert_array_equal(filled[painted], sparse[painted])  # painted slices unchanged
    assert not filled[: painted[0]].any() and not filled[painted[-1] + 1:].any()  # outside: 0
    assert filled.dtype == sparse.dtype and filled.shape == sparse.shape
    assert np.count_nonzero(sparse) == np.count_nonzero(truth[painted])  # the input is left alone


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_any_axis(axis):
    truth = _ellipsoid((40, 46, 50), (20, 23, 25), (15, 18, 20)).astype(np.int32) * 3
    painted = _every_fifth(truth, axis)
    sparse = _sparse(truth, axis, painted)
    filled = fill_between_slices(sparse, axis=axis)
    between = _between(painted, truth.shape[axis])
    got, want = np.moveaxis(filled, axis, 0)[between], np.moveaxis(truth, axis, 0)[between]
    assert _dice(got == 3, want == 3) > 0.9
    assert set(np.unique(filled)) == {0, 3}
    # The same as moving the axis to the front and filling along axis 0.
    front = fill_between_slices(np.moveaxis(sparse, axis, 0), axis=0)
    np.testing.assert_array_equal(np.moveaxis(front, 0, axis), filled)


def test_two_touching_labels_stay_apart_and_keep_their_border():
    truth = _ellipsoid((40, 40, 48), (20, 20, 24), (14, 12, 18)).astype(np.uint8)
    truth[:, :, 24:] *= 2  # left half label 1, right half label 2: they touch at x = 24
    painted = _every_fifth(truth)
    filled = fill_between_slices(_sparse(truth, 0, painted))
    between = _between(painted, truth.shape[0])
    for value in (1, 2):
        assert _dice(filled[between] == value, truth[between] == value) > 0.9, value
    x = np.arange(truth.shape[2])
    for z in between:
        ones, twos = np.nonzero(filled[z] == 1), np.nonzero(filled[z] == 2)
        if len(ones[0]) and len(twos[0]):
            assert x[ones[1]].max() <= 24 and x[twos[1]].min() >= 23, z
    middle = filled[between[len(between) // 2]]
    left, right = middle[:, :-1], middle[:, 1:]
    assert np.any((left == 1) & (right == 2))  # still touching, no gap between them


def test_object_in_one_slice_only_shrinks_to_nothing_halfway():
    labels = np.zeros((30, 40, 40), np.uint16)
    labels[10] = _ellipsoid((40, 40), (15, 15), (8, 8)) * 1
    labels[20][_ellipsoid((40, 40), (28, 28), (6, 6))] = 2  # label 2 in both slices
    labels[10][_ellipsoid((40, 40), (28, 28), (6, 6))] = 2
    filled = fill_between_slices(labels)
    areas = [int((filled[z] == 1).sum()) for z in range(10, 21)]
    assert areas[0] == int((labels[10] == 1).sum())
    assert all(a >= b for a, b in zip(areas, areas[1:])), areas  # shrinks monotonically
    assert 0 < areas[4] < areas[0] and areas[5:] == [0] * 6, areas  # gone from halfway on
    for z in range(11, 15):
        assert not np.any((filled[z] == 1) & (labels[10] != 1))  # inside the painted outline
    assert all((filled[z] == 2).sum() == (labels[10] == 2).sum() for z in range(10, 21))
    # The mirror case: an object that appears in the later slice grows from halfway.
    grown = fill_between_slices(labels[::-1].copy())[::-1]
    np.testing.assert_array_equal(grown, filled)


def test_several_objects_of_one_label_in_a_slice():
    truth = (_ellipsoid((40, 40, 60), (20, 20, 15), (12, 10, 10))
             | _ellipsoid((40, 40, 60), (20, 20, 45), (12, 10, 10))).astype(np.uint8)
    painted = _every_fifth(truth)
    filled = fill_between_slices(_sparse(truth, 0, painted))
    between = _between(painted, truth.shape[0])
    assert _dice(filled[between] == 1, truth[between] == 1) > 0.9
    for z in between:
        assert ndimage.label(filled[z] == 1)[1] == 2, z


def test_explicit_background_slice_ends_the_object():
    labels = np.zeros((40, 32, 32), np.uint8)
    disk = _ellipsoid((32, 32), (16, 16), (9, 9))
    labels[10][disk] = 1
    labels[30][disk] = 1
    assert painted_slices(labels) == [10, 30]
    bridged = fill_between_slices(labels)  # slice 20 unpainted: the object runs through
    assert all((bridged[z] == 1).sum() == disk.sum() for z in range(10, 31))
    ended = fill_between_slices(labels, slices=[30, 10, 20, 20])  # slice 20 painted as background
    present = [z for z in range(40) if ended[z].any()]
    assert present == [*range(10, 15), *range(26, 31)], present
    assert not ended[20].any()
    # A background slice after the last object extends the range: the object ends halfway to it.
    tail = fill_between_slices(labels, slices=[10, 30, 38])
    assert [z for z in range(31, 40) if tail[z].any()] == [31, 32, 33]


def test_single_or_no_painted_slice():
    labels = np.zeros((10, 8, 8), np.int64)
    np.testing.assert_array_equal(fill_between_slices(labels), labels)
    labels[4, 2:5, 2:5] = 7
    np.testing.assert_array_equal(fill_between_slices(labels), labels)
    assert painted_slices(labels) == [4] and painted_slices(labels, axis=2) == [2, 3, 4]


def test_a_label_covering_whole_slices():
    labels = np.zeros((12, 10, 10), np.uint8)
    labels[0] = 1
    labels[10] = 1
    labels[10, 3:6, 3:6] = 2
    filled = fill_between_slices(labels)
    assert (filled[1:10] != 0).all()  # label 1 everywhere in between
    assert (filled[9] == 2).sum() > 0 and not filled[11].any()


def test_bool_masks_and_2d():
    mask = np.zeros((20, 30), bool)
    mask[5, 10:20] = True
    mask[15, 12:18] = True
    filled = fill_between_slices(mask)
    assert filled.dtype == bool and filled[10].sum() in (7, 8, 9)


def test_refusals():
    with pytest.raises(ValueError, match="integer"):
        fill_between_slices(np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="axis"):
        fill_between_slices(np.zeros((4, 4, 4), np.uint8), axis=3)
    with pytest.raises(ValueError, match="outside"):
        fill_between_slices(np.zeros((4, 4, 4), np.uint8), slices=[0, 4])
    with pytest.raises(ValueError, match="2 or more"):
        fill_between_slices(np.zeros(5, np.uint8))


def test_fast_on_a_ct_sized_label_map():
    shape = (112, 101, 122)
    truth = _ellipsoid(shape, (56, 50, 61), (40, 30, 35)).astype(np.uint8)
    truth[_ellipsoid(shape, (50, 50, 60), (20, 12, 12))] = 2
    truth[_ellipsoid(shape, (60, 20, 30), (25, 10, 15))] = 3
    truth[_ellipsoid(shape, (60, 80, 90), (25, 10, 15))] = 4
    sparse = _sparse(truth, 0, [20, 38, 56, 74, 92])
    fill_between_slices(sparse)  # warm up
    start = time.perf_counter()
    filled = fill_between_slices(sparse)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed
    assert set(np.unique(filled[21:92])) == {0, 1, 2, 3, 4}
