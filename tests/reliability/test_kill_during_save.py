"""A process killed (SIGKILL) in the middle of saving leaves the previous file intact and loadable.

A child process saves in a loop; it sets ``napari_medseg.io.atomic.before_replace`` (the hook of the
one atomic-write helper) so that each save pauses between writing the temporary file and renaming it, so the kill lands inside a save. The child prints ``begin N``
before save ``N``; the parent kills it a random moment later (inside save ``N``) and checks that
the file on disk is save ``N - 1``, complete.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from napari_medseg.io.atomic import TEMP_MARK

pytestmark = pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")

HERE = os.path.dirname(os.path.abspath(__file__))

PAUSE = textwrap.dedent("""
    import time
    import napari_medseg.io.atomic as _atomic
    _atomic.before_replace = lambda tmp: time.sleep(0.3)
""")

CHECKPOINT_CHILD = PAUSE + textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{here!r}, {here!r} + "/.."]
    torch.set_num_threads(1)
    from rel_helpers import TINY_KWARGS
    from napari_medseg.engine.checkpoints import save_checkpoint
    from napari_medseg.models import create_model
    model = create_model("unet-3d-fullres", 1, 2, 3, **TINY_KWARGS)
    for n in range(1000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(n))
        print("begin", n, flush=True)
        save_checkpoint({path!r}, model, model_name="unet-3d-fullres", model_kwargs=TINY_KWARGS,
                        in_channels=1, num_classes=2, spatial_dims=3, plan={{}}, label_names={{}}, epoch=n)
        print("end", n, flush=True)
""")

LABELS_CHILD = PAUSE + textwrap.dedent("""
    import numpy as np
    from napari_medseg.io import write_nifti
    for n in range(1000):
        print("begin", n, flush=True)
        write_nifti({path!r}, np.full((24, 40, 40), n % 200, np.uint8), spacing=(2.0, 1.0, 1.0), is_label=True)
        print("end", n, flush=True)
""")


def _run_and_kill(script: str, rng: random.Random, kill_at: int) -> int:
    """Start the child, kill it inside save ``kill_at``; return that save's number."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"child exited early with {proc.wait()}"
            word, n = line.split()
            if word == "begin" and int(n) == kill_at:
                time.sleep(rng.uniform(0.0, 0.1))  # inside the save: writing, fsync or the pause
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(10) == -signal.SIGKILL
                return int(n)
        raise AssertionError("the child never reached the save to kill")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checkpoint_survives_a_kill_during_save(tmp_path, seed):
    from napari_medseg.engine.checkpoints import build_model, load_checkpoint

    rng = random.Random(seed)
    path = str(tmp_path / "checkpoint_latest.pt")
    killed = _run_and_kill(CHECKPOINT_CHILD.format(here=HERE, path=path), rng, kill_at=rng.randint(1, 3))
    ckpt = load_checkpoint(path)  # the previous save, whole
    assert ckpt.epoch == killed - 1
    model = build_model(ckpt)
    assert all(float(p.detach().flatten()[0]) == killed - 1 for p in model.parameters())
    leftovers = [n for n in os.listdir(tmp_path) if n != "checkpoint_latest.pt"]
    assert all(n.startswith(".checkpoint_latest.pt.") and TEMP_MARK in n for n in leftovers), leftovers


@pytest.mark.parametrize("seed", [3, 4])
def test_label_file_survives_a_kill_during_save(tmp_path, seed):
    from napari_medseg.io import read_nifti

    rng = random.Random(seed)
    path = str(tmp_path / "labels.nii.gz")
    killed = _run_and_kill(LABELS_CHILD.format(path=path), rng, kill_at=rng.randint(1, 3))
    vol = read_nifti(path)
    assert vol.data.shape == (24, 40, 40)
    assert np.all(vol.data == killed - 1)
