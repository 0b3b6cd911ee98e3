"""Segment widget: an image far outside the model's training domain asks before segmenting, and the
engine gets the image layer's geometry (orientation) as an affine."""

from __future__ import annotations

import numpy as np
import pytest
from medseg_testing import select_checkpoint

from napari_medseg.io import affine_from_spacing

pytestmark = pytest.mark.gui

SHAPE = (16, 24, 20)


def _radius(shape=SHAPE) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.sqrt(z**2 + y**2 + x**2)


def _mri() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.abs(rng.normal(0, 4, SHAPE))
    image[_radius() < 0.8] = 120
    return image.astype(np.float32)


def _ct() -> np.ndarray:
    image = np.full(SHAPE, -1000.0, np.float32)
    image[_radius() < 0.85] = 1200
    image[_radius() < 0.75] = 30
    return image


@pytest.fixture
def mri_checkpoint(tiny_checkpoint):
    from napari_medseg.engine.checkpoints import with_domain, write_checkpoint
    from napari_medseg.engine.inference.domain import case_domain_stats, summarise_domain

    path = tiny_checkpoint("mri", patch=(16, 16, 16))
    stats = case_domain_stats(_mri()[None], (_radius() < 0.4).astype(np.int16), (1.0, 1.0, 1.0))
    write_checkpoint(with_domain(path, summarise_domain([stats], "T1")), path)
    return path


def _widget(viewer, path):
    from napari_medseg.widgets._segment import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    select_checkpoint(widget.checkpoints, path)
    widget.mirror.setChecked(False)
    widget.device.setCurrentText("cpu")
    return widget


def _add(viewer, image, spacing=(1.0, 1.0, 1.0)):
    geometry = {"affine": affine_from_spacing(spacing).tolist(), "spacing": list(spacing),
                "spatial_shape": list(image.shape), "channel_axis": None}
    return viewer.add_image(image, name="scan", scale=spacing, metadata={"medseg_geometry": geometry})


def test_out_of_domain_image_asks_and_yes_segments(make_napari_viewer, qtbot, mri_checkpoint, monkeypatch):
    viewer = make_napari_viewer()
    _add(viewer, _ct())
    widget = _widget(viewer, mri_checkpoint)
    asked = []
    monkeypatch.setattr(widget, "ask_force", lambda message: asked.append(message) or True)
    widget.run_button.click()
    qtbot.waitUntil(lambda: "scan segmentation" in viewer.layers, timeout=60_000)
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert len(asked) == 1 and "\n" not in asked[0] and "strongly negative" in asked[0]
    assert viewer.layers["scan segmentation"].data.shape == SHAPE
    assert "Done" in widget.status.text(), widget.status.text()


def test_out_of_domain_image_no_adds_nothing(make_napari_viewer, qtbot, mri_checkpoint, monkeypatch):
    viewer = make_napari_viewer()
    _add(viewer, _ct())
    widget = _widget(viewer, mri_checkpoint)
    asked = []
    monkeypatch.setattr(widget, "ask_force", lambda message: asked.append(message) or False)
    widget.run_button.click()
    qtbot.waitUntil(lambda: bool(asked), timeout=60_000)
    qtbot.waitUntil(lambda: not widget.running, timeout=10_000)
    assert [layer.name for layer in viewer.layers] == ["scan"]
    assert "Not segmented" in widget.status.text() and widget.run_button.isEnabled()


def test_in_domain_image_does_not_ask(make_napari_viewer, qtbot, mri_checkpoint, monkeypatch):
    viewer = make_napari_viewer()
    _add(viewer, _mri() * 10)  # another intensity scale: still MRI
    widget = _widget(viewer, mri_checkpoint)
    monkeypatch.setattr(widget, "ask_force", lambda message: pytest.fail(f"asked: {message}"))
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert "scan segmentation" in viewer.layers, widget.status.text()


def test_image_affine_follows_the_layer_geometry(make_napari_viewer):
    from napari_medseg.engine.preprocessing import orientation_codes
    from napari_medseg.io import layer_transform
    from napari_medseg.widgets._layers import resolve_image_input
    from napari_medseg.widgets._segment import image_affine

    viewer = make_napari_viewer()
    lps = np.diag([-0.8, -0.9, 2.0, 1.0])
    lps[:3, 3] = [10.0, 20.0, -5.0]
    layer = viewer.add_image(_mri(), name="lps", metadata={"medseg_geometry": {"affine": lps.tolist()}},
                             **layer_transform(lps, (2.0, 0.9, 0.8)))
    affine = image_affine(resolve_image_input([layer]))
    np.testing.assert_allclose(affine, lps, atol=1e-9)
    assert orientation_codes(affine) == "SPL"
    plain = viewer.add_image(_mri(), name="plain")  # not read by this plugin: world unknown
    assert image_affine(resolve_image_input([plain])) is None
