"""Train / Fine-tune widget: real tiny trainings in a worker, curves, catalogue, partial labels."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from medseg_testing import select_checkpoint

pytestmark = pytest.mark.gui


def _train_widget(viewer):
    from napari_medseg.widgets._train import TrainWidget

    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    return widget


def _train_on_phantom(viewer, phantom):
    """A Train widget over ``viewer`` holding the phantom as ``scan`` and its labels as ``truth``."""
    image, labels = phantom
    viewer.add_image(image, name="scan")
    viewer.add_labels(labels, name="truth")
    return _train_widget(viewer)


def _fresh_painting(viewer, qtbot, phantom):
    """``(Train widget, an empty labels layer "painted" it tracks, the phantom's truth)`` over the phantom image."""
    from napari_medseg.widgets._partial import tracker_for

    image, truth = phantom
    viewer.add_image(image, name="scan")
    layer = viewer.add_labels(np.zeros_like(truth), name="painted")
    widget = _train_widget(viewer)
    qtbot.waitUntil(lambda: widget.architecture.loaded, timeout=20_000)
    widget.labels.set_layer(layer)
    tracker_for(layer, viewer)
    return widget, layer, truth


def _tiny_settings(widget, tmp_path, epochs=2, iterations=2):
    widget.minutes.setValue(0)  # epochs x iterations, not a time budget
    widget.resegment.setChecked(False)
    widget.epochs.setValue(epochs)
    widget.iterations.setValue(iterations)
    widget.batch.setValue(1)
    widget.patch.setText("16,16,16")
    widget.model_kwargs.setText('{"base_width": 4}')
    widget.device.setCurrentText("cpu")
    widget.output.setText(str(tmp_path / "run"))


def test_train_on_layers_emits_a_listed_checkpoint(make_napari_viewer, qtbot, phantom, tmp_path, monkeypatch):
    from napari_medseg.engine import checkpoints
    from napari_medseg.engine.checkpoints import list_checkpoints
    from napari_medseg.widgets._segment import SegmentWidget

    registered_in = []  # the new checkpoint is read and registered off the GUI thread
    register = checkpoints.register_checkpoint

    def recording_register(*args, **kwargs):
        registered_in.append(threading.current_thread() is threading.main_thread())
        return register(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "register_checkpoint", recording_register)
    viewer = make_napari_viewer()
    image, labels = phantom
    viewer.add_image(image, name="scan", scale=(2.0, 1.0, 1.0))
    viewer.add_labels(labels, name="truth", scale=(2.0, 1.0, 1.0))
    segment = SegmentWidget(viewer)  # already open: must list the new checkpoint by itself
    widget = _train_widget(viewer)
    assert widget.partial_key() == "all"
    assert widget.labels.layer().name == "truth"
    _tiny_settings(widget, tmp_path)
    widget.train_button.click()
    assert widget.running, widget.status.text()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.last_checkpoint and os.path.isfile(widget.last_checkpoint), widget.status.text()
    assert widget.last_checkpoint.endswith("checkpoint_final.pt")

    xs = widget.curves.loss_line.get_xdata()
    ys = widget.curves.loss_line.get_ydata()
    assert list(xs) == [1, 2] and np.all(np.isfinite(ys))
    assert widget.curves.dice_lines and all(len(line.get_ydata()) == 2 for line in widget.curves.dice_lines.values())

    real = os.path.realpath(widget.last_checkpoint)
    assert registered_in == [False]
    assert any(i.path == real for i in list_checkpoints())
    assert segment.checkpoints.combo.findData(real) >= 0
    assert widget.last_config.model_kwargs == {"base_width": 4}
    assert widget.last_config.patch_size == (16, 16, 16)


def test_stop_saves_and_resume_continues(make_napari_viewer, qtbot, phantom, tmp_path):
    from qtpy.QtCore import Qt

    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.engine.jobs import Progress

    widget = _train_on_phantom(make_napari_viewer(), phantom)
    _tiny_settings(widget, tmp_path, epochs=3, iterations=4)

    reached, released = threading.Event(), threading.Event()

    def hold_in_second_epoch(event):  # runs in the worker thread, before the engine goes on
        if isinstance(event, Progress) and event.stage == "train" and event.message.startswith("epoch 2/"):
            if not reached.is_set():
                reached.set()
                released.wait(30)

    widget.train_button.click()
    widget.worker.yielded.connect(hold_in_second_epoch, Qt.DirectConnection)
    qtbot.waitUntil(reached.is_set, timeout=120_000)
    widget.stop_button.click()  # while the engine waits in epoch 2
    released.set()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    latest = tmp_path / "run" / "checkpoint_latest.pt"
    assert latest.is_file(), widget.status.text()
    assert "Stopped" in widget.status.text()
    assert widget.resume_button.isEnabled()
    assert load_checkpoint(latest).epoch == 0

    widget.resume_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.last_checkpoint.endswith("checkpoint_final.pt"), widget.status.text()
    assert list(widget.curves.loss_line.get_xdata()) == [1, 2, 3]
    assert load_checkpoint(widget.last_checkpoint).epoch == 2


def test_a_checkpoint_that_could_not_be_listed_is_not_called_listed(make_napari_viewer, qtbot, phantom, tmp_path,
                                                                     monkeypatch):
    from napari_medseg.engine import checkpoints

    def failing_register(*args, **kwargs):
        raise ValueError("Out of range float values are not JSON compliant: nan")

    monkeypatch.setattr(checkpoints, "register_checkpoint", failing_register)
    widget = _train_on_phantom(make_napari_viewer(), phantom)
    _tiny_settings(widget, tmp_path, epochs=1, iterations=1)
    widget.train_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert os.path.isfile(widget.last_checkpoint)
    text = widget.status.text()
    assert "not in the catalogue" in text and "listed in the Segment widget" not in text, text


def test_a_segment_result_as_labels_sets_up_the_correction_loop(make_napari_viewer, qtbot, phantom, tiny_checkpoint):
    """Choosing a Segment result (its metadata names its checkpoint) selects fine-tuning that
    checkpoint on the painted slices, once; a painted layer keeps the defaults."""
    widget = _train_on_phantom(make_napari_viewer(), phantom)
    viewer = widget.viewer
    parent = tiny_checkpoint("parent")
    widget.labels.set_layer(viewer.layers["truth"])
    assert widget.start_from.currentIndex() == 0 and widget.partial_key() == "all"
    result = viewer.add_labels(np.zeros_like(phantom[1]), name="scan segmentation", metadata={
        "medseg_checkpoint": parent, "medseg_label_names": {"0": "background", "1": "organ_1"}})
    widget.labels.set_layer(result)
    qtbot.waitUntil(lambda: widget.checkpoints.current_path() == os.path.realpath(parent), timeout=20_000)
    assert widget.start_from.currentIndex() == 1 and widget.partial_key() == "slices"
    assert "is a Segment result" in widget.log.toPlainText()
    # the user's choices stand: back to this layer, nothing is set again
    widget.partial_mode.setCurrentIndex(widget.partial_mode.findData("voxels"))
    widget.start_from.setCurrentIndex(0)
    widget.labels.set_layer(viewer.layers["truth"])
    widget.labels.set_layer(result)
    assert widget.start_from.currentIndex() == 0 and widget.partial_key() == "voxels"


def test_partial_labels_only_painted_voxels_count(make_napari_viewer, qtbot, phantom, tiny_checkpoint, tmp_path):
    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.widgets._partial import tracker_for

    viewer = make_napari_viewer()
    image, truth = phantom
    viewer.add_image(image, name="scan")
    predicted = viewer.add_labels(np.zeros_like(truth), name="scan segmentation")  # "the model found nothing"
    init = tiny_checkpoint("start")
    widget = _train_widget(viewer)
    widget.labels.set_layer(predicted)
    tracker = tracker_for(predicted, viewer)

    # The user corrects slice 8: paints label 1 with a big brush in the 2D view.
    z = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(1)))
    viewer.dims.set_point(0, z)
    predicted.brush_size = 9
    predicted.paint((z, 16, 16), 1)
    painted = np.argwhere(predicted.data == 1)
    assert len(painted) > 10 and set(painted[:, 0]) == {z}
    assert tracker.painted_slices() == {0: [z]}

    widget.start_from.setCurrentIndex(1)
    select_checkpoint(widget.checkpoints, init, refresh=False)
    assert not widget.architecture.isEnabled()  # the checkpoint defines the architecture
    widget.partial_mode.setCurrentIndex(widget.partial_mode.findData("voxels"))
    qtbot.waitUntil(lambda: "painted voxels" in widget.partial_summary.text(), timeout=2000)
    assert f"{len(painted):,} painted voxels on 1 slice" in widget.partial_summary.text()
    _tiny_settings(widget, tmp_path, epochs=1, iterations=3)
    widget.model_kwargs.setText("")
    widget.train_button.click()
    assert widget.running, widget.status.text()

    sent = widget.last_training_labels
    ignore = 2  # num_classes of the checkpoint
    assert widget.last_config.ignore_label == ignore
    assert widget.last_config.init_checkpoint == os.path.realpath(init)
    counted = sent != ignore
    np.testing.assert_array_equal(counted, predicted.data == 1)
    assert np.all(sent[counted] == 1)

    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.last_checkpoint and widget.last_checkpoint.endswith("checkpoint_final.pt"), widget.status.text()
    before, after = load_checkpoint(init).state_dict, load_checkpoint(widget.last_checkpoint).state_dict
    assert before.keys() == after.keys()  # the checkpoint's architecture, rebuilt exactly
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())

    # "painted slices": the whole corrected slice counts, nothing else.
    labels, counted = tracker.training_labels("slices", ignore)
    assert counted[z].all() and not counted[np.arange(truth.shape[0]) != z].any()
    assert set(np.unique(labels[z])) == {0, 1}


def test_a_new_model_from_painted_slices(make_napari_viewer, qtbot, phantom, tmp_path):
    """From scratch on a few painted slices (no checkpoint): the measured 2D recipe is set once,
    the classes are what was painted, everything off the painted slices is ignored, and it trains."""
    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.widgets._layers import InputError
    from napari_medseg.widgets._partial import tracker_for
    from napari_medseg.widgets._train import SLICES_FROM_SCRATCH, painted_classes

    widget, layer, truth = _fresh_painting(make_napari_viewer(), qtbot, phantom)
    assert widget.architecture.model_name() == "unet-3d-fullres"
    widget.partial_mode.setCurrentIndex(widget.partial_mode.findData("slices"))
    assert widget.architecture.model_name() == SLICES_FROM_SCRATCH["model"] == "unet-2d"
    assert widget.batch.value() == 4 and '"max_width": 128' in widget.model_kwargs.text()
    assert "A new model from painted slices" in widget.log.toPlainText()

    widget.device.setCurrentText("cpu")
    widget.output.setText(str(tmp_path / "run"))
    widget.minutes.setValue(0)
    widget.epochs.setValue(1)
    widget.iterations.setValue(2)
    widget.resegment.setChecked(False)
    widget.train_button.click()  # nothing painted yet
    assert not widget.running and "No painted voxels" in widget.status.text()
    with pytest.raises(InputError, match="Only background is painted"):
        painted_classes(np.zeros(10, np.int16))
    assert painted_classes(np.array([0, 3])) == {0: "background", 1: "label_1", 2: "label_2", 3: "label_3"}

    zs = [int(z) for z in np.nonzero(truth.reshape(truth.shape[0], -1).any(1))[0][[0, -1]]]
    zs.insert(1, sum(zs) // 2)
    for z in zs:  # the user paints three axial slices through the object
        yy, xx = np.nonzero(truth[z] >= 0)
        layer.data_setitem((np.full(yy.shape, z), yy, xx), truth[z][yy, xx])
    assert tracker_for(layer).painted_slices() == {0: zs}
    widget.train_button.click()
    assert widget.running, widget.status.text()
    config = widget.last_config
    assert config.model == "unet-2d" and config.configuration == "2d" and config.init_checkpoint is None
    assert config.label_names == {0: "background", 1: "label_1"} and config.ignore_label == 2
    labels = widget.last_training_labels
    assert set(np.unique(labels[zs])) == {0, 1} and (np.delete(labels, zs, axis=0) == 2).all()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.last_checkpoint, widget.status.text()
    assert load_checkpoint(widget.last_checkpoint).model_name == "unet-2d"


def test_slices_across_another_axis_are_flagged_for_a_2d_model(make_napari_viewer, qtbot, phantom):
    from napari_medseg.widgets._partial import tracker_for

    widget, layer, truth = _fresh_painting(make_napari_viewer(), qtbot, phantom)
    viewer = widget.viewer
    viewer.dims.order = (2, 0, 1)  # the user looks at sagittal slices: axis 2 is the hidden one
    x = truth.shape[2] // 2
    zz, yy = np.nonzero(truth[:, :, x] >= 0)
    layer.data_setitem((zz, yy, np.full(zz.shape, x)), truth[zz, yy, x])
    assert tracker_for(layer).painted_slices() == {2: [x]}
    widget.partial_mode.setCurrentIndex(widget.partial_mode.findData("slices"))
    config = widget.build_config()
    assert config.configuration == "2d"
    widget.build_data(config)
    assert "Your painted slices cut axis 2" in widget.log.toPlainText()


def test_the_users_architecture_stands_over_the_slices_recipe(make_napari_viewer, qtbot, phantom):
    viewer = make_napari_viewer()
    viewer.add_image(phantom[0], name="scan")
    widget = _train_widget(viewer)
    qtbot.waitUntil(lambda: widget.architecture.loaded, timeout=20_000)
    widget.architecture.set_model("unet-3d-lowres")
    widget.architecture.activated.emit(widget.architecture.currentIndex())  # as a user's pick signals
    widget.partial_mode.setCurrentIndex(widget.partial_mode.findData("slices"))
    assert widget.architecture.model_name() == "unet-3d-lowres" and widget.batch.value() == 0
    assert "A new model from painted slices" not in widget.log.toPlainText()


def test_tracker_sees_history_edits_and_direct_writes():
    from napari.layers import Labels

    from napari_medseg.widgets._partial import EditTracker, mask_labels

    layer = Labels(np.zeros((6, 10, 10), np.uint8))
    tracker = EditTracker(layer)
    layer.data_setitem((np.array([2, 2]), np.array([3, 4]), np.array([5, 5])), 1)  # a history atom
    layer.data[4, 0, 0] = 1  # a script writing directly: no event, found by the snapshot diff
    painted = tracker.painted_voxels()
    assert painted.sum() == 3 and painted[2, 3, 5] and painted[4, 0, 0]
    assert tracker.painted_slices() == {0: [2, 4]}
    counted = tracker.counted("slices")
    assert counted[2].all() and counted[4].all() and counted.sum() == 200
    out = mask_labels(layer.data, tracker.counted("voxels"), 9)
    assert out.dtype == np.int16 and (out == 9).sum() == 600 - 3
    tracker.reset()
    assert not tracker.painted_voxels().any() and tracker.painted_slices() == {}


def test_synthetic_augmentation_trains_from_layers(make_napari_viewer, qtbot, phantom, tmp_path):
    """The Augmentation choice reaches the engine: a real tiny run with domain randomisation."""
    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.widgets._train import AUGMENTATIONS

    widget = _train_on_phantom(make_napari_viewer(), phantom)
    _tiny_settings(widget, tmp_path, epochs=1, iterations=2)
    widget.augment.setCurrentIndex([v for _, v in AUGMENTATIONS].index("synth"))
    assert widget.build_config().augment == "synth"
    widget.train_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.last_checkpoint, widget.status.text()
    assert load_checkpoint(widget.last_checkpoint).train_config["augment"] == "synth"


def test_paint_finetune_for_a_budget_then_segment_again(make_napari_viewer, qtbot, phantom, tiny_checkpoint, tmp_path):
    """The loop a user closes in the viewer: paint slices -> fine-tune for minutes -> segment again."""
    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.widgets._partial import tracker_for
    from napari_medseg.widgets._segment import SegmentWidget

    viewer = make_napari_viewer()
    image, truth = phantom
    viewer.add_image(image, name="scan")
    layer = viewer.add_labels(np.zeros_like(truth), name="scan segmentation")
    init = tiny_checkpoint("parent")
    widget = _train_widget(viewer)
    widget.labels.set_layer(layer)
    tracker_for(layer, viewer)
    for z in (5, 7, 8, 9, 11):  # the user paints five axial slices through the object
        viewer.dims.set_point(0, z)
        yy, xx = np.nonzero(truth[z] >= 0)
        layer.data_setitem((np.full(yy.shape, z), yy, xx), truth[z][yy, xx])
    widget.start_from.setCurrentIndex(1)
    select_checkpoint(widget.checkpoints, init, refresh=False)
    widget.partial_mode.setCurrentIndex(widget.partial_mode.findData("slices"))
    widget.device.setCurrentText("cpu")
    widget.output.setText(str(tmp_path / "run"))
    widget.minutes.setValue(0.1)  # a 6 s budget
    assert not widget.epochs.isEnabled()
    assert widget.resegment.isChecked()
    widget.train_button.click()
    assert widget.running, widget.status.text()
    assert widget.last_config.minutes == pytest.approx(0.1)
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.last_checkpoint, widget.status.text()
    ckpt = load_checkpoint(widget.last_checkpoint)
    assert ckpt.train_config["minutes"] == pytest.approx(0.1)
    log = widget.log.toPlainText()
    assert "held-out painted slice" in log  # five painted slices: one is kept for validation
    assert "Dice (held-out slices)" in log

    qtbot.waitUntil(lambda: widget.last_resegmented is not None, timeout=120_000)
    segment = widget.segment_widget()
    assert isinstance(segment, SegmentWidget)
    assert segment.checkpoints.current_path() == os.path.realpath(widget.last_checkpoint)
    new = widget.last_resegmented
    assert new in viewer.layers and new.data.shape == truth.shape
    assert "Voxels per class" in widget.log.toPlainText()
