"""Dice and HD95 on hand-made masks with known answers; folder evaluation on NIfTI files."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from napari_medseg.engine.evaluation import (
    EvaluationError,
    dice_per_class,
    evaluate_folder,
    format_table,
    hd95,
    mask_surface,
)


def cube(shape, start, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def test_dice_known_values():
    ref = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[0:4, 0:5, 0:5] = 1  # 100 voxels
    pred[2:6, 0:5, 0:5] = 1  # 100 voxels, 50 shared
    ref[8, 8, 8] = 2  # label 2 missed; label 3 absent in both
    d = dice_per_class(pred, ref, [1, 2, 3])
    assert d[1] == pytest.approx(0.5)
    assert d[2] == 0.0
    assert math.isnan(d[3])
    assert dice_per_class(ref, ref, [1, 2])[1] == 1.0


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("axis", [0, 2])
def test_hd95_of_shifted_cubes_is_shift_in_mm(k, axis):
    # fine spacing s along the shift axis, coarse (3 mm) elsewhere: every nonzero surface distance
    # is k * s, so HD95 = k * s exactly
    s = 0.5
    spacing = [3.0, 3.0, 3.0]
    spacing[axis] = s
    shape = [12, 12, 12]
    shape[axis] = 20
    start = [3, 3, 3]
    start[axis] = 4
    a = cube(shape, start, 6)
    b = np.roll(a, k, axis=axis)
    assert hd95(a, b, spacing) == pytest.approx(k * s)
    assert hd95(b, a, spacing) == pytest.approx(k * s)


def test_hd95_single_voxels():
    a = np.zeros((5, 30, 7), bool)
    b = np.zeros_like(a)
    a[2, 3, 3] = True
    b[2, 13, 3] = True
    assert hd95(a, b, (2.0, 0.3, 1.0)) == pytest.approx(3.0)
    assert hd95(a, b) == pytest.approx(10.0)  # default spacing 1


def test_hd95_matches_brute_force():
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 1.1)
    for _ in range(3):
        a = rng.random((8, 14, 12)) < 0.08
        b = rng.random((8, 14, 12)) < 0.08
        a[3:6, 4:9, 4:8] = True
        sa, sb = np.argwhere(mask_surface(a)) * spacing, np.argwhere(mask_surface(b)) * spacing
        d = cdist(sa, sb)
        expected = np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)
        assert hd95(a, b, spacing) == pytest.approx(expected)


def test_hd95_empty_conventions():
    empty = np.zeros((4, 4, 4), bool)
    full = cube((4, 4, 4), (1, 1, 1), 2)
    assert math.isnan(hd95(empty, empty, (1, 1, 1)))
    assert hd95(full, empty, (1, 1, 1)) == math.inf
    assert hd95(empty, full, (1, 1, 1)) == math.inf
    assert hd95(full, full, (1, 1, 1)) == 0.0


def save(path, arr, spacing):
    zooms = list(spacing)[::-1]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.T), np.diag(zooms + [1.0])), str(path))


def test_evaluate_folder(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    spacing = (0.5, 3.0, 3.0)
    ref = np.zeros((20, 12, 12), np.uint8)
    ref[4:10, 3:9, 3:9] = 1
    shifted = np.roll(ref, 2, axis=0)
    save(tmp_path / "ref" / "case_a.nii.gz", ref, spacing)
    save(tmp_path / "pred" / "case_a.nii.gz", shifted, spacing)
    save(tmp_path / "ref" / "case_b.nii.gz", ref, spacing)
    save(tmp_path / "pred" / "case_b.nii.gz", ref, spacing)
    save(tmp_path / "pred" / "extra.nii.gz", ref, spacing)  # predictions without reference: ignored
    labels = {0: "background", 1: "tumour"}
    res = evaluate_folder(tmp_path / "pred", tmp_path / "ref", labels)
    assert set(res["cases"]) == {"case_a", "case_b"}
    a = res["cases"]["case_a"]["tumour"]
    assert a["dice"] == pytest.approx(2 / 3) and a["hd95"] == pytest.approx(1.0)
    assert res["cases"]["case_b"]["tumour"] == {"dice": 1.0, "hd95": 0.0}
    assert "background" not in res["mean"]
    assert res["mean"]["tumour"]["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert res["mean"]["tumour"]["hd95"] == pytest.approx(0.5)
    assert res["foreground_mean_dice"] == pytest.approx(5 / 6)
    table = format_table(res)
    assert "tumour Dice" in table and "case_a" in table and "0.8333" in table

    with_bg = evaluate_folder(tmp_path / "pred", tmp_path / "ref", labels, include_background=True)
    assert "background" in with_bg["mean"]
    assert with_bg["foreground_mean_dice"] == pytest.approx(5 / 6)

    (tmp_path / "pred" / "case_b.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="case_b"):
        evaluate_folder(tmp_path / "pred", tmp_path / "ref", labels)
