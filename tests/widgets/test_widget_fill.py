"""Fill between slices widget: paint a few slices in a real viewer, press the button, get a layer."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.io import affine_from_spacing

pytestmark = pytest.mark.gui

SPACING = (2.0, 0.8, 0.8)
TRANSLATE = (-30.0, 4.0, 12.5)


def _disk(shape, center, radius) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a disk in a plane of ``shape``."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return np.nonzero((yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2)


def _paint_slice(layer, axis: int, index: int, center, radius, value=1) -> None:
    """Paint a disk on one slice through napari's own history-recording setter (as a brush does)."""
    plane = [n for a, n in enumerate(layer.data.shape) if a != axis]
    rows, cols = _disk(plane, center, radius)
    coords = [rows, cols]
    coords.insert(axis, np.full(rows.shape, index))
    layer.data_setitem(tuple(coords), value)


def _painted_layer(viewer, name="painted", shape=(30, 40, 44)):
    geometry = {"affine": affine_from_spacing(SPACING, TRANSLATE).tolist(), "spacing": list(SPACING),
                "spatial_shape": list(shape), "channel_axis": None}
    return viewer.add_labels(
        np.zeros(shape, np.uint8), name=name, scale=SPACING, translate=TRANSLATE,
        metadata={"medseg_geometry": geometry, "medseg_source": "/data/scan.nii.gz"},
    )


def _fill_widget(viewer):
    from napari_medseg.widgets._fill import FillBetweenSlicesWidget

    widget = FillBetweenSlicesWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fill between slices")
    return widget


def test_fill_adds_an_overlaying_interpolated_layer(make_napari_viewer, qtbot):
    from napari_medseg.widgets._fill import FILLED_KEY

    viewer = make_napari_viewer()
    layer = _painted_layer(viewer)
    for z, radius in ((5, 6), (15, 12), (25, 6)):
        _paint_slice(layer, 0, z, (20, 22), radius)
    painted = np.array(layer.data, copy=True)
    widget = _fill_widget(viewer)
    assert widget.labels.layer() is layer
    assert widget.axis.currentText().startswith("current view (axis 0")
    emitted = []
    widget.filled.connect(emitted.append)
    widget.fill_button.click()  # fills in a background thread; the layer comes after
    qtbot.waitUntil(lambda: len(emitted) == 1, timeout=20000)
    assert widget.fill_button.isEnabled()

    filled = viewer.layers["painted filled"]
    assert emitted == [filled] and "Filled 18 slice(s)" in widget.status.text(), widget.status.text()
    np.testing.assert_array_equal(layer.data, painted)  # the painting is left alone
    np.testing.assert_array_equal(filled.data[[5, 15, 25]], painted[[5, 15, 25]])
    assert not filled.data[:5].any() and not filled.data[26:].any()
    areas = [int(filled.data[z].sum()) for z in range(5, 26)]
    assert all(0 < a for a in areas)
    assert areas[0] < areas[5] < areas[10] and areas[10] > areas[15] > areas[20], areas  # grows, shrinks
    np.testing.assert_allclose(filled.scale, layer.scale)
    np.testing.assert_allclose(filled.translate, layer.translate)
    np.testing.assert_allclose(filled.affine.affine_matrix, layer.affine.affine_matrix)
    assert filled.metadata["medseg_geometry"] == layer.metadata["medseg_geometry"]
    assert filled.metadata["medseg_source"] == "/data/scan.nii.gz"
    assert filled.metadata[FILLED_KEY] == {"source": "painted", "axis": 0, "slices": [5, 15, 25]}

    # Paint one more slice and press again: the same layer is updated, no second layer.
    _paint_slice(layer, 0, 29, (20, 22), 3)
    widget.fill_button.click()
    qtbot.waitUntil(lambda: len(emitted) == 2, timeout=20000)
    assert [ly.name for ly in viewer.layers] == ["painted", "painted filled"]
    assert filled.data[27:].any() and filled.metadata[FILLED_KEY]["slices"] == [5, 15, 25, 29]


def test_the_button_fills_off_the_gui_thread(make_napari_viewer, qtbot, monkeypatch):
    """A click returns at once; finding the painted slices and interpolating run in another thread,
    and a refusal found there (one painted slice) reaches the status line."""
    import threading

    import napari_medseg.engine.annotation as annotation

    viewer = make_napari_viewer()
    layer = _painted_layer(viewer)
    widget = _fill_widget(viewer)
    threads, release = [], threading.Event()
    real = annotation.fill_between_slices

    def slow_fill(*args, **kwargs):
        threads.append(threading.current_thread())
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(annotation, "fill_between_slices", slow_fill)
    _paint_slice(layer, 0, 10, (20, 22), 6)
    widget.fill_button.click()
    qtbot.waitUntil(lambda: "at least two slices" in widget.status.text(), timeout=20000)
    assert widget.fill_button.isEnabled() and not threads

    _paint_slice(layer, 0, 20, (20, 22), 6)
    widget.fill_button.click()
    qtbot.waitUntil(lambda: bool(threads), timeout=20000)
    assert threads[0] is not threading.main_thread()
    assert not widget.fill_button.isEnabled() and "Filling" in widget.status.text()
    assert "painted filled" not in viewer.layers  # still filling: the GUI thread went on
    release.set()
    qtbot.waitUntil(lambda: "painted filled" in viewer.layers, timeout=20000)
    assert widget.fill_button.isEnabled() and "Filled 9 slice(s)" in widget.status.text()


def test_axis_follows_the_view_and_explicit_slices(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    layer = _painted_layer(viewer, "coronal")
    viewer.dims.order = (1, 0, 2)  # the slider now moves along y: the user paints coronal slices
    widget = _fill_widget(viewer)
    assert widget.axis.currentText().startswith("current view (axis 1, y)"), widget.axis.currentText()
    for y, radius in ((8, 5), (20, 9), (32, 5)):
        _paint_slice(layer, 1, y, (15, 22), radius, value=3)
    filled = widget.fill()
    assert filled is viewer.layers["coronal filled"]
    assert filled.metadata["medseg_filled_from"]["axis"] == 1
    assert all(filled.data[:, y].any() for y in range(8, 33)) and not filled.data[:, :8].any()
    assert set(np.unique(filled.data)) == {0, 3}

    # A slice left as background, listed explicitly, ends the object there.
    widget.slices.setText("8, 20, 26, 32")
    widget.fill()
    assert not filled.data[:, 26].any() and filled.data[:, 21].any()
    # Choosing axis 0 by hand: only slices holding labels along z count.
    widget.slices.setText("")
    widget.axis.setCurrentIndex(widget.axis.findData(0))
    assert widget.selected_axis() == 0


def test_refuses_without_two_painted_slices(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _fill_widget(viewer)
    assert widget.fill() is None and "Labels layer" in widget.status.text()
    layer = _painted_layer(viewer)
    _paint_slice(layer, 0, 10, (20, 22), 6)
    assert widget.fill() is None
    assert "at least two slices" in widget.status.text()
    widget.slices.setText("10,x")
    assert widget.fill() is None and "10,20,30" in widget.status.text()
    assert [ly.name for ly in viewer.layers] == ["painted"]


def test_opens_from_the_manifest(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Fill between slices")
    assert type(widget).__name__ == "FillBetweenSlicesWidget"
