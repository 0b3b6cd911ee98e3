"""Each widget opens through the npe2 manifest; the model library fills its tables."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui

WIDGETS = {
    "Segment": "SegmentWidget",
    "Train / Fine-tune": "TrainWidget",
    "Model library": "ModelLibraryWidget",
}


@pytest.mark.parametrize("name", list(WIDGETS))
def test_widget_opens_from_the_manifest(make_napari_viewer, qtbot, name):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", name)
    assert type(widget).__name__ == WIDGETS[name]
    assert widget.window() is viewer.window._qt_window  # docked in this viewer
    if hasattr(widget, "counting"):  # let the library's worker finish before the viewer closes
        qtbot.waitUntil(lambda: not widget.counting, timeout=60_000)


def test_model_library_lists_models_and_checkpoints(make_napari_viewer, qtbot, tiny_checkpoint):
    from napari_medseg.models import list_models
    from napari_medseg.widgets._library import CKPT_COLUMNS, MODEL_COLUMNS, ModelLibraryWidget

    tiny_checkpoint("library_test", num_classes=3)
    viewer = make_napari_viewer()
    widget = ModelLibraryWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Model library")
    table = widget.models_table
    names = [table.item(r, 0).text() for r in range(table.rowCount())]
    assert names == list_models()
    assert {"rkseg-l", "rkseg-r", "sdn-unet", "sdn-unetpp"} <= set(names)
    params = MODEL_COLUMNS.index("Parameters")
    qtbot.waitUntil(lambda: all(table.item(r, params).text().endswith(" M") for r in range(table.rowCount())),
                    timeout=60_000)
    row = names.index("unet-3d-fullres")
    assert table.item(row, MODEL_COLUMNS.index("Family")).text() == "nnunet"
    assert table.item(row, MODEL_COLUMNS.index("Dims")).text() == "3D"
    assert "10.1038" in table.item(row, MODEL_COLUMNS.index("Citation")).text()

    ckpts = widget.ckpt_table
    rows = [ckpts.item(r, 0).text() for r in range(ckpts.rowCount())]
    assert "library_test" in rows
    r = rows.index("library_test")
    assert ckpts.item(r, CKPT_COLUMNS.index("Segments")).text() == "organ_1, organ_2"
    assert ckpts.item(r, CKPT_COLUMNS.index("Source")).text() == "user"


def test_model_library_measures_cpu_time(make_napari_viewer, qtbot, monkeypatch):
    import napari_medseg.models as models
    from napari_medseg.engine.evaluation import timing
    from napari_medseg.widgets._library import MODEL_COLUMNS, ModelLibraryWidget

    # Keep the test fast: one model, the smallest patch its pooling allows.
    monkeypatch.setattr(models, "list_models", lambda *a, **k: ["unet-3d-fullres"])
    monkeypatch.setattr(timing, "default_patch", lambda name, model: tuple(2 * d for d in model.input_divisor))
    viewer = make_napari_viewer()
    widget = ModelLibraryWidget(viewer)
    qtbot.waitUntil(lambda: not widget.counting, timeout=60_000)
    widget.measure_button.click()
    qtbot.waitUntil(lambda: not widget.timing, timeout=120_000)
    col = MODEL_COLUMNS.index("CPU s / patch")
    text = widget.models_table.item(widget.row_of("unet-3d-fullres"), col).text()
    seconds, patch = timing.cached_cpu_time("unet-3d-fullres")
    params = widget.models_table.item(widget.row_of("unet-3d-fullres"), MODEL_COLUMNS.index("Parameters")).text()
    assert params == f"{timing.default_parameter_count('unet-3d-fullres') / 1e6:.2f} M"  # the CLI's and README's figure
    assert seconds > 0 and text == f"{seconds:.2f} ({'×'.join(map(str, patch))})"
