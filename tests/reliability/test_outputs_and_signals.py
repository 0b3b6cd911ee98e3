"""Issue 15, classes 1-3: an output never replaces an input or an existing file without
``--overwrite``; Ctrl-C and SIGTERM during training save a resumable checkpoint; an existing run
is never replaced silently. Each case hashes the folder before and after."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from medseg_testing import make_tiny_checkpoint
from rel_helpers import tree_hashes

from napari_medseg.cli import main
from napari_medseg.engine.checkpoints import load_checkpoint
from napari_medseg.io.phantom import write_phantom_dataset

TINY = '{"base_width": 4, "max_width": 16}'


@pytest.fixture
def ws(tmp_path):
    ds = write_phantom_dataset(tmp_path / "Dataset001", num_cases=2, shape=(16, 32, 32))
    ckpt = make_tiny_checkpoint(tmp_path / "m.pt")
    return tmp_path, ds, ckpt


def _predict(*args) -> int:
    return main(["predict", *map(str, args), "--device", "cpu", "--no-mirror", "-q"])


def test_predict_onto_its_input_is_refused_even_with_overwrite(ws, capsys):
    root, ds, ckpt = ws
    scan = os.path.join(ds, "imagesTr", "phantom_000_0000.nii.gz")
    before = tree_hashes(root)
    assert _predict(scan, "-o", scan, "-c", ckpt) == 2
    assert _predict(scan, "-o", scan, "-c", ckpt, "--overwrite") == 2
    assert "would replace the input" in capsys.readouterr().err
    assert tree_hashes(root) == before


def test_predict_folder_onto_itself_is_refused(ws, capsys):
    root, ds, ckpt = ws
    folder = root / "scans"
    os.makedirs(folder)
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(os.path.join(ds, "labelsTr", "phantom_000.nii.gz"), folder / name)
    before = tree_hashes(root)
    assert _predict(folder, "-o", folder, "-c", ckpt, "--overwrite") == 2
    assert tree_hashes(root) == before


def test_two_inputs_with_one_output_name_are_refused_before_compute(ws, capsys):
    root, ds, ckpt = ws
    folder = root / "scans"
    os.makedirs(folder)
    src = os.path.join(ds, "imagesTr", "phantom_000_0000.nii.gz")
    shutil.copy(src, folder / "case.nii.gz")
    import nibabel as nib

    nib.save(nib.load(src), str(folder / "case.nii"))
    before = tree_hashes(root)
    assert _predict(folder, "-o", root / "out", "-c", ckpt) == 2
    assert "same output" in capsys.readouterr().err
    assert tree_hashes(root) == before and not (root / "out").exists()  # not even the folder


def test_existing_output_needs_overwrite(ws, capsys):
    root, ds, ckpt = ws
    scan = os.path.join(ds, "imagesTr", "phantom_000_0000.nii.gz")
    out = root / "seg.nii.gz"
    out.write_bytes(b"someone else's file")
    assert _predict(scan, "-o", out, "-c", ckpt) == 2
    assert out.read_bytes() == b"someone else's file" and "--overwrite" in capsys.readouterr().err
    assert _predict(scan, "-o", out, "-c", ckpt, "--overwrite") == 0
    assert out.read_bytes() != b"someone else's file"


def test_plan_never_replaces_the_dataset_and_asks_before_replacing_its_plans(ws, capsys):
    root, ds, _ = ws
    before = tree_hashes(root)
    assert main(["plan", ds, "-o", os.path.join(ds, "dataset.json"), "--overwrite"]) == 2
    assert tree_hashes(root) == before
    assert main(["plan", ds]) == 0
    planned = tree_hashes(root)
    assert main(["plan", ds]) == 2 and tree_hashes(root) == planned
    assert main(["plan", ds, "--overwrite"]) == 0


def _train_args(ds, run, *extra):
    return ["train", ds, "-o", str(run), "-m", "unet-3d-fullres", "--model-kwargs", TINY, "--epochs", "1",
            "--iterations", "1", "--val-batches", "1", "--patch-size", "16x32x32", "--batch-size", "1",
            "--device", "cpu", "-q", *extra]


def test_training_into_an_existing_run_is_refused(ws, capsys):
    root, ds, _ = ws
    run = root / "run"
    assert main(_train_args(ds, run)) == 0
    before = tree_hashes(run)
    assert main(_train_args(ds, run)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert tree_hashes(run) == before
    assert main(_train_args(ds, run, "--overwrite")) == 0


@pytest.mark.skipif(os.name != "posix", reason="signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_in_the_first_epoch_saves_a_resumable_checkpoint(ws, signum):
    root, ds, _ = ws
    run = root / "run"
    args = _train_args(ds, run)
    args[args.index("--epochs") + 1] = "3"
    args[args.index("--iterations") + 1] = "100000"  # the first epoch never ends by itself
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "napari_medseg.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "run.json").exists():  # written when the training loop starts
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(2.0)  # inside the first epoch
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "--resume" in err
    latest = load_checkpoint(run / "checkpoint_latest.pt")
    assert latest.epoch == -1 and latest.optimizer_state is not None  # resumable, no epoch finished
    resume = ["train", ds, "--resume", str(run / "checkpoint_latest.pt"), "--epochs", "1", "--iterations", "1",
              "--val-batches", "1", "--device", "cpu", "-q"]
    assert main(resume) == 0
    assert load_checkpoint(run / "checkpoint_final.pt").epoch == 0
