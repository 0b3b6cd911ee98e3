"""How fluid the viewer stays: widget open times, and event-loop stalls while the widgets' workers run.

Run on demand (not a test), under a display or Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_widgets.py          # all
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_widgets.py --opens  # open times only

**Open times** (first open in a fresh napari, as a user's first click in the Plugins menu): each
widget is opened in its own fresh interpreter (nothing of napari-medseg or torch imported), after
docking a plain ``QWidget`` there (the baseline); then again with the sample volume opened first
(napari-medseg's file readers already imported, the usual order). It reports the open time, the ratio to the
baseline, what the open imported, whether ``torch`` was imported when the widget appeared, how long
until its pickers were filled (torch imports in a background thread), and the largest event-loop
stall meanwhile. Ratios, not thresholds: the machine sets the scale.

**Stalls**: a QTimer fires every 10 ms on napari's event loop; a "stall" is the longest gap between
two ticks minus 10 ms. It is measured three times in the same run: idle (the baseline), while the
Segment widget predicts the Colin27 sample with the shipped checkpoint, and while the Train widget
trains on the sample's layers.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from collections import Counter

INTERVAL_MS = 10


class StallProbe:
    """Records the gaps between ticks of a 10 ms QTimer on the GUI thread."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(INTERVAL_MS)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def __enter__(self):
        self.ticks.clear()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()

    def summary(self) -> tuple[float, float, int]:
        gaps = [b - a for a, b in zip(self.ticks, self.ticks[1:])] or [0.0]
        gaps_ms = sorted(g * 1e3 - INTERVAL_MS for g in gaps)
        p99 = gaps_ms[min(len(gaps_ms) - 1, int(0.99 * len(gaps_ms)))]
        return max(gaps_ms), p99, len(gaps_ms)


DIRECT = {  # the manifest's python_names, for the fallback above
    "Segment": "napari_medseg.widgets._segment:SegmentWidget",
    "Train / Fine-tune": "napari_medseg.widgets._train:TrainWidget",
    "Model library": "napari_medseg.widgets._library:ModelLibraryWidget",
}
HEAVY = ("torch", "scipy", "monai", "timm", "nnunetv2", "dynamic_network_architectures", "SimpleITK", "skimage")


def describe_imports(new: list[str]) -> str:
    """Summarise newly imported modules: the count, per top-level package, and heavy ones named."""
    if not new:
        return "nothing new"
    per_pkg = Counter(m.split(".")[0] for m in new)
    heavy = [p for p in HEAVY if p in per_pkg]
    top = ", ".join(f"{pkg} ({n})" for pkg, n in per_pkg.most_common(8))
    return f"{len(new)} new modules: {top}" + (f"; heavy: {', '.join(heavy)}" if heavy else "; no heavy package")


def pump(app, until, timeout_s: float) -> None:
    end = time.perf_counter() + timeout_s
    while time.perf_counter() < end and not until():
        app.processEvents()
        time.sleep(0.001)


OPEN_ONE = """
import json, os, sys, time
sys.path.insert(0, {bench_dir!r})
from bench_widgets import StallProbe, describe_imports, pump
import napari
from qtpy.QtWidgets import QApplication, QLabel, QVBoxLayout, QWidget

viewer = napari.Viewer(show=True)
app = QApplication.instance()
if {sample!r}:  # the usual order: a volume is open (napari_medseg.io imported), then a widget
    viewer.open_sample("napari-medseg", "colin27_deepgm")
pump(app, lambda: False, 1.0)

def plain():
    w = QWidget()
    QVBoxLayout(w).addWidget(QLabel("baseline"))
    return w

t0 = time.perf_counter()
viewer.window.add_dock_widget(plain(), name="baseline")
app.processEvents()
base = time.perf_counter() - t0
name = {name!r}
before = set(sys.modules)
probe = StallProbe()
with probe:
    t0 = time.perf_counter()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", name)
    app.processEvents()
    opened = time.perf_counter() - t0
    torch_at_open = "torch" in sys.modules and getattr(sys.modules["torch"], "Tensor", None) is not None
    new = sorted(set(sys.modules) - before)
    from napari_medseg.widgets import _common
    if _common._engine_loader().state != "idle":  # the widget asked for the engine
        pump(app, lambda: _common._engine_loader().state in ("ready", "failed"), 300)
    for attr in ("architecture", "checkpoints"):
        if hasattr(widget, attr) and hasattr(getattr(widget, attr), "loaded"):
            pump(app, lambda: getattr(widget, attr).loaded, 60)
    pump(app, lambda: not getattr(widget, "counting", False), 300)
    ready = time.perf_counter() - t0
print(json.dumps(dict(name=name, base=base, opened=opened, ready=ready, torch_at_open=torch_at_open,
                      imports=describe_imports(new), stall=probe.summary()[0])))
viewer.close()
"""
WIDGET_NAMES = ("Segment", "Train / Fine-tune", "Model library", "Display: orientation and window")


def bench_opens(sample: bool = False) -> None:
    """First open of each widget, each in a fresh interpreter, against a plain QWidget dock
    (``sample``: with the Colin27 sample opened first, as a user usually does)."""
    import json
    import subprocess

    bench_dir = os.path.dirname(os.path.abspath(__file__))
    print(f"first open in a fresh napari{' with the sample volume open' if sample else ''} "
          "(each widget in its own process), against docking a plain QWidget:")
    for name in WIDGET_NAMES:
        code = OPEN_ONE.format(bench_dir=bench_dir, name=name, sample=sample)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith("{")), None)
        if run.returncode or line is None:
            print(f"  {name}: failed\n{run.stdout}\n{run.stderr[-2000:]}")
            continue
        r = json.loads(line)
        print(f"  {name:32s} open {r['opened'] * 1e3:7.1f} ms = {r['opened'] / r['base']:6.1f} x the plain dock "
              f"({r['base'] * 1e3:.1f} ms); torch imported when it appeared: {r['torch_at_open']}; "
              f"filled after {r['ready']:.2f} s (largest stall meanwhile "
              f"{'n/a' if r['stall'] < 0 else format(r['stall'], '.0f') + ' ms'})")
        print(f"  {'':32s} imports: {r['imports']}")


def main() -> None:
    os.environ.setdefault("MEDSEG_HOME", tempfile.mkdtemp(prefix="medseg_bench_"))
    bench_opens()
    bench_opens(sample=True)
    if "--opens" in sys.argv[1:]:
        return
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    pump(app, lambda: False, 1.0)
    widgets = {}
    for name in ("Segment", "Train / Fine-tune"):
        try:
            _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", name)
        except TypeError as err:  # the widget rejected napari's PublicOnlyProxy viewer: dock it directly
            print(f"  add_plugin_dock_widget failed ({err}); constructing {name} with the real viewer")
            module, cls = DIRECT[name].split(":")
            widget = getattr(importlib.import_module(module), cls)(viewer)
            viewer.window.add_dock_widget(widget, name=name)
        widgets[name] = widget
    pump(app, lambda: all(getattr(w, "architecture", None) is None or w.architecture.loaded
                          for w in widgets.values()), 300)

    viewer.open_sample("napari-medseg", "colin27_deepgm")
    pump(app, lambda: False, 1.0)
    probe = StallProbe()
    with probe:
        pump(app, lambda: False, 3.0)
    idle = probe.summary()
    print(f"idle (baseline): largest stall {idle[0]:.1f} ms, 99th percentile {idle[1]:.1f} ms over {idle[2]} ticks")

    seg = widgets["Segment"]
    with probe:
        t0 = time.perf_counter()
        seg.run_button.click()
        pump(app, lambda: not seg.running, 600)
        dt = time.perf_counter() - t0
    inf = probe.summary()
    print(f"Segment (shipped checkpoint on the 72x86x98 sample, mirroring TTA) took {dt:.1f} s: "
          f"largest stall {inf[0]:.1f} ms ({inf[0] / max(idle[0], 1e-3):.1f} x idle), 99th percentile {inf[1]:.1f} ms")

    train = widgets["Train / Fine-tune"]
    train.epochs.setValue(2)
    train.iterations.setValue(5)
    train.batch.setValue(2)
    train.patch.setText("32,48,48")
    train.model_kwargs.setText('{"base_width": 8, "max_width": 64}')
    train.device.setCurrentText("cpu")
    train.output.setText(tempfile.mkdtemp(prefix="medseg_bench_run_"))
    with probe:
        t0 = time.perf_counter()
        train.train_button.click()
        pump(app, lambda: not train.running, 600)
        dt = time.perf_counter() - t0
    tr = probe.summary()
    print(f"Train (2 epochs x 5 iterations on the sample layers) took {dt:.1f} s: largest stall {tr[0]:.1f} ms "
          f"({tr[0] / max(idle[0], 1e-3):.1f} x idle), 99th percentile {tr[1]:.1f} ms")
    print(f"status: {train.status.text()[:200]}")
    viewer.close()


if __name__ == "__main__":
    main()
