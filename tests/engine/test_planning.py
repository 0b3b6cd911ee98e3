"""Experiment planner: nnU-Net v1 (plans v2.1) rules and reference plans."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from napari_medseg.engine.planning import (
    PLANNER_VERSION,
    Plan,
    PlanningError,
    compute_fingerprint,
    estimate_vram,
    get_pool_and_conv_props,
    plan_experiment,
    plan_from_fingerprint,
    plans_from_json,
    plans_to_json,
    target_spacing,
)


def _shapes_with_median(median, n, seed=0):
    """Per-case shapes scattered symmetrically around ``median`` (so the median is exact)."""
    rng = np.random.default_rng(seed)
    cols = []
    for m in median:
        d = rng.integers(1, 5, n // 2)
        v = np.concatenate([m - d, m + d])
        rng.shuffle(v)
        cols.append(v)
    return np.stack(cols, 1)


@pytest.fixture(scope="module")
def hippocampus():
    # MSD Task04 Hippocampus: 260 training cases, 1 mm isotropic, median shape 36 x 50 x 35, one
    # MRI channel, 3 classes (background, anterior, posterior).
    shapes = _shapes_with_median((36, 50, 35), 260)
    assert np.median(shapes, 0).tolist() == [36, 50, 35]
    return plan_experiment([(1.0, 1.0, 1.0)] * 260, shapes, 1, 3, modality=("MRI",))


def test_hippocampus_matches_nnunet_v1_plans(hippocampus):
    # nnU-Net v1 nnUNetPlansv2.1 for Task004_Hippocampus: 3d_fullres patch [40, 56, 40],
    # batch 9, pools [[2,2,2]]*3; 2d patch [56, 40], batch 366, pools [[2,2]]*3. No low-res stage.
    assert set(hippocampus) == {"2d", "3d_fullres"}
    full = hippocampus["3d_fullres"]
    assert full.patch_size == (40, 56, 40) and full.batch_size == 9
    assert full.pool_kernels == [[2, 2, 2]] * 3 and full.conv_kernels == [[3, 3, 3]] * 4
    assert full.spacing == (1.0, 1.0, 1.0) and full.median_shape == (36, 50, 35)
    two = hippocampus["2d"]
    assert two.patch_size == (56, 40) and two.batch_size == 366
    assert two.pool_kernels == [[2, 2]] * 3 and two.conv_kernels == [[3, 3]] * 4
    for p in hippocampus.values():
        assert p.transpose_forward == [0, 1, 2] == p.transpose_backward
        assert p.normalization == ["zscore"] and p.use_mask_for_norm == [False]
        assert p.num_channels == 1 and p.num_classes == 3 and p.extras.get("previous_stage") is None
    assert two.batch_dice and not full.batch_dice  # batch Dice: 2D, and 3D only with a cascade


def test_vram_estimate_by_hand():
    # 40x56x40, 3 pools, base 32, 1 channel, 3 classes: full res (2*2+1)*89600*32 + 89600 + 3*89600;
    # 1/2: 5*11200*64; 1/4: 5*1400*128; bottleneck: 2*175*256.
    hand = 5 * 89600 * 32 + 4 * 89600 + 5 * 11200 * 64 + 5 * 1400 * 128 + 2 * 175 * 256
    assert estimate_vram((40, 56, 40), [[2, 2, 2]] * 3, 32, 320, 1, 3) == hand == 19_264_000
    # 2D 56x40 with the 30 features the v2.1 2D planner pretends to use.
    hand2 = 5 * 2240 * 30 + 4 * 2240 + 5 * 560 * 60 + 5 * 140 * 120 + 2 * 35 * 240
    assert estimate_vram((56, 40), [[2, 2]] * 3, 30, 512, 1, 3) == hand2
    assert estimate_vram((40, 56, 40), [[2, 2, 2]] * 3, 32, 320, 1, 3, deep_supervision=True) > hand


@pytest.mark.parametrize("num_cases, expected", [(260, 9), (1000, 35), (5000, 57)])
def test_3d_batch_size_formula(num_cases, expected):
    # uncapped: floor(520e6 * 32/30 / 19_264_000 * 2) = 57; cap: round(5% * 63000 * n / 89600).
    shapes = _shapes_with_median((36, 50, 35), num_cases)
    plans = plan_experiment([(1.0, 1.0, 1.0)] * num_cases, shapes, 1, 3)
    assert plans["3d_fullres"].batch_size == expected


def test_batch_size_minimum_two_in_3d():
    plans = plan_experiment([(1.0, 1.0, 1.0)] * 2, [(36, 50, 35)] * 2, 1, 3)
    assert plans["3d_fullres"].batch_size == 2  # the 5 % cap would give 0


def test_pool_and_conv_props():
    n, pools, convs, patch, div = get_pool_and_conv_props((1.0, 1.0, 1.0), (36, 50, 35))
    assert n == [3, 3, 3] and patch == [40, 56, 40] and div == [8, 8, 8]
    n, pools, convs, patch, div = get_pool_and_conv_props((3.0, 1.0, 1.0), (20, 64, 64))
    # axis 0 joins once the in-plane spacing reaches 2 mm (3/2 < 2), then all pool together
    assert pools[:2] == [[1, 2, 2], [2, 2, 2]] and convs[0] == [1, 3, 3] and convs[1] == [3, 3, 3]
    assert convs[-1] == [3, 3, 3] and len(convs) == len(pools) + 1
    assert all(p % d == 0 for p, d in zip(patch, div))


def test_anisotropic_dataset_transposes_and_uses_10th_percentile():
    z = [3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0]  # 10th percentile: 3 + 0.9 * (4 - 3)
    spacings = [(0.8, 0.8, s) for s in z]  # coarse axis last in napari order
    plans = plan_experiment(spacings, [(256, 256, 20)] * 10, 1, 2)
    full = plans["3d_fullres"]
    assert full.transpose_forward == [2, 0, 1] and full.transpose_backward == [1, 2, 0]
    assert full.spacing == pytest.approx((3.9, 0.8, 0.8))
    assert full.conv_kernels[0] == [1, 3, 3] and full.pool_kernels[0] == [1, 2, 2]
    assert full.conv_kernels[-1] == [3, 3, 3]
    assert full.median_shape == (26, 256, 256)  # median of 20 * s / 3.9 -> 25.6
    divisor = np.prod(np.array(full.pool_kernels), axis=0)
    assert all(p % d == 0 for p, d in zip(full.patch_size, divisor))
    assert full.do_dummy_2d_data_aug  # 256 / 28 > 3
    assert plans["2d"].patch_size == (256, 256)
    assert target_spacing(np.array(spacings), np.array([(256, 256, 20)] * 10))[2] == pytest.approx(
        3.9
    )


def test_isotropic_like_spacing_keeps_median():
    spacings = [(2.0, 1.0, 1.0), (2.5, 1.0, 1.0), (3.5, 1.0, 1.0)]
    t = target_spacing(np.array(spacings), np.array([(100, 100, 100)] * 3))
    assert t.tolist() == [2.5, 1.0, 1.0]  # not > 3x anisotropic: median


def test_big_dataset_gets_lowres_and_cascade():
    plans = plan_experiment([(1.0, 1.0, 1.0)] * 20, [(400, 400, 400)] * 20, 1, 2)
    assert list(plans) == ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    full, low, casc = plans["3d_fullres"], plans["3d_lowres"], plans["3d_cascade_fullres"]
    assert np.prod(full.patch_size) * 4 <= np.prod(full.median_shape)
    assert all(a > b for a, b in zip(low.spacing, full.spacing))
    assert np.prod(low.median_shape) <= 4 * np.prod(low.patch_size) * 1.05
    assert 2 * np.prod(low.median_shape) < np.prod(full.median_shape)
    assert casc.extras.get("previous_stage") == "3d_lowres" and low.extras.get("previous_stage") is None
    assert casc.configuration == "3d_cascade_fullres" and casc.model_name == "unet-3d-cascade"
    same = {k: v for k, v in casc.to_dict().items() if k not in ("configuration", "previous_stage")}
    assert same == {k: v for k, v in full.to_dict().items() if k in same}
    assert full.batch_dice and casc.batch_dice and not low.batch_dice


def test_memory_budget_scales_the_patch():
    args = ([(1.0, 1.0, 1.0)] * 20, [(300, 300, 300)] * 20, 1, 2)
    small = plan_experiment(*args, memory_budget=2)["3d_fullres"]
    default = plan_experiment(*args)["3d_fullres"]
    big = plan_experiment(*args, memory_budget=32)["3d_fullres"]
    assert np.prod(small.patch_size) < np.prod(default.patch_size) < np.prod(big.patch_size)
    with pytest.raises(PlanningError):
        plan_experiment(*args, memory_budget=0)


def test_2d_only_data_gives_only_2d():
    plans = plan_experiment([(0.5, 0.5)] * 5, [(96, 128)] * 5, 3, 2)
    assert list(plans) == ["2d"]
    assert plans["2d"].patch_size == (96, 128) and plans["2d"].num_channels == 3


def test_ct_normalization_needs_stats_and_mask_rule():
    sp, sh = [(1.0, 1.0, 1.0)] * 4, [(40, 40, 40)] * 4
    with pytest.raises(PlanningError, match="CT"):
        plan_experiment(sp, sh, 1, 2, modality=("CT",))
    stats = [{"mean": 50.0, "std": 20.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0}]
    p = plan_experiment(
        sp, sh, 1, 2, modality=("CT",), intensity_stats=stats, size_reductions=[0.3] * 4
    )["3d_fullres"]
    assert (
        p.normalization == ["ct"] and p.intensity_stats == stats and p.use_mask_for_norm == [False]
    )
    p = plan_experiment(
        sp, sh, 2, 2, modality=("T1", "noNorm"), size_reductions=[0.5, 0.6, 0.9, 0.7]
    )
    assert p["2d"].normalization == ["zscore", "none"] and p["2d"].use_mask_for_norm == [True, True]
    p = plan_experiment(sp, sh, 1, 2, size_reductions=[0.9] * 4)
    assert p["3d_fullres"].use_mask_for_norm == [False]
    with pytest.raises(PlanningError, match="modality"):
        plan_experiment(sp, sh, 3, 2, modality=("CT", "MRI"))
    with pytest.raises(PlanningError):
        plan_experiment(sp, [(40, 40)] * 4, 1, 2)


def test_plans_json_round_trip(tmp_path, hippocampus):
    path = tmp_path / "plans.json"
    assert plans_to_json(hippocampus, path) == str(path)
    doc = json.loads(path.read_text())
    assert doc["planner_version"] == PLANNER_VERSION and set(doc["plans"]) == set(hippocampus)
    back = plans_from_json(path)
    assert back == hippocampus
    assert all(isinstance(p, Plan) for p in back.values())
    assert os.listdir(tmp_path) == ["plans.json"]  # no temp file left behind
    (tmp_path / "bad.json").write_text('{"something": 1}')
    with pytest.raises(PlanningError, match="plans"):
        plans_from_json(tmp_path / "bad.json")


def test_fingerprint_crops_and_measures_foreground():
    cases = []
    for i, inner in enumerate([(10, 12, 14), (8, 12, 16), (12, 10, 14)]):
        image = np.zeros((2, 20, 24, 28), np.float32)
        region = tuple(slice(2, 2 + s) for s in inner)
        image[(slice(None), *region)] = 1.0
        label = np.zeros((20, 24, 28), np.int16)
        label[3:6, 4:8, 5:9] = 1 + i % 2
        image[0][label > 0] = 10.0 + i  # foreground intensity differs per case
        image[1][label > 0] = 100.0
        cases.append((image, (2.0, 1.0, 1.0), label))
    fp = compute_fingerprint(iter(cases), sample_every=1)
    assert fp["num_cases"] == 3 and fp["num_channels"] == 2
    assert fp["shapes"] == [[10, 12, 14], [8, 12, 16], [12, 10, 14]]
    assert fp["original_shapes"] == [[20, 24, 28]] * 3
    assert fp["size_reductions"][0] == pytest.approx(10 * 12 * 14 / (20 * 24 * 28))
    assert fp["classes"] == [0, 1, 2] and fp["num_classes"] == 3
    s0, s1 = fp["intensity_stats"]
    assert s0["mean"] == pytest.approx(11.0) and s0["min"] == 10.0 and s0["max"] == 12.0
    assert s1["std"] == pytest.approx(0.0) and s1["percentile_99_5"] == pytest.approx(100.0)
    assert fp["intensity_stats_source"] == "foreground"
    json.dumps(fp)  # plain types
    plans = plan_from_fingerprint(fp, modality=("CT", "MRI"))
    assert plans["3d_fullres"].normalization == ["ct", "zscore"]
    assert plans["3d_fullres"].intensity_stats[0]["mean"] == pytest.approx(11.0)


def test_fingerprint_without_labels_and_errors():
    image = np.ones((6, 6, 6), np.float32) * 3
    fp = compute_fingerprint([(image, (1.0, 1.0, 1.0), None)])
    assert fp["num_channels"] == 1 and fp["num_classes"] is None
    assert fp["intensity_stats_source"] == "all_voxels" and fp["intensity_stats"][0]["mean"] == 3.0
    with pytest.raises(PlanningError, match="num_classes"):
        plan_from_fingerprint(fp)
    with pytest.raises(PlanningError, match="no cases"):
        compute_fingerprint([])
    with pytest.raises(PlanningError, match="label shape"):
        compute_fingerprint([(image, (1.0, 1.0, 1.0), np.zeros((5, 6, 6)))])


def test_plan_dict_is_plain_and_strict():
    p = Plan("3d_fullres", (1.0, 1.0, 1.0), (8, 8, 8), 2, [[2, 2, 2]], [[3, 3, 3]] * 2, ["zscore"])
    d = p.to_dict()
    json.dumps(d)
    assert Plan.from_dict(d) == p
    assert p.model_kwargs() == {"pool_kernels": [[2, 2, 2]], "conv_kernels": [[3, 3, 3]] * 2}
    with pytest.raises(ValueError, match="Unknown plan fields"):
        Plan.from_dict({**d, "bogus": 1})
