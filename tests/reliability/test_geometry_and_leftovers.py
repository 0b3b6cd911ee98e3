"""Issue 15, classes 4 and 9 beyond the matrix: one grid comparison for layers, files and
evaluation (with a tolerance that accepts float32 headers), and temporary files a killed process
left behind are removed by the next write into their folder."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import napari_medseg.engine.data.dataset as dataset
import napari_medseg.engine.evaluation.metrics as metrics
from napari_medseg.io import write_nifti
from napari_medseg.io.atomic import STALE_TEMP_SECONDS, atomic_write_text, temp_path_for
from napari_medseg.io.grid import GRID_TOLERANCE, grid_difference


def _grid(spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    m = np.eye(4)
    m[:3, :3] = np.diag(spacing)
    m[:3, 3] = origin
    return m


SHAPE = (16, 32, 32)


def test_one_comparison_serves_the_widget_the_dataset_and_evaluate():
    pytest.importorskip("qtpy")
    import inspect

    import napari_medseg.widgets._layers as layers

    # the widget imports the comparison where it uses it (napari_medseg.io is imported lazily there)
    assert "from napari_medseg.io.grid import grid_difference" in inspect.getsource(layers.check_same_grid)
    assert dataset.grid_difference is grid_difference
    assert metrics.volume_grid_difference.__module__ == "napari_medseg.io.grid"


@pytest.mark.parametrize("jitter", [1e-6, 1e-4, 0.5 * GRID_TOLERANCE])
def test_header_rounding_is_the_same_grid(jitter):
    assert grid_difference(SHAPE, _grid(origin=(jitter, -jitter, jitter)), SHAPE, _grid()) is None
    assert grid_difference(SHAPE, _grid(spacing=(2.0 + jitter / 100, 1.0, 1.0)), SHAPE, _grid()) is None


@pytest.mark.parametrize(("other", "words"), [
    (_grid(origin=(0.0, 40.0, 0.0)), "origin (0, 40, 0) vs the reference's (0, 0, 0), 40 mm away"),
    (_grid(origin=(0.0, 0.0, 0.02)), "0.02 mm away"),  # 2 % of a voxel: a segmentation can show it
    (_grid(spacing=(2.0, 1.0, 1.01)), "voxel size (2, 1, 1.01) vs the reference's (2, 1, 1)"),
    (_grid(spacing=(2.0, 1.0, -1.0), origin=(0.0, 0.0, 31.0)), "axis 2 is flipped"),
])
def test_what_differs_is_said_with_the_numbers(other, words):
    assert words in grid_difference(SHAPE, other, SHAPE, _grid())


def _old(path, age):
    with open(path, "w") as fh:
        fh.write("half a file")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path, monkeypatch):
    import napari_medseg.io.atomic as atomic

    monkeypatch.setattr(atomic, "_swept", set())
    target = tmp_path / "labels.nii.gz"
    stale = _old(temp_path_for(target), STALE_TEMP_SECONDS + 60)  # left by a SIGKILL an hour ago
    fresh = _old(temp_path_for(target), 5)  # another process writing now
    other = _old(tmp_path / ".notes.tmp", STALE_TEMP_SECONDS + 60)  # not ours: never touched
    write_nifti(target, np.ones((4, 5, 6), np.uint8), is_label=True)
    assert not os.path.exists(stale)
    assert os.path.exists(fresh) and os.path.exists(other) and os.path.exists(target)


def test_stale_temporary_files_go_on_any_atomic_write(tmp_path, monkeypatch):
    import napari_medseg.io.atomic as atomic

    monkeypatch.setattr(atomic, "_swept", set())
    stale = _old(temp_path_for(tmp_path / "checkpoint_latest.pt"), 2 * STALE_TEMP_SECONDS)
    atomic_write_text(tmp_path / "run.json", "{}")
    assert not os.path.exists(stale)
    assert sorted(os.listdir(tmp_path)) == ["run.json"]
