"""Each widget opens through the npe2 manifest, quietly and without waiting for torch; the model
library fills its tables."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

pytestmark = pytest.mark.gui

WIDGETS = {
    "Segment": "SegmentWidget",
    "Train / Fine-tune": "TrainWidget",
    "Model library": "ModelLibraryWidget",
    "Display: orientation and window": "DisplayWidget",
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


def _ours(message: str, filename: str) -> bool:
    return "napari_medseg" in filename or "torch.jit" in message or "torch/jit" in filename


def test_opening_the_widgets_raises_no_warning_of_ours(make_napari_viewer, qtbot, tiny_checkpoint):
    """No notification on open from napari-medseg or torch.jit: building the model library's models
    imports timm, whose ``@torch.jit.interface`` raised a DeprecationWarning that napari's worker
    relays as a notification."""
    from napari.utils.notifications import notification_manager

    tiny_checkpoint("quiet")
    viewer = make_napari_viewer()
    seen = len(notification_manager.records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        widgets = [viewer.window.add_plugin_dock_widget("napari-medseg", name)[1] for name in WIDGETS]
        library = next(w for w in widgets if hasattr(w, "counting"))
        qtbot.waitUntil(lambda: not library.counting, timeout=120_000)
        qtbot.wait(100)  # let relayed worker warnings arrive
    ours = [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
            if _ours(str(w.message), w.filename)]
    notes = [str(n.message) for n in notification_manager.records[seen:]
             if _ours(str(n.message), str(getattr(n, "filename", "") or ""))]
    assert ours == [] and notes == []


FRESH_NAPARI = """
import sys, time, warnings
warnings.simplefilter("default")
import napari
from napari.utils.notifications import notification_manager
from qtpy.QtWidgets import QApplication
from napari_medseg.widgets import _common

def pump(until, timeout=300):
    app, end = QApplication.instance(), time.time() + timeout
    while time.time() < end and not until():
        app.processEvents()
        time.sleep(0.01)

# what napari's workers hand to its notifications (napari 0.9.2 drops them: its worker classes
# never run the mixin that connects ``warned``; earlier versions show each as a notification)
import superqt.utils._qthreading as qthreading

relayed = []
_init = qthreading.WorkerBase.__init__

def _recording_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.warned.connect(lambda w: relayed.append(w))

qthreading.WorkerBase.__init__ = _recording_init

viewer = napari.Viewer(show=False)
assert "torch" not in sys.modules and "timm" not in sys.modules
seen = len(notification_manager.records)
_, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
state = _common._engine_loader().state
print("state after open:", state, "| architecture filled:", segment.architecture.loaded)
assert state in ("loading", "ready") and not segment.architecture.loaded  # built without waiting
pump(lambda: segment.architecture.loaded)
assert segment.architecture.loaded and "torch" in sys.modules
assert segment.checkpoints.current_info() is not None, segment.checkpoints.combo.currentText()
assert segment.device.is_enabled("cpu")
_, train = viewer.window.add_plugin_dock_widget("napari-medseg", "Train / Fine-tune")
_, library = viewer.window.add_plugin_dock_widget("napari-medseg", "Model library")
pump(lambda: not library.counting)
pump(lambda: False, 0.5)
assert "timm" in sys.modules  # the library built the timm-based models
for n in notification_manager.records[seen:]:
    print("NOTIFICATION", n.severity, n.message, getattr(n, "filename", ""))
for message, category, filename, *_ in relayed:
    print("NOTIFICATION relayed", category.__name__, message, filename)
viewer.close()
print("ok")
"""


def test_a_fresh_napari_opens_the_widgets_at_once_and_quietly(tmp_path):
    """In a fresh napari (torch not imported): the Segment widget is built at once with "loading"
    pickers, torch is imported in the background and the pickers fill when it is; opening Train
    and the Model library (which imports timm to build its models) shows no notification from
    napari-medseg or torch.jit."""
    env = dict(os.environ, MEDSEG_HOME=str(tmp_path / "home"))
    run = subprocess.run([sys.executable, "-c", FRESH_NAPARI], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr[-3000:]
    notes = [line for line in run.stdout.splitlines() if line.startswith("NOTIFICATION")]
    assert not [n for n in notes if "napari_medseg" in n or "torch.jit" in n or "torch/jit" in n], notes
