"""How fluid the viewer stays: widget open times, and event-loop stalls while the widgets' workers run.

Run on demand (not a test), under a display or Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_widgets.py          # all
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_widgets.py --opens  # open times only
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_widgets.py --stalls # stalls only
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_widgets.py --imports  # torch's import
    ... bench_widgets.py --stalls --trace   # and what the GUI thread did in each stall of the Train run

**Open times** (first open in a fresh napari, as a user's first click in the Plugins menu): each
widget is opened in its own fresh interpreter (nothing of napari-medseg or torch imported), after
docking a plain ``QWidget`` there (the baseline); then again with the sample volume opened first
(napari-medseg's file readers already imported, the usual order). It reports the open time, the ratio to the
baseline, what the open imported, whether ``torch`` was imported when the widget appeared, how long
until its pickers were filled (torch imports in a background thread), and the largest event-loop
stall meanwhile; then, for widgets that start it, how long until the background warm-up imports
(``torch._dynamo``, which torch imports when the first model or optimizer is built) were done, and
the largest stall from the open until then. Ratios, not thresholds: the machine sets the scale.

**Stalls**: a QTimer fires every 10 ms on napari's event loop; a "stall" is the longest gap between
two ticks minus 10 ms. It is measured in the same run: idle (the baseline); one repaint of the
canvas (a layer's opacity changed: the floor of anything that changes what the canvas shows, large
under a software OpenGL such as Xvfb's llvmpipe); napari's own ``add_labels`` of a head-sized labels
layer (the floor for any result layer: napari builds its visuals, controls and overlays, then the
canvas repaints); while the Segment widget predicts the Colin27
sample with the shipped checkpoint; while it "segments" a 1 mm head (181 x 217 x 181 = 7.1 M voxels)
through its own run and result path with ``engine.predict`` replaced by a stub that returns a
head-sized result at once (what is measured is adding the result, not the model), first the labels
only, then with probabilities and uncertainty (five layers); and while the Train widget trains on
the sample's layers and then segments the image again with the new model (its default). Each
measurement runs on for a second after the job, so the repaint that shows a new layer counts.
"""

from __future__ import annotations

import contextlib
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


class StallTracer:
    """Says *what* the GUI thread did during each stall: a watchdog thread samples the GUI thread's
    Python stack every few ms (``sys._current_frames``) and ``gc.callbacks`` times every garbage
    collection (which thread, which generation). Run it around a :class:`StallProbe`; then
    :meth:`explain` prints, for each gap over ``threshold_ms``, the collections inside it and the
    most frequent innermost frames of this project, napari, vispy or Qt sampled inside it. A gap with
    no sample means the GUI thread held the GIL in C code the whole time (a collection, a large copy)."""

    def __init__(self, period_s: float = 0.005):
        import threading

        self.period_s = period_s
        self.main_ident = threading.main_thread().ident
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.collections: list[tuple[float, float, int, str, int]] = []  # start, end, generation, thread, collected
        self._gc_start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-tracer", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            frame = sys._current_frames().get(self.main_ident)
            stack = []
            while frame is not None and len(stack) < 40:
                code = frame.f_code
                stack.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
                frame = frame.f_back
            self.samples.append((time.perf_counter(), tuple(stack)))

    def _on_gc(self, phase: str, info: dict) -> None:
        import threading

        ident = threading.get_ident()
        if phase == "start":
            self._gc_start[ident] = time.perf_counter()
        elif ident in self._gc_start:
            start = self._gc_start.pop(ident)
            name = "GUI" if ident == self.main_ident else threading.current_thread().name
            self.collections.append((start, time.perf_counter(), info["generation"], name, info["collected"]))

    def __enter__(self):
        import gc

        gc.callbacks.append(self._on_gc)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import gc

        self._stop.set()
        self._thread.join()
        gc.callbacks.remove(self._on_gc)

    def explain(self, ticks: list[float], threshold_ms: float = 100.0, top: int = 4) -> None:
        ours = ("napari_medseg", "_train.py", "_segment.py", "_common.py", "_plots.py", "_layers.py", "_display.py")
        gaps = [(a, b) for a, b in zip(ticks, ticks[1:]) if (b - a) * 1e3 - INTERVAL_MS > threshold_ms]
        print(f"  {len(gaps)} stall(s) over {threshold_ms:.0f} ms; collections over 20 ms in the run: "
              + (", ".join(f"gen {g} on {t} {1e3 * (e - s):.0f} ms" for s, e, g, t, _ in self.collections
                           if e - s > 0.02) or "none"))
        for a, b in gaps:
            print(f"  stall {1e3 * (b - a) - INTERVAL_MS:.0f} ms at +{a - ticks[0]:.1f} s:")
            for s, e, g, t, n in self.collections:
                if s < b and e > a:
                    print(f"    gc generation {g} on the {t} thread: {1e3 * (e - s):.0f} ms ({n} collected)")
            inside = [stack for t, stack in self.samples if a < t < b]
            print(f"    {len(inside)} stack samples of the GUI thread inside it")
            counts = Counter()
            for stack in inside:
                mine = [f for f in stack if any(o in f for o in ours)]
                counts[(stack[0] if stack else "?", mine[0] if mine else "-")] += 1
            for (inner, mine), n in counts.most_common(top):
                print(f"    {n:4d} x innermost {inner} | ours: {mine}")
            below = Counter()  # what our frame called, three levels down (where napari spends it)
            for stack in inside:
                idx = next((i for i, f in enumerate(stack) if any(o in f for o in ours)), None)
                if idx:
                    below[" > ".join(stack[max(idx - 3, 0):idx][::-1])] += 1
            for path, n in below.most_common(top):
                print(f"    {n:4d} x under ours: {path}")


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
    stall_ready = probe.summary()[0]
    warm = None
    if _common._engine_loader()._warming:  # then torch's lazy modules are imported in the background
        pump(app, lambda: _common._engine_loader().warmed.is_set(), 300)
        warm = time.perf_counter() - t0
print(json.dumps(dict(name=name, base=base, opened=opened, ready=ready, torch_at_open=torch_at_open,
                      imports=describe_imports(new), stall=stall_ready, warm=warm, stall_warm=probe.summary()[0])))
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
        if r.get("warm") is not None:
            print(f"  {'':32s} background warm-up (torch._dynamo, napari_medseg.io) done after {r['warm']:.2f} s "
                  f"(largest stall from the open until then {r['stall_warm']:.0f} ms)")
        print(f"  {'':32s} imports: {r['imports']}")


IMPORT_ONE = """
import importlib, json, sys, threading, time
sys.path.insert(0, {bench_dir!r})
from bench_widgets import StallProbe, pump
import napari
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=True)
app = QApplication.instance()
viewer.open_sample("napari-medseg", "colin27_deepgm")
pump(app, lambda: False, 1.5)
from napari_medseg.widgets import _common, _quiet_import
names = list(_common.ENGINE_MODULES) + list(_common.WARM_MODULES)

def plain():
    for name in names:
        importlib.import_module(name)

target = (lambda: _quiet_import.quiet_imports(names)) if {quiet!r} else plain
probe = StallProbe()
with probe:
    t0 = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    pump(app, lambda: not thread.is_alive(), 300)
    took = time.perf_counter() - t0
    pump(app, lambda: False, 1.0)  # collections that the import left due come after it
gaps = sorted((b - a) * 1e3 - 10 for a, b in zip(probe.ticks, probe.ticks[1:]))
print(json.dumps(dict(took=took, stall=gaps[-1], second=gaps[-2], over100=sum(g > 100 for g in gaps))))
viewer.close()
"""


def bench_imports(repeats: int = int(os.environ.get("MEDSEG_BENCH_REPEATS", "2"))) -> None:
    """The engine's background import (torch, the models, torch._dynamo, the file io) in a fresh
    napari with the sample open: plain ``importlib`` in a thread, then :func:`quiet_imports`
    (torch's libraries loaded with the GIL released, the collector paused); alternating, in fresh
    interpreters."""
    import json
    import subprocess

    bench_dir = os.path.dirname(os.path.abspath(__file__))
    results = {False: [], True: []}
    for _ in range(repeats):
        for quiet in (False, True):
            code = IMPORT_ONE.format(bench_dir=bench_dir, quiet=quiet)
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
            line = next((ln for ln in run.stdout.splitlines() if ln.startswith("{")), None)
            if run.returncode or line is None:
                print(f"  import bench failed\n{run.stdout}\n{run.stderr[-2000:]}")
                return
            results[quiet].append(json.loads(line))
    print("the engine's import in a background thread, napari's largest event-loop stall meanwhile:")
    for quiet, label in ((False, "plain import in a thread"), (True, "quiet_imports (widgets/_quiet_import)")):
        for r in results[quiet]:
            print(f"  {label:40s} took {r['took']:5.1f} s; largest stall {r['stall']:6.0f} ms, "
                  f"second {r['second']:5.0f} ms, stalls over 100 ms: {r['over100']}")
    plain_worst = max(r["stall"] for r in results[False])
    quiet_worst = max(r["stall"] for r in results[True])
    print(f"  worst stall, quiet / plain: {quiet_worst / max(plain_worst, 1e-3):.2f}")


def main() -> None:
    os.environ.setdefault("MEDSEG_HOME", tempfile.mkdtemp(prefix="medseg_bench_"))
    if "--imports" in sys.argv[1:]:
        bench_imports()
        return
    if "--stalls" not in sys.argv[1:]:
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
    from napari_medseg.widgets import _common

    if hasattr(_common._engine_loader(), "warmed"):  # the background warm-up imports, if any
        pump(app, lambda: not _common._engine_loader()._warming or _common._engine_loader().warmed.is_set(), 300)
    from napari_medseg.widgets import _plots

    pump(app, lambda: _plots._renderer().prepared.is_set(), 120)  # the Train widget's matplotlib import

    from napari.layers import Image, Labels

    viewer.open_sample("napari-medseg", "colin27_deepgm")
    sample_image = [lay for lay in viewer.layers if isinstance(lay, Image)][-1]
    sample_labels = [lay for lay in viewer.layers if isinstance(lay, Labels)][-1]
    pump(app, lambda: False, 1.0)
    probe = StallProbe()
    with probe:
        pump(app, lambda: False, 3.0)
    idle = probe.summary()
    print(f"idle (baseline): largest stall {idle[0]:.1f} ms, 99th percentile {idle[1]:.1f} ms over {idle[2]} ticks")
    bench_full_collection()
    repaints = []
    for i in range(5):
        with probe:
            pump(app, lambda: False, 0.2)
            sample_image.opacity = 0.9 if i % 2 == 0 else 1.0
            pump(app, lambda: False, 0.5)
        repaints.append(probe.summary()[0])
    repaint = sorted(repaints)[len(repaints) // 2]
    print(f"one canvas repaint (an opacity change; median of 5): stall {repaint:.1f} ms "
          f"({repaint / max(idle[0], 1e-3):.1f} x idle)")
    _, head_labels = head_arrays()
    napari_floor = median_add_stall(app, viewer, probe, head_labels, "napari floor")
    # the same for an 8 x 8 x 8 layer: the floor is per layer, not per voxel
    tiny = median_add_stall(app, viewer, probe, head_labels[:8, :8, :8], "napari floor, tiny")
    print(f"napari's own add_labels of an 8 x 8 x 8 labels layer (median of 3): stall {tiny:.1f} ms "
          f"({tiny / max(napari_floor, 1e-3):.2f} x the head-sized one)")
    print(f"napari's own add_labels of a head-sized labels layer, nothing of napari-medseg (median of 3): "
          f"stall {napari_floor:.1f} ms ({napari_floor / max(idle[0], 1e-3):.1f} x idle, "
          f"{napari_floor / max(repaint, 1e-3):.1f} x one repaint)")

    def report(what: str, dt: float, stalls: tuple) -> None:
        print(f"{what} took {dt:.1f} s: largest stall {stalls[0]:.1f} ms ({stalls[0] / max(idle[0], 1e-3):.1f} x idle, "
              f"{stalls[0] / max(repaint, 1e-3):.1f} x one repaint, {stalls[0] / max(napari_floor, 1e-3):.2f} x "
              f"napari's own add_labels), 99th percentile {stalls[1]:.1f} ms")

    seg = widgets["Segment"]
    seg.channels.set_layers([sample_image])
    with probe:
        t0 = time.perf_counter()
        seg.run_button.click()
        pump(app, lambda: not seg.running, 600)
        dt = time.perf_counter() - t0
        pump(app, lambda: False, 1.0)
    report("Segment (shipped checkpoint on the 72x86x98 sample, mirroring TTA, incl. adding the result)", dt,
           probe.summary())

    head = add_head_image(viewer)
    seg.channels.set_layers([head])
    for extras in (False, True):
        seg.probabilities.setChecked(extras)
        seg.uncertainty.setChecked(extras)
        with stub_predict(), probe:
            pump(app, lambda: False, 0.3)
            t0 = time.perf_counter()
            seg.run_button.click()
            pump(app, lambda: not seg.running, 600)
            dt = time.perf_counter() - t0
            pump(app, lambda: False, 1.0)
        what = "labels + 3 probability + uncertainty layers" if extras else "labels layer"
        report(f"Segment result of a 1 mm head {HEAD_SHAPE} ({what}; predict stubbed)", dt, probe.summary())
        print(f"  status: {seg.status.text()[:160]}")
    seg.probabilities.setChecked(False)
    seg.uncertainty.setChecked(False)
    seg.channels.set_layers([sample_image])

    train = widgets["Train / Fine-tune"]
    train.channels.set_layers([sample_image])
    train.labels.set_layer(sample_labels)
    train.minutes.setValue(0)  # epochs x iterations, not the default 5-minute budget
    train.epochs.setValue(2)
    train.iterations.setValue(5)
    train.batch.setValue(2)
    train.patch.setText("32,48,48")
    train.model_kwargs.setText('{"base_width": 8, "max_width": 64}')
    train.device.setCurrentText("cpu")
    train.output.setText(tempfile.mkdtemp(prefix="medseg_bench_run_"))
    tracer = StallTracer() if "--trace" in sys.argv[1:] else contextlib.nullcontext()
    with probe, tracer:
        t0 = time.perf_counter()
        train.train_button.click()
        pump(app, lambda: not train.running, 600)
        pump(app, lambda: not seg.running, 600)  # "segment the image again with the new model"
        dt = time.perf_counter() - t0
        pump(app, lambda: False, 1.0)
    report("Train (2 epochs x 5 iterations on the sample layers, then segment again)", dt, probe.summary())
    if isinstance(tracer, StallTracer):
        tracer.explain(probe.ticks)
    print(f"status: {train.status.text()[:200]}")
    viewer.close()


def median_add_stall(app, viewer, probe: StallProbe, labels, name: str, repeats: int = 3) -> float:
    """napari's own ``add_labels`` of ``labels`` (a copy each time), nothing of napari-medseg: the
    median of the largest stall from the add until a second later (its first draw included)."""
    stalls = []
    for _ in range(repeats):
        with probe:
            pump(app, lambda: False, 0.2)
            layer = viewer.add_labels(labels.copy(), name=name, opacity=0.5)
            pump(app, lambda: False, 1.0)
        stalls.append(probe.summary()[0])
        viewer.layers.remove(layer)
        pump(app, lambda: False, 0.5)
    return sorted(stalls)[len(stalls) // 2]


def bench_full_collection() -> None:
    """A full garbage collection (what any thread may set off, holding the GIL) with the widgets'
    freeze (``widgets/_quiet_import.FrozenImports``) and with everything unfrozen, same moment."""
    import gc

    from napari_medseg.widgets import _common

    policy = _common.frozen_imports()
    if not policy.active:
        print(f"a full garbage collection: the widgets froze nothing ({_quiet_env()}); skipped")
        return

    def timed() -> float:
        t0 = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - t0) * 1e3

    frozen = sorted(timed() for _ in range(3))[1]
    scanned_frozen = len(gc.get_objects())
    gc.unfreeze()
    everything = sorted(timed() for _ in range(3))[1]
    scanned_all = len(gc.get_objects())
    policy.refreeze()  # as before (and the layers opened since are noted)
    print(f"a full garbage collection (median of 3): {frozen:.1f} ms scanning {scanned_frozen:,} objects with the "
          f"widgets' freeze, {everything:.1f} ms scanning {scanned_all:,} without it ({frozen / max(everything, 1e-3):.3f}x)")


def _quiet_env() -> str:
    from napari_medseg.widgets._quiet_import import FREEZE_ENV

    return f"{FREEZE_ENV}={os.environ.get(FREEZE_ENV, 'unset')}"


#: A 1 mm head (the MNI152 grid): 7.1 M voxels.
HEAD_SHAPE = (181, 217, 181)


def head_arrays(num_classes: int = 4) -> tuple:
    """A smooth head-sized image and nested-ellipsoid labels (uint8, like ``predict``'s)."""
    import numpy as np

    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in HEAD_SHAPE)
    r = np.sqrt(z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2)
    image = (1000 * np.clip(1 - r, 0, None)).astype(np.float32)
    labels = np.zeros(HEAD_SHAPE, np.uint8)
    for k, radius in enumerate((0.8, 0.5, 0.25)[: num_classes - 1], start=1):
        labels[r < radius] = k
    return image, labels


def add_head_image(viewer):
    """A 1 mm head-sized image layer with the geometry metadata this plugin's reader gives."""
    from napari_medseg.io import affine_from_spacing

    image, _ = head_arrays()
    geometry = {"affine": affine_from_spacing((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)).tolist(),
                "spacing": [1.0, 1.0, 1.0], "spatial_shape": list(HEAD_SHAPE), "channel_axis": None}
    return viewer.add_image(image, name="head 1 mm", metadata={"medseg_geometry": geometry})


class stub_predict:  # noqa: N801 - a context manager used like a function
    """Replace ``engine.inference.predict`` with a generator that returns a head-sized result
    (made in the worker thread, as the real one) after a few progress events."""

    def __enter__(self):
        import napari_medseg.engine.inference as inference
        from napari_medseg.engine.inference.postprocessing import PredictionResult
        from napari_medseg.engine.jobs import Progress

        def fake_predict(image, spacing, checkpoints, config=None, *, affine=None, **overrides):
            import numpy as np

            for i in range(1, 4):
                time.sleep(0.05)
                yield Progress("tiles", i, 3, "stub")
            _, labels = head_arrays()
            result = PredictionResult(labels, label_names={0: "background", 1: "head", 2: "brain", 3: "core"})
            if config is not None and config.return_probabilities:
                probs = np.empty((4, *HEAD_SHAPE), np.float32)
                for k in range(4):
                    probs[k] = (labels == k)
                result.probabilities = probs
            if config is not None and config.return_uncertainty:
                result.uncertainty = np.zeros(HEAD_SHAPE, np.float32)
            return result

        self._module, self._original = inference, inference.predict
        inference.predict = fake_predict
        return self

    def __exit__(self, *exc):
        self._module.predict = self._original


if __name__ == "__main__":
    main()
