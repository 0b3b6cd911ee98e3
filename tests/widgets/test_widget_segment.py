"""Segment widget: a real viewer, a tiny real model predicting in a worker thread."""

from __future__ import annotations

import os

import numpy as np
import pytest
from medseg_testing import select_checkpoint

from napari_medseg.io import affine_from_spacing, read_nifti

pytestmark = pytest.mark.gui


def _segment_widget(viewer, qtbot):
    from napari_medseg.widgets._segment import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    return widget


def _select(widget, path):
    select_checkpoint(widget.checkpoints, path)


def _add_image(viewer, image, spacing=(2.0, 1.0, 1.0), translate=(5.0, -3.0, 7.0)):
    geometry = {"affine": affine_from_spacing(spacing, translate).tolist(), "spacing": list(spacing),
                "spatial_shape": list(image.shape[-3:]), "channel_axis": None}
    return viewer.add_image(image, name="scan", scale=spacing, translate=translate,
                            metadata={"medseg_geometry": geometry, "medseg_source": "/data/scan.nii.gz"})


def test_segment_adds_labels_on_the_image_grid(make_napari_viewer, qtbot, phantom, tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()
    image = _add_image(viewer, phantom[0])
    path = tiny_checkpoint("tiny", spacing=(2.0, 1.0, 1.0))
    widget = _segment_widget(viewer, qtbot)
    _select(widget, path)
    assert widget.architecture.model_name() == "unet-3d-fullres"  # follows the checkpoint
    assert "organ_1" in widget.model_info.text()
    widget.mirror.setChecked(False)
    widget.uncertainty.setChecked(True)
    widget.probabilities.setChecked(True)
    widget.device.setCurrentText("cpu")
    widget.run_button.click()
    assert widget.running
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert "Done" in widget.status.text(), widget.status.text()

    layer = viewer.layers["scan segmentation"]
    assert layer.data.shape == image.data.shape
    np.testing.assert_allclose(layer.scale, image.scale)
    np.testing.assert_allclose(layer.translate, image.translate)
    assert layer.metadata["medseg_geometry"]["affine"] == image.metadata["medseg_geometry"]["affine"]
    assert layer.metadata["medseg_source"] == "/data/scan.nii.gz"
    assert layer.metadata["medseg_label_names"] == {"0": "background", "1": "organ_1"}
    assert os.path.realpath(layer.metadata["medseg_checkpoint"]) == os.path.realpath(path)  # Train's loop reads it
    assert "organ_1" in widget.legend.text()
    assert "scan uncertainty" in viewer.layers and "scan p(organ_1)" in viewer.layers
    np.testing.assert_allclose(viewer.layers["scan uncertainty"].translate, image.translate)
    assert widget.progress_bar.value() == widget.progress_bar.maximum() > 0
    assert widget.progress_bar.format().startswith("done"), widget.progress_bar.format()

    written = widget.save_labels(str(tmp_path / "seg.nii.gz"))
    vol = read_nifti(written[0])
    assert vol.data.shape == layer.data.shape
    np.testing.assert_allclose(vol.spacing, (2.0, 1.0, 1.0))
    np.testing.assert_allclose(vol.translate, image.translate)
    np.testing.assert_array_equal(vol.data, layer.data)


def test_cancel_stops_a_long_run(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    viewer.add_image(rng.normal(size=(48, 96, 96)).astype(np.float32), name="big")
    path = tiny_checkpoint("tiny", patch=(8, 8, 8))
    widget = _segment_widget(viewer, qtbot)
    _select(widget, path)
    widget.mirror.setChecked(True)  # 8 passes per tile: thousands of tiles
    widget.device.setCurrentText("cpu")
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 2, timeout=60_000)
    total = widget.progress_bar.maximum()
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=15_000)
    assert widget.progress_bar.value() < total
    assert "Cancelled" in widget.status.text()
    assert [lay.name for lay in viewer.layers] == ["big"]
    assert widget.run_button.isEnabled()


def test_mismatched_checkpoint_shows_an_error(make_napari_viewer, qtbot, phantom, tiny_checkpoint):
    viewer = make_napari_viewer()
    _add_image(viewer, phantom[0])
    path = tiny_checkpoint("two_channels", in_channels=2)
    widget = _segment_widget(viewer, qtbot)
    _select(widget, path)
    widget.run_button.click()
    assert not widget.running
    text = widget.status.text()
    assert "2 input channel" in text and "1" in text, text
    assert "ff6b6b" in widget.status.styleSheet()
    assert [lay.name for lay in viewer.layers] == ["scan"]


def test_the_largest_component_box_follows_the_checkpoint(make_napari_viewer, qtbot, tiny_checkpoint):
    """A checkpoint that recommends the largest-component step (the shipped brain model) checks
    the box when chosen; one that does not unchecks it; the user's click still decides the run."""
    viewer = make_napari_viewer()
    plain = tiny_checkpoint("plain")
    cleaned = tiny_checkpoint("cleaned", extra={"largest_component": True})
    widget = _segment_widget(viewer, qtbot)
    _select(widget, cleaned)
    assert widget.largest.isChecked()
    _select(widget, plain)
    assert not widget.largest.isChecked()
    _select(widget, cleaned)
    widget.largest.setChecked(False)  # the user's choice for this run
    assert widget.checkpoints.current_path() == os.path.realpath(cleaned) and not widget.largest.isChecked()


def test_device_combo_greys_out_missing_devices(make_napari_viewer):
    from napari_medseg.engine.runtime import available_devices
    from napari_medseg.widgets._common import DeviceCombo

    combo = DeviceCombo()
    names = [combo.itemText(i) for i in range(combo.count())]
    assert names[0] == "auto" and "cpu" in names and "mps" in names
    for name in names[1:]:
        assert combo.is_enabled(name) == (name in available_devices())


def test_progress_text_names_tiles_passes_and_eta():
    """The bar counts tile passes and says so (tiles x mirror passes), with an ETA; no fake total."""
    import time

    from napari_medseg.engine.jobs import Progress
    from napari_medseg.widgets._segment import tiles_text

    event = Progress("tiles", 10, 756, "378 tiles x 2 mirror passes")
    assert tiles_text(event, None) == "%v / %m tile passes (378 tiles x 2 mirror passes)"
    text = tiles_text(event, time.perf_counter() - 9.0)  # 9 s for tiles 2..10: 1 s a pass
    assert text.endswith("about 12:26 left")
