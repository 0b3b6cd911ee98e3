"""`napari-medseg view --sample` and the Plugins menu: the sample opens in the radiological view and
every widget docks as a tab, usable in a 1600x1000 window."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("fresh_napari_settings")]

PLUGIN = "napari-medseg"
DOCS = Path(__file__).resolve().parents[2] / "docs"
SIZE = (1600, 1000)
MIN_DOCK_HEIGHT = 400


def _widget_names() -> list[str]:
    from npe2 import PluginManager

    return [w.display_name for w in PluginManager.instance().get_manifest(PLUGIN).contributions.widgets]


def _tab_group(window, dock) -> set:
    return {dock, *window.tabifiedDockWidgets(dock)}


def test_view_opens_sample_and_docks_widgets(qtbot):
    from napari_medseg._launcher import launch_viewer
    from napari_medseg.widgets._common import medseg_docks

    viewer = launch_viewer([], sample=True, run=False)
    try:
        names = [layer.name for layer in viewer.layers]
        assert any("Colin27 T1" in n for n in names)
        docked = set(viewer.window.dock_widgets)
        for title in ("Segment", "Train / Fine-tune", "Model library", "Display: orientation and window"):
            assert any(title in d for d in docked), docked
        window = viewer.window._qt_window
        docks = medseg_docks(window)
        assert len(docks) == len(_widget_names())
        assert _tab_group(window, docks[0]) == set(docks)  # one tab group, not a stack
        assert viewer.scene.camera.orientation2d == ("up", "left")  # anterior up, radiological
    finally:
        viewer.close()


def test_cli_view_parses():
    from napari_medseg.cli import build_parser

    args = build_parser().parse_args(["view", "--sample", "a.nii.gz"])
    assert args.sample and args.files == ["a.nii.gz"]


def _assert_fits_its_dock(widgets: dict, qtbot) -> None:
    """No widget is cut off on the right: each is at least as wide as it needs, and the Train form
    (in a vertical scroll area) fits its viewport with every button in view (no sideways scrolling)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QAbstractButton

    for name, widget in widgets.items():
        widget.parentWidget().raise_()
        qtbot.waitUntil(widget.isVisible, timeout=5_000)
        assert widget.minimumSizeHint().width() <= widget.width(), (name, widget.minimumSizeHint(), widget.size())
    train = widgets["Train / Fine-tune"]
    train.parentWidget().raise_()
    qtbot.waitUntil(train.isVisible, timeout=5_000)
    viewport = train.scroll.viewport()
    inner = train.scroll.widget()
    assert train.scroll.horizontalScrollBarPolicy() == Qt.ScrollBarAlwaysOff
    assert inner.minimumSizeHint().width() <= viewport.width(), (inner.minimumSizeHint(), viewport.size())
    assert inner.width() <= viewport.width()
    for button in inner.findChildren(QAbstractButton):
        if button.isVisibleTo(inner):
            right = button.mapTo(viewport, button.rect().topRight()).x()
            assert right < viewport.width(), (button.text(), right, viewport.width())


def _close_notifications(window) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in window.findChildren(NapariQtNotification):
        toast.close()


def test_plugins_menu_docks_fit_1600x1000(make_napari_viewer, qtbot):
    """Each widget opened as the Plugins menu opens it (``add_dock_widget`` without tabs) joins the
    others as a tab: the window keeps its 1600x1000 and every widget gets the full dock height."""
    from napari_medseg.widgets._common import medseg_docks

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*SIZE)
    viewer.open_sample(PLUGIN, "colin27_deepgm")
    widgets = {}
    for name in _widget_names():
        _dock, widgets[name] = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        qtbot.wait(50)
    library = widgets["Model library"]
    qtbot.waitUntil(lambda: not library.counting, timeout=120_000)
    qtbot.wait(200)
    assert window.height() <= SIZE[1], window.size()
    docks = medseg_docks(window)
    assert len(docks) == len(widgets)
    assert _tab_group(window, docks[0]) == set(docks)
    heights = {}
    for name, widget in widgets.items():
        widget.parentWidget().raise_()
        qtbot.waitUntil(widget.isVisible, timeout=5_000)
        heights[name] = widget.height()
    assert min(heights.values()) >= MIN_DOCK_HEIGHT, heights
    assert window.height() <= SIZE[1], window.size()
    train = widgets["Train / Fine-tune"]
    assert train.curves.isVisible() or train.scroll.verticalScrollBar().maximum() > 0  # reachable
    _assert_fits_its_dock(widgets, qtbot)

    segment = widgets["Segment"]
    segment.parentWidget().raise_()
    qtbot.wait(300)
    if os.environ.get("MEDSEG_SCREENSHOTS") == "1":
        labels = viewer.layers["Colin27 deep GM labels"]
        import numpy as np

        z = int(np.argmax((labels.data > 0).sum(axis=(1, 2))))
        viewer.dims.set_point(0, z * labels.scale[0] + labels.translate[0])
        labels.opacity = 0.45
        _close_notifications(window)
        viewer.reset_view()
        qtbot.wait(500)
        path = DOCS / "screenshot_window_1600x1000.png"
        shot = viewer.screenshot(str(path), canvas_only=False, flash=False)
        assert shot.shape[:2] == (SIZE[1], SIZE[0])
