"""Cancel and close in a real viewer: the worker stops within one tile / iteration, no thread is
left running, nothing half-done is added, and training keeps a loadable ``checkpoint_latest.pt``."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from medseg_testing import select_checkpoint
from rel_helpers import make_tiny_checkpoint

pytestmark = pytest.mark.gui


def _python_threads() -> set:
    return {t for t in threading.enumerate() if not isinstance(t, threading._DummyThread)}


def _pool_active() -> int:
    from qtpy.QtCore import QThreadPool

    return QThreadPool.globalInstance().activeThreadCount()


class _Recorder:
    """Counts engine events in the worker thread and how many came after the stop flag was set."""

    def __init__(self, widget, stage: str, stop_after: int):
        from qtpy.QtCore import Qt

        self.lock = threading.Lock()
        self.count = 0
        self.at_stop: int | None = None
        self.stage = stage
        self.stop_after = stop_after
        self.reached = threading.Event()
        stop = widget.stop_flag
        real_set = stop.set

        def set_and_mark():
            with self.lock:
                if self.at_stop is None:
                    self.at_stop = self.count
            real_set()

        stop.set = set_and_mark
        widget.worker.yielded.connect(self.on_event, Qt.DirectConnection)

    def on_event(self, event):  # worker thread
        if getattr(event, "stage", None) != self.stage:
            return
        with self.lock:
            self.count += 1
            if self.count >= self.stop_after:
                self.reached.set()

    @property
    def after_stop(self) -> int:
        return self.count - self.at_stop


def _segment_setup(make_napari_viewer, tmp_path):
    from napari_medseg.engine.checkpoints import register_checkpoint
    from napari_medseg.widgets._segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).normal(size=(32, 64, 64)).astype(np.float32), name="big")
    path = make_tiny_checkpoint(tmp_path / "tiny.pt", patch=(8, 8, 8))
    register_checkpoint(path, name="tiny")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    select_checkpoint(widget.checkpoints, path)
    widget.mirror.setChecked(True)
    widget.device.setCurrentText("cpu")
    return viewer, widget


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_predict_stops_within_one_tile(make_napari_viewer, qtbot, tmp_path, how):
    baseline_threads, baseline_pool = _python_threads(), _pool_active()
    viewer, widget = _segment_setup(make_napari_viewer, tmp_path)
    added = []
    viewer.layers.events.inserted.connect(lambda e: added.append(e.value.name))
    widget.run_button.click()
    rec = _Recorder(widget, "tiles", stop_after=3)
    qtbot.waitUntil(rec.reached.is_set, timeout=60_000)
    stop = widget.stop_flag
    if how == "cancel":
        widget.cancel_button.click()
        qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
        assert "Cancelled" in widget.status.text()
        assert [layer.name for layer in viewer.layers] == ["big"]
    else:
        viewer.close()  # returns once the worker has left the engine
    assert stop.done.is_set()
    assert rec.after_stop <= 1, f"{rec.after_stop} tiles after the stop"
    qtbot.wait(50)  # let any queued result reach the (disconnected) widget
    assert added == []  # no half-done layer
    qtbot.waitUntil(lambda: _pool_active() <= baseline_pool, timeout=10_000)
    assert _python_threads() <= baseline_threads


def _train_setup(make_napari_viewer, tmp_path):
    from napari_medseg.io.phantom import make_phantom
    from napari_medseg.widgets._train import TrainWidget

    viewer = make_napari_viewer()
    image, labels = make_phantom((16, 32, 32), num_classes=2, seed=1)
    viewer.add_image(image.astype(np.float32), name="scan")
    viewer.add_labels(labels, name="truth")
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    widget.minutes.setValue(0)  # no time budget: epochs x iterations, so epoch 1 ends after 3 iterations
    widget.epochs.setValue(50)
    widget.iterations.setValue(3)
    widget.batch.setValue(1)
    widget.patch.setText("16,16,16")
    widget.model_kwargs.setText('{"base_width": 4}')
    widget.device.setCurrentText("cpu")
    widget.output.setText(str(tmp_path / "run"))
    return viewer, widget


@pytest.mark.parametrize("how", ["stop", "close"])
def test_training_stops_within_one_iteration_and_keeps_a_checkpoint(make_napari_viewer, qtbot, tmp_path, how):
    from napari_medseg.engine.checkpoints import build_model, load_checkpoint

    baseline_threads, baseline_pool = _python_threads(), _pool_active()
    viewer, widget = _train_setup(make_napari_viewer, tmp_path)
    widget.train_button.click()
    assert widget.running, widget.status.text()
    rec = _Recorder(widget, "train", stop_after=5)  # inside the second epoch
    qtbot.waitUntil(rec.reached.is_set, timeout=120_000)
    stop = widget.stop_flag
    if how == "stop":
        widget.stop_button.click()
        qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
        assert "Stopped" in widget.status.text()
    else:
        viewer.close()
    assert stop.done.is_set()
    assert rec.after_stop <= 1, f"{rec.after_stop} iterations after the stop"
    latest = tmp_path / "run" / "checkpoint_latest.pt"
    ckpt = load_checkpoint(latest)  # the last good checkpoint loads and builds
    assert ckpt.epoch >= 0
    build_model(ckpt)
    assert not (tmp_path / "run" / "checkpoint_final.pt").exists()
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]
    qtbot.waitUntil(lambda: _pool_active() <= baseline_pool, timeout=10_000)
    assert _python_threads() <= baseline_threads
