"""The Model library widget: registered architectures and the checkpoint catalogue, as tables.

The tables fill once the engine (torch) is imported, in the background when the widget is the
first to need it (see ``_common.when_engine_ready``), so opening the widget does not wait for it.
Parameter counts are then computed in a worker; CPU time for one default patch is measured on
demand ("Measure CPU time") and cached in the user folder.
"""

from __future__ import annotations

import logging

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._common import (
    MedsegPanel,
    _CloseWatcher,
    catalog_events,
    engine_ready,
    ignore_torch_jit_deprecations,
    show_status,
    when_engine_ready,
)

logger = logging.getLogger(__name__)

MODEL_COLUMNS = ["Model", "Family", "Dims", "Parameters", "CPU s / patch", "Checkpoints", "Paper", "Citation"]
CKPT_COLUMNS = ["Checkpoint", "Model", "Segments", "Training data", "Licence", "Dice", "Source"]


def _item(text, tooltip: str | None = None) -> QTableWidgetItem:
    item = QTableWidgetItem(str(text))
    item.setFlags(item.flags() & ~Qt.ItemIsEditable)
    if tooltip:
        item.setToolTip(tooltip)
    return item


def _wrapped(text: str) -> QLabel:
    """A heading that wraps instead of making its dock wider than the other tabs."""
    label = QLabel(text)
    label.setWordWrap(True)
    return label


class ModelLibraryWidget(MedsegPanel, QWidget):
    """Tables of the registered models and of the known checkpoints.

    Args:
        napari_viewer: The viewer (npe2 passes it; unused but kept for the npe2 contract).
    """

    def __init__(self, napari_viewer=None):
        super().__init__()
        self.viewer = napari_viewer
        self._param_worker = None
        self._time_worker = None
        self._infos: list = []
        self.models_table = QTableWidget(0, len(MODEL_COLUMNS))
        self.models_table.setHorizontalHeaderLabels(MODEL_COLUMNS)
        self.ckpt_table = QTableWidget(0, len(CKPT_COLUMNS))
        self.ckpt_table.setHorizontalHeaderLabels(CKPT_COLUMNS)
        for table in (self.models_table, self.ckpt_table):
            table.setSelectionBehavior(QAbstractItemView.SelectRows)
            table.verticalHeader().setVisible(False)
            table.setWordWrap(False)
            header = table.horizontalHeader()
            header.setSectionResizeMode(QHeaderView.Interactive)
            header.setStretchLastSection(True)
        self.measure_button = QPushButton("Measure CPU time")
        self.measure_button.setToolTip(
            "Time one forward pass of each model's default configuration over a default patch "
            "(128³ in 3D, 256² in 2D) on the CPU; results are cached in ~/.napari-medseg"
        )
        self.refresh_button = QPushButton("Refresh")
        self.status = QLabel("")
        self.status.setWordWrap(True)

        buttons = QHBoxLayout()
        buttons.addWidget(self.measure_button)
        buttons.addWidget(self.refresh_button)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addWidget(_wrapped("<b>Architectures</b> (parameters for 1 channel, 2 classes, default settings)"))
        layout.addWidget(self.models_table, 3)
        layout.addLayout(buttons)
        layout.addWidget(_wrapped("<b>Checkpoints</b> (★ shipped with the plugin; others trained by you)"))
        layout.addWidget(self.ckpt_table, 2)
        layout.addWidget(self.status)

        self.setMinimumSize(320, 300)
        self.measure_button.clicked.connect(self.measure)
        self.refresh_button.clicked.connect(self.refresh)
        catalog_events().changed.connect(self._on_catalog_changed)
        self._loading = True
        self.status.setText("Loading the model registry (importing torch)…")
        for w in (self.measure_button, self.refresh_button):
            w.setEnabled(False)
        when_engine_ready(self, self._engine_loaded,
                          lambda msg: show_status(self.status, f"Could not load the engine: {msg}", error=True))

    # ------------------------------------------------------------------------------ fill
    def _engine_loaded(self) -> None:
        self._loading = False
        self.status.setText("")
        for w in (self.measure_button, self.refresh_button):
            w.setEnabled(True)
        self.refresh()

    def _on_catalog_changed(self) -> None:
        if engine_ready():
            self.fill_checkpoints()

    def refresh(self) -> None:
        """Fill both tables; parameter counts arrive from a worker."""
        if not engine_ready():
            return
        self.fill_checkpoints()
        self.fill_models()
        self.count_parameters()

    @property
    def counting(self) -> bool:
        """Whether the tables are still loading or parameter counts are being computed."""
        return self._loading or self._param_worker is not None

    @property
    def timing(self) -> bool:
        """Whether CPU times are being measured in a worker."""
        return self._time_worker is not None

    def row_of(self, name: str) -> int:
        """The models table's row of architecture ``name`` (-1 when it is not listed)."""
        for row in range(self.models_table.rowCount()):
            item = self.models_table.item(row, 0)
            if item is not None and item.text() == name:
                return row
        return -1

    def fill_models(self) -> None:
        from napari_medseg.engine.evaluation import cached_cpu_time
        from napari_medseg.models import get_model_spec, list_models

        names = list_models()
        shipped = self._shipped_by_model()
        table = self.models_table
        table.setRowCount(len(names))
        for row, name in enumerate(names):
            spec = get_model_spec(name)
            cached = cached_cpu_time(name)
            timing = f"{cached[0]:.2f} ({'×'.join(map(str, cached[1]))})" if cached else "—"
            values = [
                _item(name, spec.description), _item(spec.family),
                _item("/".join(f"{d}D" for d in spec.spatial_dims)), _item("…"), _item(timing),
                _item(", ".join(shipped.get(name, [])) or "—"), _item(spec.paper, spec.paper),
                _item(spec.citation, spec.citation),
            ]
            for col, item in enumerate(values):
                table.setItem(row, col, item)
        table.resizeColumnsToContents()
        for col in (6, 7):
            table.setColumnWidth(col, min(table.columnWidth(col), 260))

    def fill_checkpoints(self) -> None:
        from napari_medseg.engine.checkpoints import list_checkpoints

        try:
            self._infos = list_checkpoints()
        except Exception as err:  # noqa: BLE001 - keep the widget usable
            self._infos = []
            show_status(self.status, f"Could not read the checkpoint catalogue: {err}", error=True)
        table = self.ckpt_table
        table.setRowCount(len(self._infos))
        for row, info in enumerate(self._infos):
            dice = ", ".join(f"{k} {v:.2f}" for k, v in info.dice.items()) if info.dice else "—"
            values = [
                _item(("★ " if info.shipped else "") + info.name, info.description or info.path),
                _item(f"{info.model_name} ({info.spatial_dims}D)"),
                _item(", ".join(info.foreground_names) or "—"),
                _item(info.training_data or "—", info.training_data),
                _item(info.license or "—"), _item(dice),
                _item("shipped" if info.shipped else "user", info.path),
            ]
            for col, item in enumerate(values):
                table.setItem(row, col, item)
        table.resizeColumnsToContents()
        self._fill_shipped_column()

    def _shipped_by_model(self) -> dict[str, list[str]]:
        shipped: dict[str, list[str]] = {}
        for info in self._infos:
            if info.shipped:
                shipped.setdefault(info.model_name, []).append(info.name)
        return shipped

    def _fill_shipped_column(self) -> None:
        shipped = self._shipped_by_model()
        for row in range(self.models_table.rowCount()):
            name = self.models_table.item(row, 0).text()
            self.models_table.setItem(row, 5, _item(", ".join(shipped.get(name, [])) or "—"))

    # ---------------------------------------------------------------------------- workers
    def count_parameters(self) -> None:
        """Count each model's parameters in a worker thread, filling the column as they come."""
        if self._param_worker is not None:
            return
        from napari.qt.threading import thread_worker

        from napari_medseg.engine.evaluation import default_parameter_count
        from napari_medseg.models import list_models

        def work():
            ignore_torch_jit_deprecations()  # building a timm-based model imports timm
            for name in list_models():
                try:
                    yield name, default_parameter_count(name)
                except Exception as err:  # noqa: BLE001 - one broken model must not hide the rest
                    yield name, f"error: {err}"

        self._param_worker = thread_worker(work, start_thread=False)()
        self._param_worker.yielded.connect(self._set_parameters)
        self._param_worker.finished.connect(lambda: setattr(self, "_param_worker", None))
        self._param_worker.start()
        self._watch_window_close()

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        if self.counting or self.timing:
            self._watch_window_close()

    def _watch_window_close(self) -> None:
        """Stop the workers when the main window closes (no signal may reach a deleted widget)."""
        root = self.window()
        if root is not self and getattr(self, "_close_watcher", None) is None:
            self._close_watcher = _CloseWatcher(root, self.stop_workers)

    def stop_workers(self) -> None:
        """Ask the workers to stop after the model at hand and drop their results."""
        for worker in (self._param_worker, self._time_worker):
            if worker is None:
                continue
            for signal in (worker.yielded, worker.finished):
                try:
                    signal.disconnect()
                except (TypeError, RuntimeError):
                    pass
            worker.quit()
        self._param_worker = self._time_worker = None

    def _set_parameters(self, pair) -> None:
        name, count = pair
        row = self.row_of(name)
        if row >= 0:
            text = f"{count / 1e6:.2f} M" if isinstance(count, int) else str(count)
            self.models_table.setItem(row, 3, _item(text, f"{count:,}" if isinstance(count, int) else None))

    def measure(self) -> None:
        """Time each model on the CPU in a worker (button)."""
        if self._time_worker is not None:
            return
        from napari.qt.threading import thread_worker

        from napari_medseg.engine.evaluation import measure_cpu_time
        from napari_medseg.models import list_models

        def work():
            ignore_torch_jit_deprecations()
            for name in list_models():
                yield name, None
                try:
                    yield name, measure_cpu_time(name)
                except Exception as err:  # noqa: BLE001
                    yield name, f"error: {err}"

        self.measure_button.setEnabled(False)
        show_status(self.status, "Measuring CPU time per patch...")
        self._time_worker = thread_worker(work, start_thread=False)()
        self._time_worker.yielded.connect(self._set_timing)
        self._time_worker.finished.connect(self._timing_done)
        self._time_worker.start()
        self._watch_window_close()

    def _set_timing(self, pair) -> None:
        name, value = pair
        row = self.row_of(name)
        if row < 0:
            return
        if value is None:
            text = "measuring…"
        elif isinstance(value, tuple):
            text = f"{value[0]:.2f} ({'×'.join(map(str, value[1]))})"
        else:
            text = str(value)
        self.models_table.setItem(row, 4, _item(text))

    def _timing_done(self) -> None:
        self._time_worker = None
        self.measure_button.setEnabled(True)
        show_status(self.status, "CPU times measured (seconds per forward pass, cached).")
