"""How fluid the viewer stays: event-loop stalls while the widgets' workers run, and widget open times.

Run on demand (not a test), under a display or Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_widgets.py

A QTimer fires every 10 ms on napari's event loop; a "stall" is the longest gap between two ticks
minus 10 ms. It is measured three times in the same run: idle (the baseline), while the Segment
widget predicts the Colin27 sample with the shipped checkpoint, and while the Train widget trains on
the sample's layers. Widget open times are compared with docking a plain QLabel (the baseline):
"adds" is the open time minus the baseline's. Each open also lists what it imported (a diff of
``sys.modules``: the count per top-level package, heavy packages such as torch named).
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


def main() -> None:
    os.environ.setdefault("MEDSEG_HOME", tempfile.mkdtemp(prefix="medseg_bench_"))
    import napari
    from qtpy.QtWidgets import QApplication, QLabel

    print(f"already imported before napari.Viewer: torch {'torch' in sys.modules}, "
          f"napari_medseg {'napari_medseg' in sys.modules}")
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    pump(app, lambda: False, 1.0)

    t0 = time.perf_counter()
    viewer.window.add_dock_widget(QLabel("baseline"), name="baseline")
    app.processEvents()
    base = time.perf_counter() - t0
    print(f"open a plain QLabel dock (baseline): {base * 1e3:.1f} ms")
    widgets = {}
    for name in ("Segment", "Train / Fine-tune", "Model library"):
        before = set(sys.modules)
        t0 = time.perf_counter()
        try:
            _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", name)
        except TypeError as err:  # the widget rejected napari's PublicOnlyProxy viewer: dock it directly
            print(f"  add_plugin_dock_widget failed ({err}); constructing {name} with the real viewer")
            module, cls = DIRECT[name].split(":")
            widget = getattr(importlib.import_module(module), cls)(viewer)
            viewer.window.add_dock_widget(widget, name=name)
        app.processEvents()
        dt = time.perf_counter() - t0
        widgets[name] = widget
        print(f"open {name:18s}: {dt * 1e3:7.1f} ms, adds {(dt - base) * 1e3:7.1f} ms to napari "
              f"({dt / base:5.1f} x baseline; a first open includes its imports)")
        print(f"  imports: {describe_imports(sorted(set(sys.modules) - before))}")

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
