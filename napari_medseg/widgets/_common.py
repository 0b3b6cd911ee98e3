"""Pieces shared by the widgets: pickers, the engine worker, error display, docking. No compute here.

**torch loads in the background.** Opening a widget must not wait for ``import torch`` (seconds):
the pickers (:class:`ModelCombo`, :class:`DeviceCombo`, :class:`CheckpointPicker`) show a
"loading" entry and fill themselves when :func:`when_engine_ready` says the engine modules are
imported. The first widget starts that import in a daemon thread; once ``torch`` is imported (a
later widget, a test process) everything fills at once, as before.

**Docking.** Widgets that mix in :class:`MedsegPanel` (every engine widget, through
:class:`EngineJobOwner`) join the other napari-medseg docks of their dock area as tabs when they
are first shown, however they were opened (the Plugins menu stacks docks vertically, which left
each too short to use); :func:`scroll_area` wraps a form so that a dock can be shorter than its
content.

**No full garbage collection of napari's and torch's objects while a job runs.** Once the engine is
imported and warmed, what is alive is frozen out of the collector's full scans
(:class:`._quiet_import.FrozenImports`); each viewer with an engine widget reports removed layers
(:func:`watch_viewer`), so a layer that was alive at the freeze is still reclaimed after removal.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtGui import QStandardItem, QStandardItemModel
from qtpy.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QWidget,
)

from ._quiet_import import FrozenImports, quiet_imports

logger = logging.getLogger(__name__)

PATH_ROLE = Qt.UserRole + 1
ERROR_STYLE = "color: #ff6b6b;"
OK_STYLE = ""


# ------------------------------------------------------------------------- shared catalogue signal
class _CatalogEvents(QObject):
    """Emitted when a checkpoint was registered, so every widget refreshes its list."""

    changed = Signal()


_EVENTS: _CatalogEvents | None = None


def catalog_events() -> _CatalogEvents:
    """The process-wide catalogue signal object (created on first use, in the GUI thread)."""
    global _EVENTS
    if _EVENTS is None:
        _EVENTS = _CatalogEvents()
    return _EVENTS


# ----------------------------------------------------------------- the engine, imported lazily
#: What the pickers need; importing them imports torch.
ENGINE_MODULES = ("napari_medseg.models", "napari_medseg.engine.checkpoints", "napari_medseg.engine.runtime")
#: Deprecation warnings that torch's TorchScript raises while third-party packages are imported
#: (``timm`` decorates classes with ``torch.jit.interface`` at import, and the model library builds
#: timm-based models in a worker). superqt runs workers with an "always" filter and relays each
#: warning (``warned``) to napari's notifications, so these popped up when a widget opened.
TORCH_JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"
#: Delay between the first widget asking for the engine and the background import (ms).
START_DELAY_MS = 150
#: Imported in the background once the pickers are filled (:meth:`_EngineLoader.warm`). torch
#: imports ``torch._dynamo`` the first time a model is built (weight init under a device context)
#: or an optimizer is made: seconds of imports whose allocations also set off a full garbage
#: collection of napari's and torch's objects, which holds the GIL (and so napari's event loop)
#: for about half a second. It happened in the middle of the first Segment or Train run.
#: The plugin's file io (nibabel, pydicom: half a second) is warmed too: the widgets import it only
#: when a run reads the layers or checks a labels layer's grid; and the engine's inference and
#: training modules, which every run imports: so that what a run allocates is small and short-lived
#: (what is alive after the warm-up is frozen out of full collections: see the top of the module).
WARM_MODULES = ("torch._dynamo", "napari_medseg.io", "napari_medseg.engine.inference", "napari_medseg.engine.training")


def ignore_torch_jit_deprecations() -> None:
    """In a napari/superqt worker: drop torch's TorchScript deprecation warnings (only those).

    superqt runs each worker inside ``warnings.catch_warnings()`` with an "always" filter and
    relays every warning to napari's notifications; a filter added here goes in front of that one
    and is removed with it when the worker ends (nothing leaks into the rest of the process).
    """
    warnings.filterwarnings("ignore", message=TORCH_JIT_DEPRECATION, category=DeprecationWarning)


# --------------------------------------------------------- freezing the import's objects (see top)
class _LayerWatch:
    """Connected to one viewer's ``layers.events.removed``: reports each removed layer to the
    freezing policy, and lists the viewer's layers when it freezes. napari's emitter holds it (a
    callable object, not a method: held strongly), so it lives as long as the viewer, whether or not
    the widget that made it is still open."""

    def __init__(self, layers) -> None:
        self.layers = layers

    def keys(self) -> list[str]:
        return [layer.unique_id for layer in list(self.layers)]

    def __call__(self, event) -> None:
        layer = getattr(event, "value", None)
        key = getattr(layer, "unique_id", None)
        if key is not None and frozen_imports().released(key):
            logger.debug("layer %r was alive when the engine's objects were frozen: unfrozen", layer)


_WATCHES: list[weakref.ref] = []  # one per watch_viewer() call; dead once its viewer is gone
_FROZEN: FrozenImports | None = None


def _layer_keys() -> list[str]:
    return [key for ref in _WATCHES if (watch := ref()) is not None for key in watch.keys()]


def frozen_imports() -> FrozenImports:
    """The process-wide freezing policy (created on first use)."""
    global _FROZEN
    if _FROZEN is None:
        _FROZEN = FrozenImports(_layer_keys)
    return _FROZEN


def watch_viewer(viewer) -> None:
    """Note the layers of ``viewer`` at each freeze and report its removed layers (engine widgets
    call this with their viewer; a viewer watched by two widgets is listed twice, which changes
    nothing: the keys form a set, and a second release of a key is a no-op)."""
    watch = _LayerWatch(viewer.layers)
    viewer.layers.events.removed.connect(watch)
    _WATCHES[:] = [ref for ref in _WATCHES if ref() is not None] + [weakref.ref(watch)]


class _EngineLoader(QObject):
    """Imports :data:`ENGINE_MODULES` once, in a daemon thread; ``ready``/``failed`` reach the GUI
    thread. Then it imports :data:`WARM_MODULES` in the same thread (``warmed`` is set when done,
    or at once if the engine failed); engine jobs wait for that (:func:`wait_for_warm_up`), so the
    two never import the same modules at once."""

    ready = Signal()
    failed = Signal(str)
    warmed_up = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.state = "idle"  # idle -> loading -> ready | failed
        self.error = ""
        self.warmed = threading.Event()
        self._warming = False
        self.warmed_up.connect(self._freeze)  # queued: the GUI thread, where layers change

    def _freeze(self) -> None:
        if frozen_imports().freeze():
            logger.debug("froze the objects alive after the engine's import and warm-up")

    def _import(self) -> None:
        quiet_imports(ENGINE_MODULES)

    def load_now(self) -> None:
        """Import in this thread (when torch is already imported: a fraction of a second); the
        warm-up still runs in the background."""
        self._import()
        self.state = "ready"
        if not self._warming:
            self._warming = True
            threading.Thread(target=self.warm, name="napari-medseg engine warm-up", daemon=True).start()

    def warm(self) -> None:
        """Import :data:`WARM_MODULES` (in a background thread), then set ``warmed``."""
        self._warming = True
        try:
            quiet_imports(WARM_MODULES)
        except Exception:  # noqa: BLE001 - only a head start: the job imports what it needs
            logger.debug("warm-up import failed", exc_info=True)
        finally:
            self.warmed.set()
        self.warmed_up.emit()

    def start(self) -> None:
        """Start the import soon, after the event loop has drawn the widget that asked: the import
        holds the GIL most of the time, so starting it at once would slow that first draw."""
        if self.state != "idle":
            return
        self.state = "loading"
        QTimer.singleShot(START_DELAY_MS, self._start_thread)

    def _start_thread(self) -> None:
        threading.Thread(target=self._run, name="napari-medseg engine import", daemon=True).start()

    def _run(self) -> None:
        try:
            self._import()
        except Exception as err:  # noqa: BLE001 - reported in the widgets
            logger.warning("Could not import the segmentation engine: %s", err, exc_info=True)
            self.error = f"{type(err).__name__}: {err}"
            self.state = "failed"
            self.warmed.set()
            self.failed.emit(self.error)
            return
        self._warming = True  # before anything can start a job
        self.state = "ready"
        self.ready.emit()
        self.warm()


_LOADER: _EngineLoader | None = None


def _engine_loader() -> _EngineLoader:
    global _LOADER
    if _LOADER is None:
        _LOADER = _EngineLoader()
    return _LOADER


def engine_ready() -> bool:
    """Whether the engine modules can be used now without waiting for ``import torch``.

    True once the background import has finished, or at once when ``torch`` is already imported
    (the rest then loads in this thread).
    """
    loader = _engine_loader()
    if loader.state == "idle" and "torch" in sys.modules:
        loader.load_now()
    return loader.state == "ready"


def wait_for_warm_up(timeout: float = 300.0) -> bool:
    """In an engine worker: wait until the background warm-up imports are done (when one runs).

    Returns whether none is running any more (False: timed out, the job goes on anyway).
    """
    loader = _LOADER
    if loader is None or loader.state not in ("loading", "ready") or not loader._warming:
        return True
    return loader.warmed.wait(timeout)


def after_warm_up(callback: Callable[[], None]) -> None:
    """Call ``callback`` (a bound method of a widget: it runs in the GUI thread) once the engine's
    warm-up imports are done and their objects frozen; at once when they are."""
    loader = _engine_loader()
    if loader.warmed.is_set():
        callback()
    else:
        loader.warmed_up.connect(callback)


def when_engine_ready(receiver: QObject, callback: Callable[[], None],
                      on_failure: Callable[[str], None] | None = None) -> bool:
    """Call ``callback`` (in the GUI thread) once the engine modules are imported.

    Calls it now and returns True when they already are; otherwise starts the background import
    (once per process), connects ``callback`` through ``receiver`` (a QObject of the GUI thread, so
    that the call is dropped when the widget is gone) and returns False.
    """
    if engine_ready():
        callback()
        return True
    loader = _engine_loader()
    if loader.state == "failed":
        if on_failure is not None:
            on_failure(loader.error)
        return False
    relay = _Relay(receiver, callback, on_failure)
    loader.ready.connect(relay.fire)
    loader.failed.connect(relay.fail)
    loader.start()
    return False


class _Relay(QObject):
    """Lives as ``receiver``'s child: Qt queues the loader's signals to it and drops them with it."""

    def __init__(self, receiver: QObject, callback: Callable[[], None],
                 on_failure: Callable[[str], None] | None):
        super().__init__(receiver)
        self._callback = callback
        self._on_failure = on_failure

    def fire(self) -> None:
        self._disconnect()
        self._callback()

    def fail(self, message: str) -> None:
        self._disconnect()
        if self._on_failure is not None:
            self._on_failure(message)

    def _disconnect(self) -> None:
        loader = _engine_loader()
        for signal, slot in ((loader.ready, self.fire), (loader.failed, self.fail)):
            with contextlib.suppress(TypeError, RuntimeError):
                signal.disconnect(slot)


# ---------------------------------------------------------------------------------- messages
def status_label() -> QLabel:
    """A word-wrapping label that never forces its dock wider (long paths are clipped)."""
    label = QLabel()
    label.setWordWrap(True)
    label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
    label.setMinimumWidth(50)
    label.setTextInteractionFlags(Qt.TextSelectableByMouse)
    return label


class ProgressBar(QProgressBar):
    """A ``QProgressBar`` painted with the next paint event, never at once.

    ``QProgressBar.setValue`` (and ``setRange``/``reset``) call ``repaint()``: the bar is painted
    synchronously, and with it napari's whole window, its OpenGL canvas included when that has
    changed (a new layer): one progress step then costs napari's event loop a full canvas render
    (tens to hundreds of milliseconds under a software OpenGL). Here those calls run with updates
    disabled; re-enabling them schedules an ordinary ``update()``.
    """

    def _lazily(self, method, *args) -> None:
        if not self.updatesEnabled():
            method(*args)
            return
        self.setUpdatesEnabled(False)
        try:
            method(*args)
        finally:
            self.setUpdatesEnabled(True)  # schedules update()

    def setValue(self, value: int) -> None:  # noqa: N802 - Qt API
        self._lazily(super().setValue, value)

    def setRange(self, minimum: int, maximum: int) -> None:  # noqa: N802 - Qt API
        self._lazily(super().setRange, minimum, maximum)

    def setMaximum(self, maximum: int) -> None:  # noqa: N802 - Qt API
        self._lazily(super().setMaximum, maximum)

    def setMinimum(self, minimum: int) -> None:  # noqa: N802 - Qt API
        self._lazily(super().setMinimum, minimum)

    def reset(self) -> None:
        self._lazily(super().reset)


def short_path(path: str | None, parts: int = 2) -> str:
    """The last ``parts`` components of a path (status lines), ``…/`` in front when cut."""
    if not path:
        return ""
    pieces = str(path).replace("\\", "/").rstrip("/").split("/")
    return ("…/" if len(pieces) > parts else "") + "/".join(pieces[-parts:])


def show_status(label: QLabel, text: str, error: bool = False) -> None:
    """Put ``text`` in a status label, red for errors; errors also go to napari's notifications."""
    label.setText(text)
    label.setStyleSheet(ERROR_STYLE if error else OK_STYLE)
    if error:
        logger.warning(text)
        try:
            from napari.utils.notifications import show_error

            show_error(text)
        except Exception:  # noqa: BLE001 - a notification must never break the widget
            logger.debug("could not show a napari notification", exc_info=True)


# ------------------------------------------------------------------------------------ docking
def is_medseg_widget(widget: object) -> bool:
    """Whether ``widget`` is one of this plugin's dock widgets (by its class's module)."""
    return type(widget).__module__.startswith("napari_medseg.widgets")


def medseg_docks(window: QMainWindow) -> list[QDockWidget]:
    """The docked (not floating) dock widgets of ``window`` that hold a napari-medseg widget."""
    return [d for d in window.findChildren(QDockWidget)
            if not d.isFloating() and d.widget() is not None and is_medseg_widget(d.widget())]


def tabify_with_medseg_docks(widget: QWidget) -> bool:
    """Put ``widget``'s dock in a tab beside the other napari-medseg docks of its dock area.

    napari's Plugins menu docks each widget below the previous ones; four of them stacked in one
    column left each too short to use and grew the window past the screen. Tabs give each the
    full height. Does nothing for a floating or undocked widget, or one already tabbed.

    Returns:
        True when the dock was moved into a tab group.
    """
    dock = widget.parentWidget()
    if not isinstance(dock, QDockWidget) or dock.isFloating():
        return False
    window = dock.parentWidget()
    if not isinstance(window, QMainWindow):
        return False
    area = window.dockWidgetArea(dock)
    others = [d for d in medseg_docks(window)
              if d is not dock and window.dockWidgetArea(d) == area and not d.isHidden()]
    if not others or any(dock in window.tabifiedDockWidgets(d) for d in others):
        return False
    window.tabifyDockWidget(others[0], dock)
    for d in (*others, dock):  # short tab titles (five fit in a dock); the title bar keeps napari's name
        d.setWindowTitle(TAB_TITLES.get(type(d.widget()).__name__, d.windowTitle()))
    dock.show()
    dock.raise_()
    return True


#: Tab titles of the plugin's docks when they share a dock area.
TAB_TITLES = {"SegmentWidget": "Segment", "TrainWidget": "Train", "ModelLibraryWidget": "Library",
              "FillBetweenSlicesWidget": "Fill", "DisplayWidget": "Display"}


class _DockWatcher(QObject):
    """Event filter of a main window: a napari-medseg dock added later joins the tabs too (also
    for widgets that are not a :class:`MedsegPanel`)."""

    def __init__(self, window: QMainWindow):
        super().__init__(window)
        self.setObjectName("medseg_dock_watcher")
        window.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt API
        from qtpy.QtCore import QEvent

        if event.type() == QEvent.ChildAdded and isinstance(event.child(), QDockWidget):
            dock = event.child()
            QTimer.singleShot(0, lambda: self._join(dock))
        return False

    @staticmethod
    def _join(dock: QDockWidget) -> None:
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            widget = dock.widget()
            if widget is not None and is_medseg_widget(widget):
                tabify_with_medseg_docks(widget)


def watch_medseg_docks(window: QMainWindow) -> None:
    """Make napari-medseg docks added to ``window`` from now on join the tabs (once per window)."""
    if window.findChild(_DockWatcher, "medseg_dock_watcher") is None:
        _DockWatcher(window)


#: The widest a scroll area makes its dock to show its whole form (px); wider forms scroll sideways.
MAX_PANEL_WIDTH = 480


def fit_scroll_widths(widget: QWidget, max_width: int = MAX_PANEL_WIDTH) -> None:
    """Keep a narrow dock from cutting off the form of a vertical-only scroll area inside
    ``widget``: the area becomes as wide as its content, up to ``max_width``; beyond that it gets
    a horizontal scroll bar instead (a dock is never pushed wider than ``max_width`` by it)."""
    for area in widget.findChildren(QScrollArea):
        inner = area.widget()
        if inner is None or area.horizontalScrollBarPolicy() != Qt.ScrollBarAlwaysOff:
            continue
        need = (inner.minimumSizeHint().width() + area.verticalScrollBar().sizeHint().width()
                + 2 * area.frameWidth())
        if need > max_width:
            area.setHorizontalScrollBarPolicy(Qt.ScrollBarAsNeeded)
            need = max_width
        if area.minimumWidth() < need:
            area.setMinimumWidth(need)


class MedsegPanel:
    """Mixin for the plugin's dock widgets (list it before ``QWidget``): when first shown, its
    vertical scroll areas get the width of their content (:func:`fit_scroll_widths`); in a dock it
    joins the other napari-medseg docks of that area as a tab (:func:`tabify_with_medseg_docks`),
    and napari-medseg docks opened later join them as well."""

    _joined_tabs = False

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        if not self._joined_tabs:
            fit_scroll_widths(self)
        super().showEvent(event)
        if not self._joined_tabs:
            self._joined_tabs = True
            QTimer.singleShot(0, self._join_medseg_tabs)  # after napari has placed the dock

    def _join_medseg_tabs(self) -> None:
        with contextlib.suppress(RuntimeError):  # the widget was closed meanwhile
            tabify_with_medseg_docks(self)
            window = self.window()
            if isinstance(window, QMainWindow):
                watch_medseg_docks(window)


def scroll_area(inner: QWidget) -> QScrollArea:
    """``inner`` in a frameless vertical scroll area, so that its dock may be shorter than it."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    scroll.setWidget(inner)
    return scroll


# ------------------------------------------------------------------------ small background calls
class _CallRelay(QObject):
    """Lives in the GUI thread: a background call's outcome reaches its callback through ``done``."""

    done = Signal(object, object, object)  # then, result, error

    def __init__(self) -> None:
        super().__init__()
        self.done.connect(self._deliver)

    @staticmethod
    def _deliver(then, result, error) -> None:
        try:
            then(result, error)
        except RuntimeError as err:  # the widget the callback belongs to was deleted meanwhile
            if "deleted" not in str(err):
                raise
            logger.debug("dropped a background result: %s", err)


_CALLS: _CallRelay | None = None


def call_in_thread(fn: Callable[[], Any], then: Callable[[Any, BaseException | None], None]) -> threading.Thread:
    """Run ``fn()`` in a daemon thread, then ``then(result, error)`` in the GUI thread.

    For short array or file work that a click or a worker's result needs (counting voxels,
    reading a checkpoint's summary) but that must not hold napari's event loop. ``error`` is the
    exception ``fn`` raised (``result`` is then ``None``). Call it from the GUI thread.
    """
    global _CALLS
    if _CALLS is None:
        _CALLS = _CallRelay()
    relay = _CALLS

    def run() -> None:
        try:
            result, error = fn(), None
        except Exception as err:  # noqa: BLE001 - handed to ``then``
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the relay is gone (interpreter exit)
            relay.done.emit(then, result, error)

    thread = threading.Thread(target=run, name="napari-medseg background call", daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- the engine worker
@dataclass(frozen=True)
class Stopped:
    """Returned by :func:`start_engine_worker` when the user stopped the job.

    Attributes:
        error: Why closing the engine generator failed, if it did.
    """

    error: str | None = None


class StopFlag(threading.Event):
    """Set to stop an engine worker; ``done`` is set when its thread has left the engine."""

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Event()


class EngineFailure(Exception):
    """An engine ``RuntimeError`` (a torch error, :class:`InsufficientMemoryError`) re-raised as is.

    superqt's generator worker takes a ``RuntimeError`` leaving the generator for "the worker
    object was deleted": it only warns and never emits ``errored``, so the user would see nothing.
    Re-raised as this plain ``Exception`` (same message, the original as ``__cause__``), it reaches
    the widget's error handler.
    """

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def _drive(make_gen: Callable[[], Generator], stop: threading.Event) -> Generator:
    """Run an engine generator, closing it (in this worker thread) as soon as ``stop`` is set."""
    from napari_medseg.engine.jobs import Cancelled, relay

    ignore_torch_jit_deprecations()
    wait_for_warm_up()  # never import torch's lazy modules in two threads at once
    try:
        return (yield from relay(make_gen(), should_stop=stop.is_set))
    except Cancelled:
        return Stopped()
    except Exception as err:
        if isinstance(err.__context__, Cancelled):  # the engine's own clean-up failed
            return Stopped(f"{type(err).__name__}: {err}")
        if isinstance(err, RuntimeError):
            raise EngineFailure(err) from err
        raise
    finally:
        done = getattr(stop, "done", None)
        if done is not None:
            done.set()


def start_engine_worker(
    make_gen: Callable[[], Generator],
    *,
    on_yield: Callable[[Any], None],
    on_return: Callable[[Any], None],
    on_error: Callable[[Exception], None],
    on_finish: Callable[[], None],
):
    """Start ``make_gen()`` (an engine generator) in a napari thread worker.

    ``make_gen`` runs in the worker thread, so loading and stacking data happen there too.
    Setting the returned event stops the job at the engine's next yield (one tile or one training
    iteration): the generator is closed in the worker thread, which lets the training engine save
    ``checkpoint_latest.pt``, and the worker returns :class:`Stopped`.

    Returns:
        ``(worker, stop_event)``.
    """
    from napari.qt.threading import thread_worker

    stop = StopFlag()
    # ignore_errors: the widget's ``on_error`` reports failures; without it superqt also re-raises
    # each error in the main thread, where napari shows a traceback dialog instead of the message.
    worker = thread_worker(_drive, start_thread=False, ignore_errors=True)(make_gen, stop)
    worker.yielded.connect(on_yield)
    worker.returned.connect(on_return)
    worker.errored.connect(on_error)
    worker.finished.connect(on_finish)
    worker.start()
    return worker, stop


def shutdown_worker(worker, stop: threading.Event | None, timeout: float = 120.0) -> bool:
    """Stop an engine worker and wait (up to ``timeout`` s) until its thread has left the engine.

    Used when the viewer closes: the engine stops at its next yield (one tile or one training
    iteration; training saves ``checkpoint_latest.pt`` first), the worker's signals are
    disconnected so no callback reaches a deleted widget, and no thread is left running.

    Returns:
        True when the worker finished within ``timeout``.
    """
    if worker is None or stop is None:
        return True
    stop.set()
    for signal in ("yielded", "returned", "errored", "finished"):
        try:
            getattr(worker, signal).disconnect()
        except (TypeError, RuntimeError, AttributeError):  # nothing connected / already gone
            pass
    # No worker.quit(): napari would then abandon the generator un-closed; with ``stop`` set,
    # _drive closes the engine in the worker thread (training saves) and returns.
    done = getattr(stop, "done", None)
    finished = done.wait(timeout) if done is not None else True
    if not finished:
        logger.warning("The engine worker did not stop within %.0f s of closing the viewer", timeout)
    return finished


class EngineJobOwner(MedsegPanel):
    """For widgets that run one engine job at a time in ``self.worker`` (a :class:`MedsegPanel`).

    The widget keeps ``worker`` and ``_stop`` (from :func:`start_engine_worker`) and ``_progress``
    (a :class:`ProgressRelay` or None).
    """

    worker = None
    _stop: threading.Event | None = None
    _progress = None
    _close_watcher = None

    @property
    def stop_flag(self) -> threading.Event | None:
        """The running job's stop flag (set by Stop/Cancel; the worker's ``done`` is set when its
        thread has finished), or ``None`` before the first job."""
        return self._stop

    def watch_window_close(self) -> None:
        """Stop the job when the main window closes (call when a job starts: the widget is docked).

        The window is found from the widget's own parents (Qt's public API): napari hands plugin
        widgets a proxy of the viewer whose private ``window._qt_window`` must not be used.
        """
        root = self
        while root.parentWidget() is not None:  # a floating dock keeps the main window as parent
            root = root.parentWidget()
        if root is self:
            return  # not docked anywhere: nothing to watch
        if self._close_watcher is not None and self._close_watcher.parent() is root:
            return
        self._close_watcher = _CloseWatcher(root, self.shutdown)

    def shutdown(self, timeout: float = 120.0) -> bool:
        """Viewer closing: stop the job at its next yield and wait for its thread (training saves
        ``checkpoint_latest.pt`` first; prediction adds nothing)."""
        worker, stop = self.worker, self._stop
        self.worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        return shutdown_worker(worker, stop, timeout)


class _CloseWatcher(QObject):
    """Calls ``callback`` when the watched window receives its Close event."""

    def __init__(self, window: QObject, callback: Callable[[], None]):
        super().__init__(window)
        self._callback = callback
        window.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt API
        from qtpy.QtCore import QEvent

        if event.type() == QEvent.Close:
            try:
                self._callback()
            except Exception:  # noqa: BLE001 - closing must go on
                logger.warning("error while stopping a worker on close", exc_info=True)
        return False


class ProgressRelay:
    """Forward engine ``Progress`` events to a napari progress bar, one stage at a time.

    A step within a stage is shown at most every :attr:`min_interval` seconds (a new stage and a
    stage's last step always): napari's progress widgets re-lay out their labels on every change,
    and a prediction yields one event per tile pass.
    """

    min_interval = 0.25

    def __init__(self, description: str):
        from napari.utils import progress

        self._pbar = progress(total=0, desc=description)
        self._stage: str | None = None
        self._shown_at = 0.0

    def update(self, stage: str, current: int, total: int, message: str = "") -> None:
        import time

        pbar = self._pbar
        now = time.monotonic()
        if stage != self._stage or (total and total != pbar.total):
            self._stage = stage
            pbar.total = max(int(total), 0)
            pbar.n = 0
        elif now - self._shown_at < self.min_interval and not (total and current >= total):
            return
        self._shown_at = now
        desc = f"{stage}: {message}" if message else stage
        pbar.set_description(desc)
        step = int(current) - int(pbar.n)
        if step:
            pbar.update(step)

    @property
    def value(self) -> int:
        return int(self._pbar.n)

    @property
    def total(self) -> int:
        return int(self._pbar.total or 0)

    def close(self) -> None:
        self._pbar.close()


# ---------------------------------------------------------------------------------- combos
LOADING_TEXT = "loading…"


class DeviceCombo(QComboBox):
    """``auto``, ``cuda:N``, ``mps`` and ``cpu``; devices missing on this machine are greyed out.

    Until torch is imported every entry is offered; then the missing ones are greyed out (a
    selection of a missing device falls back to ``auto``).
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._fill(None)
        self.setToolTip("auto: the first CUDA GPU, else Apple MPS, else the CPU")
        when_engine_ready(self, self._check_devices)

    def _fill(self, available: set[str] | None) -> None:
        current = self.currentText() or "auto"
        cudas = sorted(d for d in (available or ()) if d.startswith("cuda")) or ["cuda:0"]
        model = QStandardItemModel(self)
        for name in ["auto", *cudas, "mps", "cpu"]:
            item = QStandardItem(name)
            if available is not None and name != "auto" and name not in available:
                item.setEnabled(False)
                item.setToolTip(f"{name} is not available on this machine")
            model.appendRow(item)
        self.setModel(model)
        idx = self.findText(current)
        self.setCurrentIndex(idx if idx >= 0 and self.is_enabled(current) else 0)

    def _check_devices(self) -> None:
        from napari_medseg.engine.runtime import available_devices

        self._fill(set(available_devices()))

    def device(self) -> str:
        return self.currentText()

    def is_enabled(self, name: str) -> bool:
        idx = self.findText(name)
        return idx >= 0 and bool(self.model().item(idx).isEnabled())


class ModelCombo(QComboBox):
    """Registered architectures grouped by family (family headers are not selectable).

    Shows a disabled "loading…" entry until the model registry is imported; :meth:`set_model`
    called before that takes effect when the list fills, and ``model_name()`` meanwhile names the
    architecture that will be selected (``""`` for "any").
    """

    def __init__(self, parent: QWidget | None = None, any_text: str | None = None):
        super().__init__(parent)
        self._any_text = any_text
        self._wanted = "" if any_text else "unet-3d-fullres"
        self.loaded = False
        self.addItem(f"{LOADING_TEXT} (the model registry)")
        when_engine_ready(self, self._fill, self._failed)

    def _failed(self, message: str) -> None:
        self.setItemText(0, f"unavailable: {message}")

    def _fill(self) -> None:
        from napari_medseg.models import get_model_spec, list_models

        model = QStandardItemModel(self)
        if self._any_text:
            item = QStandardItem(self._any_text)
            item.setData("", PATH_ROLE)
            model.appendRow(item)
        families: dict[str, list[str]] = {}
        for name in list_models():
            families.setdefault(get_model_spec(name).family, []).append(name)
        for family in sorted(families):
            header = QStandardItem(f"── {family} ──")
            header.setEnabled(False)
            header.setSelectable(False)
            model.appendRow(header)
            for name in families[family]:
                spec = get_model_spec(name)
                dims = "/".join(f"{d}D" for d in spec.spatial_dims)
                item = QStandardItem(f"  {name}  ({dims})")
                item.setData(name, PATH_ROLE)
                item.setToolTip(f"{spec.description}\n{spec.paper}")
                model.appendRow(item)
        self.loaded = True
        self.blockSignals(True)
        self.setModel(model)
        self.blockSignals(False)
        self.set_model(self._wanted)
        self.currentIndexChanged.emit(self.currentIndex())  # listeners see the filled list

    def model_name(self) -> str:
        return (self.currentData(PATH_ROLE) or "") if self.loaded else self._wanted

    def set_model(self, name: str) -> bool:
        if not self.loaded:
            self._wanted = name
            return False
        for row in range(self.count()):
            if self.itemData(row, PATH_ROLE) == name:
                self.setCurrentIndex(row)
                return True
        for row in range(self.count()):  # fall back to the first selectable entry
            if self.itemData(row, PATH_ROLE) is not None:
                self.setCurrentIndex(row)
                break
        return False


def describe_checkpoint(info) -> str:
    """One line for a checkpoint: model, channels -> classes and their names."""
    names = ", ".join(info.foreground_names) or "no foreground class"
    return (
        f"{info.model_name} ({info.spatial_dims}D) · {info.in_channels} channel(s) → "
        f"{info.num_classes} classes: {names}"
    )


class CheckpointPicker(QWidget):
    """A combo of catalogue checkpoints (shipped first) and a "Browse..." button.

    Shows "loading…" until the engine is imported (``loaded`` is False meanwhile and
    ``current_info()`` is ``None``); then fills and emits ``changed``.

    Signals:
        changed: The selected checkpoint changed (``current_info()`` may be ``None``).
    """

    changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(8)
        self.browse_button = QPushButton("Browse...")
        self.refresh_button = QToolButton()
        self.refresh_button.setText("⟳")
        self.refresh_button.setToolTip("Reload the checkpoint catalogue")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.refresh_button)
        row.addWidget(self.browse_button)
        self._infos: dict[str, Any] = {}
        self._extra_paths: list[str] = []
        self._model_filter = ""
        self.loaded = False  # the catalogue has been read (the engine is imported)
        self.combo.currentIndexChanged.connect(lambda _i: self.changed.emit())
        self.browse_button.clicked.connect(self._browse)
        self.refresh_button.clicked.connect(self.refresh)
        catalog_events().changed.connect(self.refresh)
        self.combo.addItem(f"{LOADING_TEXT} (the checkpoint catalogue)", None)
        when_engine_ready(self, self.refresh, lambda msg: self.combo.setItemText(0, f"unavailable: {msg}"))

    def set_model_filter(self, model_name: str) -> None:
        """Only list checkpoints of this architecture (``""``: all)."""
        self._model_filter = model_name or ""
        self.refresh()

    def refresh(self) -> None:
        """Reload the catalogue, keeping the selection when it is still listed (once the engine
        is imported; until then the "loading…" entry stays and the list fills when it is)."""
        if engine_ready():
            self._reload()

    def _reload(self) -> None:
        from napari_medseg.engine.checkpoints import checkpoint_info, list_checkpoints

        current = self.current_path()
        infos = list_checkpoints()
        for path in self._extra_paths:
            if all(i.path != path for i in infos):
                try:
                    infos.append(checkpoint_info(path))
                except Exception as err:  # noqa: BLE001 - keep the list usable
                    logger.warning("Dropping %s from the list: %s", path, err)
        self._infos = {i.path: i for i in infos}
        self.combo.blockSignals(True)
        self.combo.clear()
        shown = [i for i in infos if not self._model_filter or i.model_name == self._model_filter]
        if not shown:
            self.combo.addItem("(no checkpoint: train one or Browse...)", None)
        for info in shown:
            label = f"★ {info.name}" if info.shipped else info.name
            what = ", ".join(info.foreground_names[:4])
            if what:
                label += f" — {what}" + ("…" if len(info.foreground_names) > 4 else "")
            self.combo.addItem(label, info.path)
            tip = [describe_checkpoint(info), info.description, f"Training data: {info.training_data}"
                   if info.training_data else "", f"Licence: {info.license}" if info.license else "",
                   info.path]
            self.combo.setItemData(self.combo.count() - 1, "\n".join(t for t in tip if t), Qt.ToolTipRole)
        idx = self.combo.findData(current) if current else -1
        self.combo.setCurrentIndex(max(idx, 0))
        self.combo.blockSignals(False)
        self.loaded = True
        self.changed.emit()

    def add_path(self, path: str) -> None:
        """Add a checkpoint file (e.g. browsed to) and select it.

        Raises:
            CheckpointError: if the file is not a readable checkpoint.
        """
        import os

        from napari_medseg.engine.checkpoints import checkpoint_info

        path = os.path.realpath(path)
        checkpoint_info(path)  # raises with a clear message
        if path not in self._extra_paths:
            self._extra_paths.append(path)
        self._model_filter = ""
        self._reload()  # the engine is imported now (checkpoint_info above), even mid-way in the background
        self.combo.setCurrentIndex(self.combo.findData(path))

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a checkpoint", "", "Checkpoints (*.pt *.pth)")
        if path:
            try:
                self.add_path(path)
            except Exception as err:  # noqa: BLE001 - shown to the user
                from napari.utils.notifications import show_error

                show_error(str(err))

    def current_path(self) -> str | None:
        return self.combo.currentData() if hasattr(self, "combo") else None

    def current_info(self):
        path = self.current_path()
        return self._infos.get(path) if path else None

    def infos(self) -> list:
        return list(self._infos.values())
