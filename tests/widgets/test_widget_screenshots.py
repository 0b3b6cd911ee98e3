"""Screenshots for the docs, after real runs: ``MEDSEG_SCREENSHOTS=1 pytest tests/widgets -k screenshot``.

Trains a small model on the Colin27 sample in the Train widget (a few CPU minutes), segments the
sample with it in the Segment widget (or with ``MEDSEG_SCREENSHOT_CHECKPOINT`` when set, e.g. the
shipped model), opens the Model library, and writes ``docs/screenshot_{train,segment,library}.png``;
optionally a whole head (``MEDSEG_SCREENSHOT_HEAD``) and the correction loop on another brain
(``MEDSEG_SCREENSHOT_CORRECT``), which replaces the Train screenshot with a fine-tune of the shipped
model on corrected slices.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MEDSEG_SCREENSHOTS") != "1", reason="set MEDSEG_SCREENSHOTS=1"),
]

DOCS = Path(__file__).resolve().parents[2] / "docs"
SIZE = (1600, 1000)


def _dock(viewer, widget, name, width=430):
    from qtpy.QtCore import Qt

    dock = viewer.window.add_dock_widget(widget, name=name, area="right")
    viewer.window._qt_window.resizeDocks([dock], [width], Qt.Horizontal)
    return dock


def _shot(viewer, qtbot, name):
    qtbot.wait(300)
    viewer.reset_view()
    qtbot.wait(500)
    path = DOCS / name
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    assert path.is_file() and path.stat().st_size > 10_000
    return path


def _train(viewer, qtbot, image, truth, epochs, tmp_path) -> str:
    from napari_medseg.widgets._train import TrainWidget

    train = TrainWidget(viewer)
    train_dock = _dock(viewer, train, "Train / Fine-tune")
    train.labels.set_layer(truth)
    train.channels.set_layers([image])
    train.minutes.setValue(float(os.environ.get("MEDSEG_SCREENSHOT_MINUTES", 0)))  # 0: epochs below
    train.epochs.setValue(epochs)
    train.iterations.setValue(int(os.environ.get("MEDSEG_SCREENSHOT_ITERATIONS", 15)))
    train.batch.setValue(2)
    train.patch.setText("32,48,48")
    train.model_kwargs.setText('{"base_width": 8}')
    train.device.setCurrentText("cpu")
    train.output.setText(str(tmp_path / "colin27_run"))
    train.resegment.setChecked(False)  # the shot shows the Train form and its curves, not a Segment tab
    train.train_button.click()
    assert train.running, train.status.text()
    qtbot.waitUntil(lambda: not train.running, timeout=3_600_000)
    assert train.last_checkpoint, train.status.text()
    train.scroll.verticalScrollBar().setValue(train.scroll.verticalScrollBar().maximum())
    truth.visible = True
    qtbot.wait(300)
    qtbot.waitUntil(lambda: train.curves.up_to_date, timeout=60_000)  # drawn in a background thread
    _shot(viewer, qtbot, "screenshot_train.png")
    viewer.window.remove_dock_widget(train_dock)
    return train.last_checkpoint


def test_screenshots(make_napari_viewer, qtbot, tmp_path):
    from napari_medseg.widgets._library import ModelLibraryWidget
    from napari_medseg.widgets._segment import SegmentWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*SIZE)
    viewer.open_sample("napari-medseg", "colin27_deepgm")
    image = viewer.layers["Colin27 T1"]
    truth = viewer.layers["Colin27 deep GM labels"]
    viewer.dims.set_point(0, image.translate[0] + 30 * image.scale[0])

    # ---- Train: a small model on the sample, curves after a few epochs (MEDSEG_SCREENSHOT_EPOCHS=0
    # skips it and keeps the existing screenshot_train.png)
    epochs = int(os.environ.get("MEDSEG_SCREENSHOT_EPOCHS", 8))
    trained = _train(viewer, qtbot, image, truth, epochs, tmp_path) if epochs > 0 else None

    # ---- Segment: the trained (or given) checkpoint on the sample, overlay on top
    segment = SegmentWidget(viewer)
    _dock(viewer, segment, "Segment")
    checkpoint = os.environ.get("MEDSEG_SCREENSHOT_CHECKPOINT") or trained
    assert checkpoint, "set MEDSEG_SCREENSHOT_CHECKPOINT when MEDSEG_SCREENSHOT_EPOCHS=0"
    segment.checkpoints.add_path(checkpoint)
    segment.mirror.setChecked(False)
    segment.device.setCurrentText("cpu")
    segment.run_button.click()
    qtbot.waitUntil(lambda: not segment.running, timeout=600_000)
    assert segment.result_layer is not None, segment.status.text()
    truth.visible = False
    segment.result_layer.opacity = 0.6
    viewer.layers.selection.active = segment.result_layer
    _shot(viewer, qtbot, "screenshot_segment.png")
    viewer.window.remove_dock_widget("all")

    # ---- Model library
    library = ModelLibraryWidget(viewer)
    _dock(viewer, library, "Model library", width=760)
    qtbot.waitUntil(lambda: not library.counting, timeout=120_000)
    _shot(viewer, qtbot, "screenshot_library.png")
    viewer.window.remove_dock_widget("all")

    # ---- A whole head (MEDSEG_SCREENSHOT_HEAD, e.g. Colin27's ch2.nii.gz) with the shipped model
    head_path = os.environ.get("MEDSEG_SCREENSHOT_HEAD")
    if head_path:
        _head(viewer, qtbot, head_path)

    # ---- The viewer's loop on another brain (MEDSEG_SCREENSHOT_CORRECT="image.nii.gz,reference.nii.gz"):
    # Segment with the shipped model, correct five slices, fine-tune it (writes screenshot_train.png;
    # set MEDSEG_SCREENSHOT_EPOCHS=0 with it)
    correct = os.environ.get("MEDSEG_SCREENSHOT_CORRECT")
    if correct:
        _correct(viewer, qtbot, tmp_path, *correct.split(","))


def _correct(viewer, qtbot, tmp_path, image_path, reference_path):
    """Segment ``image_path`` with the shipped model, write the reference into five axial slices of
    the result (as brush corrections would; the tracker sees them as changed voxels), fine-tune the
    shipped model on the corrected slices in the Train widget, screenshot its curves."""
    import numpy as np

    from napari_medseg.io import read_volume
    from napari_medseg.widgets._partial import tracker_for
    from napari_medseg.widgets._segment import SegmentWidget
    from napari_medseg.widgets._train import TrainWidget

    viewer.layers.clear()
    (scan,) = viewer.open(image_path, plugin="napari-medseg")
    segment = SegmentWidget(viewer)
    _dock(viewer, segment, "Segment")
    qtbot.waitUntil(lambda: segment.checkpoints.loaded, timeout=120_000)
    shipped = segment.checkpoints.current_info().path
    segment.channels.set_layers([scan])
    segment.device.setCurrentText("cpu")
    segment.run_button.click()
    qtbot.waitUntil(lambda: not segment.running, timeout=600_000)
    result = segment.result_layer
    assert result is not None, segment.status.text()
    viewer.window.remove_dock_widget("all")
    tracker = tracker_for(result, viewer)
    reference = read_volume(reference_path).data
    rows = np.flatnonzero(reference.reshape(reference.shape[0], -1).max(1))
    picks = [int(round(v)) for v in np.linspace(rows[0], rows[-1], 7)[1:-1]]
    data = np.asarray(result.data)
    for z in picks:
        data[z] = reference[z]
    result.refresh()
    assert sorted(tracker.painted_slices().get(0, picks)) == picks

    train = TrainWidget(viewer)
    train_dock = _dock(viewer, train, "Train / Fine-tune")
    train.channels.set_layers([scan])
    train.labels.set_layer(result)
    # the Segment result as labels: Train sets up the loop by itself (fine-tune its checkpoint, painted slices)
    qtbot.waitUntil(lambda: train.checkpoints.current_path() == os.path.realpath(shipped), timeout=120_000)
    assert train.start_from.currentIndex() == 1 and train.partial_key() == "slices"
    train.minutes.setValue(float(os.environ.get("MEDSEG_SCREENSHOT_MINUTES", 2)))
    train.device.setCurrentText("cpu")
    train.output.setText(str(tmp_path / "correction"))
    train.resegment.setChecked(False)
    train.train_button.click()
    assert train.running, train.status.text()
    qtbot.waitUntil(lambda: not train.running, timeout=3_600_000)
    assert train.last_checkpoint, train.status.text()
    train.scroll.verticalScrollBar().setValue(train.scroll.verticalScrollBar().maximum())
    qtbot.waitUntil(lambda: train.curves.up_to_date, timeout=60_000)
    result.opacity = 0.6
    viewer.dims.set_point(0, float(scan.translate[0] + scan.scale[0] * picks[2]))
    _shot(viewer, qtbot, "screenshot_train.png")
    viewer.window.remove_dock_widget(train_dock)


def _head(viewer, qtbot, path):
    from napari_medseg.widgets._segment import SegmentWidget

    viewer.layers.clear()
    (head,) = viewer.open(path, plugin="napari-medseg")
    segment = SegmentWidget(viewer)
    _dock(viewer, segment, "Segment")
    qtbot.waitUntil(lambda: segment.checkpoints.loaded, timeout=120_000)
    segment.channels.set_layers([head])
    segment.device.setCurrentText("cpu")
    segment.run_button.click()
    qtbot.waitUntil(lambda: not segment.running, timeout=600_000)
    assert segment.result_layer is not None, segment.status.text()
    segment.result_layer.opacity = 0.7
    viewer.dims.set_point(0, float(head.translate[0] + head.scale[0] * head.data.shape[0] * 0.42))
    _shot(viewer, qtbot, "screenshot_head.png")
