"""Pieces shared by the widgets: pickers, the engine worker, error display. No compute here."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtGui import QStandardItem, QStandardItemModel
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QWidget,
)

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


# ---------------------------------------------------------------------------------- messages
def status_label() -> QLabel:
    """A word-wrapping label that never forces its dock wider (long paths are clipped)."""
    label = QLabel()
    label.setWordWrap(True)
    label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
    label.setMinimumWidth(50)
    label.setTextInteractionFlags(Qt.TextSelectableByMouse)
    return label


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


class EngineJobOwner:
    """For widgets that run one engine job at a time in ``self.worker``.

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
    """Forward engine ``Progress`` events to a napari progress bar, one stage at a time."""

    def __init__(self, description: str):
        from napari.utils import progress

        self._pbar = progress(total=0, desc=description)
        self._stage: str | None = None

    def update(self, stage: str, current: int, total: int, message: str = "") -> None:
        pbar = self._pbar
        if stage != self._stage or (total and total != pbar.total):
            self._stage = stage
            pbar.total = max(int(total), 0)
            pbar.n = 0
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
class DeviceCombo(QComboBox):
    """``auto``, ``cuda:N``, ``mps`` and ``cpu``; devices missing on this machine are greyed out."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        from napari_medseg.engine.runtime import available_devices

        available = set(available_devices())
        cudas = [d for d in available if d.startswith("cuda")] or ["cuda:0"]
        model = QStandardItemModel(self)
        for name in ["auto", *sorted(cudas), "mps", "cpu"]:
            item = QStandardItem(name)
            if name != "auto" and name not in available:
                item.setEnabled(False)
                item.setToolTip(f"{name} is not available on this machine")
            model.appendRow(item)
        self.setModel(model)
        self.setToolTip("auto: the first CUDA GPU, else Apple MPS, else the CPU")

    def device(self) -> str:
        return self.currentText()

    def is_enabled(self, name: str) -> bool:
        idx = self.findText(name)
        return idx >= 0 and bool(self.model().item(idx).isEnabled())


class ModelCombo(QComboBox):
    """Registered architectures grouped by family (family headers are not selectable)."""

    def __init__(self, parent: QWidget | None = None, any_text: str | None = None):
        super().__init__(parent)
        from napari_medseg.models import get_model_spec, list_models

        model = QStandardItemModel(self)
        if any_text:
            item = QStandardItem(any_text)
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
        self.setModel(model)
        self.set_model("" if any_text else "unet-3d-fullres")

    def model_name(self) -> str:
        return self.currentData(PATH_ROLE) or ""

    def set_model(self, name: str) -> bool:
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
        self.combo.currentIndexChanged.connect(lambda _i: self.changed.emit())
        self.browse_button.clicked.connect(self._browse)
        self.refresh_button.clicked.connect(self.refresh)
        catalog_events().changed.connect(self.refresh)
        self.refresh()

    def set_model_filter(self, model_name: str) -> None:
        """Only list checkpoints of this architecture (``""``: all)."""
        self._model_filter = model_name or ""
        self.refresh()

    def refresh(self) -> None:
        """Reload the catalogue, keeping the selection when it is still listed."""
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
        self.refresh()
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
