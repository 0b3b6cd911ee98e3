"""What keeps napari's event loop fluid (structure, not timings: those are in
``benchmarks/bench_widgets.py``): array work and layer building happen in worker threads, the GUI
thread adds ready-made layers one per event-loop turn, and the curves, counts and checkpoint
registration of the Train widget run in background threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from medseg_testing import select_checkpoint

from napari_medseg.io import affine_from_spacing

pytestmark = pytest.mark.gui


def _is_gui_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _scan(viewer, image):
    geometry = {"affine": affine_from_spacing((2.0, 1.0, 1.0), (0.0, 0.0, 0.0)).tolist(), "spacing": [2.0, 1.0, 1.0],
                "spatial_shape": list(image.shape), "channel_axis": None}
    return viewer.add_image(image, name="scan", scale=(2.0, 1.0, 1.0), metadata={"medseg_geometry": geometry})


def test_segment_result_is_built_in_the_worker_and_added_one_layer_per_turn(
    make_napari_viewer, qtbot, phantom, tiny_checkpoint, monkeypatch
):
    from qtpy.QtCore import QTimer

    from napari_medseg.widgets import _segment
    from napari_medseg.widgets._partial import tracker_for
    from napari_medseg.widgets._segment import PreparedResult, SegmentWidget

    viewer = make_napari_viewer()
    _scan(viewer, phantom[0])
    path = tiny_checkpoint("tiny", spacing=(2.0, 1.0, 1.0))
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    select_checkpoint(widget.checkpoints, path)
    widget.mirror.setChecked(False)
    widget.device.setCurrentText("cpu")
    widget.probabilities.setChecked(True)
    widget.uncertainty.setChecked(True)

    prepared_in: list[bool] = []
    prepared: list[PreparedResult] = []
    original = _segment.prepare_result

    def recording_prepare(result, plan):
        prepared_in.append(_is_gui_thread())
        out = original(result, plan)
        prepared.append(out)
        return out

    monkeypatch.setattr(_segment, "prepare_result", recording_prepare)

    # Each insertion posts a zero timer: it has fired by the next insertion only if the event loop
    # ran in between (the layers are not added in one go).
    turns = {"marks": 0}
    marks_at_insert: list[int] = []

    def on_insert(_event):
        marks_at_insert.append(turns["marks"])
        QTimer.singleShot(0, lambda: turns.__setitem__("marks", turns["marks"] + 1))

    viewer.layers.events.inserted.connect(on_insert)
    results: list = []
    widget.segmented.connect(results.append)
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert "Done" in widget.status.text(), widget.status.text()

    assert prepared_in == [False]  # layers, counts, legend and baseline: made in the worker thread
    ready = prepared[0]
    labels = ready.labels
    # the GUI thread added the very objects the worker built, in order, labels last
    assert [lay for lay in viewer.layers][1:] == ready.layers and ready.layers[-1] is labels
    assert [lay.name for lay in ready.layers] == ["scan p(organ_1)", "scan uncertainty", "scan segmentation"]
    assert results == [labels] and widget.result_layer is labels
    assert labels.data is ready.result.labels and labels.data.dtype == np.uint8  # no copy, no cast
    assert tracker_for(labels).snapshot is ready.baseline  # the worker's copy is the edit baseline
    assert ready.baseline is not labels.data
    np.testing.assert_array_equal(ready.counts, np.bincount(labels.data.ravel(), minlength=2))
    assert widget.last_counts is ready.counts
    assert list(labels.features["name"]) == ["background", "organ_1"]
    assert "organ_1" in widget.legend.text() and "scan segmentation" in widget.legend.text()
    assert len(marks_at_insert) == 3
    assert all(marks_at_insert[i] >= i for i in range(3)), marks_at_insert  # one layer per turn
    assert widget.progress_bar.format().startswith("done"), widget.progress_bar.format()


def test_layer_combo_signals_only_when_its_choice_changes(make_napari_viewer):
    from napari.layers import Labels

    from napari_medseg.widgets._layers import LayerCombo

    viewer = make_napari_viewer()
    first = viewer.add_labels(np.zeros((4, 8, 8), np.uint8), name="first")
    combo = LayerCombo(viewer, Labels)
    seen: list[int] = []
    combo.currentIndexChanged.connect(seen.append)
    viewer.add_image(np.zeros((4, 8, 8), np.float32), name="other")  # unrelated: the listeners rest
    viewer.add_labels(np.zeros((4, 8, 8), np.uint8), name="second")  # listed, but "first" stays chosen
    assert combo.layer() is first and seen == []
    first.name = "renamed"  # shown differently: listeners hear of it
    assert len(seen) == 1 and combo.currentText() == "renamed"
    viewer.layers.remove(first)  # the choice moves to the remaining layer
    assert combo.layer().name == "second" and len(seen) == 2


def test_training_curves_are_drawn_off_the_gui_thread(qtbot, monkeypatch):
    from napari_medseg.engine.jobs import EpochEnd
    from napari_medseg.widgets import _plots

    drawn_in: list[bool] = []
    original = _plots._Figure.render

    def recording_render(self, *args):
        drawn_in.append(_is_gui_thread())
        return original(self, *args)

    monkeypatch.setattr(_plots._Figure, "render", recording_render)
    curves = _plots.TrainingCurves()
    qtbot.addWidget(curves)
    curves.resize(360, 300)
    curves.show()
    for epoch in range(3):
        curves.add_epoch(EpochEnd(epoch, 3, 1.0 / (epoch + 1), 0.9 / (epoch + 1), {"organ": 0.2 * epoch}))
    qtbot.waitUntil(lambda: curves.up_to_date, timeout=30_000)
    assert drawn_in and not any(drawn_in)
    assert list(curves.loss_line.get_xdata()) == [1, 2, 3]
    assert list(curves.dice_lines["organ"].get_ydata()) == pytest.approx([0.0, 0.2, 0.4])
    image = curves._image
    assert image is not None and not image.isNull()
    ratio = image.devicePixelRatio()
    assert (round(image.width() / ratio), round(image.height() / ratio)) == (curves.width(), curves.height())
    # the image is not one flat colour: the curves were drawn on it
    pixels = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert len(pixels) > 3
    curves.clear()
    qtbot.waitUntil(lambda: curves.up_to_date, timeout=30_000)
    assert list(curves.loss_line.get_xdata()) == [] and curves.dice_lines == {}


def test_partial_label_summary_is_counted_off_the_gui_thread(make_napari_viewer, qtbot, phantom, monkeypatch):
    from napari_medseg.widgets._partial import EditTracker
    from napari_medseg.widgets._train import TrainWidget

    counted_in: list[bool] = []
    original = EditTracker.summary

    def recording_summary(self, mode):
        counted_in.append(_is_gui_thread())
        return original(self, mode)

    monkeypatch.setattr(EditTracker, "summary", recording_summary)
    viewer = make_napari_viewer()
    viewer.add_image(phantom[0], name="scan")
    layer = viewer.add_labels(np.zeros_like(phantom[1]), name="edits")
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    widget.labels.set_layer(layer)
    layer.data_setitem((np.array([3, 3]), np.array([4, 5]), np.array([6, 6])), 1)
    widget.partial_mode.setCurrentIndex(widget.partial_mode.findData("voxels"))
    qtbot.waitUntil(lambda: "2 painted voxels" in widget.partial_summary.text(), timeout=10_000)
    assert counted_in and not any(counted_in)
