"""End to end through the real CLI: plan, train, predict, evaluate, find-best on NIfTI files."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.io.phantom import write_phantom_dataset

pytestmark = pytest.mark.slow

TINY = '{"base_width": 8, "max_width": 64}'


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "Dataset001_Phantom"
    write_phantom_dataset(root, num_cases=8, num_test=3, shape=(24, 40, 40), spacing=(2.0, 1.0, 1.0))
    return str(root)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run") / "unet3d")
    rc = main([
        "train", dataset, "-o", run, "-m", "unet-3d-fullres", "--model-kwargs", TINY,
        "--epochs", "6", "--iterations", "20", "--val-batches", "2", "--patch-size", "16x32x32",
        "--batch-size", "2", "--device", "cpu", "--seed", "0", "-q",
    ])
    assert rc == 0
    return run


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "napari-medseg" in capsys.readouterr().out


def test_plan_writes_plans_json(dataset, capsys):
    assert main(["plan", dataset]) == 0
    with open(os.path.join(dataset, "plans.json")) as fh:
        plans = json.load(fh)
    assert "3d_fullres" in json.dumps(plans) and "2d" in json.dumps(plans)
    assert "3d_fullres" in capsys.readouterr().out


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("unet-2d", "unet-3d-fullres", "unet-3d-lowres", "unet-3d-cascade"):
        assert name in out
    assert "colin27_deepgm_unet3d  [shipped, unet-3d-fullres]" in out  # checkpoints by their usable name


def test_train_predict_evaluate(trained, dataset, tmp_path, capsys):
    ckpt = os.path.join(trained, "checkpoint_final.pt")
    assert os.path.isfile(ckpt)
    with open(os.path.join(trained, "run.json")) as fh:
        info = json.load(fh)
    assert info["config"]["epochs"] == 6
    out_dir = str(tmp_path / "pred")
    assert main(["predict", os.path.join(dataset, "imagesTs"), "-o", out_dir, "-c", ckpt, "--device", "cpu", "-q"]) == 0
    names = sorted(os.listdir(out_dir))
    assert names == ["phantom_008.nii.gz", "phantom_009.nii.gz", "phantom_010.nii.gz"]
    for name in names:
        src = nib.load(os.path.join(dataset, "imagesTs", name.replace(".nii.gz", "_0000.nii.gz")))
        pred = nib.load(os.path.join(out_dir, name))
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6)
        assert pred.shape == src.shape
        assert np.issubdtype(pred.get_data_dtype(), np.integer)
    capsys.readouterr()
    assert main(["evaluate", out_dir, os.path.join(dataset, "labelsTs")]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out_dir, "summary.json")) as fh:
        summary = json.load(fh)
    assert "ellipsoid_1" in printed
    assert summary["foreground_mean_dice"] > 0.9, printed


def test_resume_continues_from_saved_epoch(trained, dataset, tmp_path):
    from napari_medseg.engine.checkpoints import load_checkpoint

    latest = os.path.join(trained, "checkpoint_latest.pt")
    ckpt = load_checkpoint(latest)
    assert ckpt.epoch == 5
    run2 = str(tmp_path / "resumed")
    rc = main(["train", dataset, "-o", run2, "-m", "unet-3d-fullres", "--resume", latest, "--epochs", "7",
               "--iterations", "2", "--val-batches", "1", "--device", "cpu", "-q"])
    assert rc == 0
    resumed = load_checkpoint(os.path.join(run2, "checkpoint_final.pt"))
    assert resumed.epoch == 6
    assert len(resumed.history) == 7  # 6 epochs from the first run + 1 more
    assert resumed.history[-1]["epoch"] == 6


def test_find_best_records_choice(trained, dataset, tmp_path, capsys):
    run2 = str(tmp_path / "unet2d")
    rc = main(["train", dataset, "-o", run2, "-m", "unet-2d", "-c", "2d", "--model-kwargs", TINY,
               "--epochs", "2", "--iterations", "10", "--val-batches", "1", "--patch-size", "32x32",
               "--batch-size", "4", "--device", "cpu", "--seed", "0", "-q"])
    assert rc == 0
    out = str(tmp_path / "best.json")
    assert main(["find-best", dataset, f"3d={trained}", f"2d={run2}", "-o", out, "--device", "cpu",
                 "--no-mirror", "-q"]) == 0
    with open(out) as fh:
        result = json.load(fh)
    assert set(result["scores"]) == {"3d", "2d", "2d+3d"}
    assert result["best"] == max(result["scores"], key=result["scores"].get)


def test_clear_error_on_bad_dataset(tmp_path, capsys):
    (tmp_path / "not_a_dataset").mkdir()
    assert main(["train", str(tmp_path / "not_a_dataset"), "-o", str(tmp_path / "r"), "-q"]) == 2
    assert "error:" in capsys.readouterr().err
