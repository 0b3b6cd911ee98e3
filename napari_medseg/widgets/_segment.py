"""The Segment widget: pick an image and a checkpoint, run ``engine.predict`` in a worker.

The result becomes a Labels layer on the image's exact grid (scale, translate, affine and the
``medseg_geometry`` metadata are copied), so "Save..." writes a NIfTI that overlays the source scan.

The engine gets the image layer's world geometry as an affine (layers this plugin read: their world
is RAS+), so it can reorient the image to the orientation the model was trained in. An image far
outside the model's training domain stops before any compute with a one-line reason; the widget
asks whether to segment anyway (:meth:`SegmentWidget.ask_force`) and reruns with ``force=True``.

**Nothing big runs in napari's event loop.** The worker thread that predicts also builds the result
(:func:`prepare_result`): the napari layers themselves (``Labels``/``Image`` objects, made with
explicit contrast limits and features, so napari computes nothing over the volume when they are
added), the voxels per class, the legend and the copy of the labels that partial-label fine-tuning
compares edits against. The GUI thread then only adds the ready layers, one per turn of the event
loop (:meth:`SegmentWidget._add_next_layer`), so that a probability layer per class does not add up
to one long freeze; the run counts as running until the last one is in.
"""

from __future__ import annotations

import copy
import html
import logging
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import (
    CheckpointPicker,
    DeviceCombo,
    EngineJobOwner,
    ModelCombo,
    ProgressBar,
    ProgressRelay,
    Stopped,
    describe_checkpoint,
    short_path,
    show_status,
    start_engine_worker,
    status_label,
    watch_viewer,
)
from ._layers import ChannelPicker, InputError, LayerCombo, resolve_image_input

logger = logging.getLogger(__name__)


class SegmentWidget(EngineJobOwner, QWidget):
    """Segment an image layer with a trained checkpoint (sliding window, optional mirroring TTA).

    Args:
        napari_viewer: The viewer (npe2 passes it).

    Signals:
        segmented(object): the labels layer a run added (after its status is set).
    """

    segmented = Signal(object)

    def __init__(self, napari_viewer):
        super().__init__()
        from napari.layers import Labels

        self.viewer = napari_viewer
        watch_viewer(napari_viewer)
        self.worker = None
        self._stop = None
        self._progress: ProgressRelay | None = None
        self.last_result = None
        self.last_counts: np.ndarray | None = None
        self.result_layer = None
        self._succeeded = False
        self._pending: PreparedResult | None = None  # layers still to add, one per event-loop turn
        self._worker_done = True
        self._add_timer = QTimer(self)
        self._add_timer.setSingleShot(True)
        self._add_timer.setInterval(0)
        self._add_timer.timeout.connect(self._add_next_layer)
        self._domain_question: str | None = None  # a DomainError to ask about once the run has ended

        # --- input
        self.channels = ChannelPicker(self.viewer)
        self.channels.setToolTip(
            "One image layer per channel, in the order the model was trained with. A multi-channel "
            "NIfTI opens as one layer per channel; a 4-D layer is read as (C, z, y, x)."
        )
        # --- model
        self.architecture = ModelCombo(any_text="All architectures")
        self.architecture.setToolTip("Filters the checkpoint list; a checkpoint defines its architecture.")
        self.checkpoints = CheckpointPicker()
        self.model_info = status_label()
        # --- options
        self.device = DeviceCombo()
        self.mirror = QCheckBox("Mirroring test-time augmentation")
        self.mirror.setChecked(True)
        self.mirror.setToolTip("Average the predictions of all axis flips (2^3 = 8 passes in 3D): better, slower.")
        self.step = QDoubleSpinBox()
        self.step.setRange(0.1, 1.0)
        self.step.setSingleStep(0.05)
        self.step.setValue(0.5)
        self.step.setToolTip("Tile stride as a fraction of the patch (0.5: tiles overlap by half)")
        self.batch = QSpinBox()
        self.batch.setRange(1, 64)
        self.batch.setValue(1)
        self.largest = QCheckBox("Keep the largest component per class")
        self.largest.setToolTip(
            "Remove every island but the largest of each class (one per side for classes that hold a "
            "left and a right structure). Set from the checkpoint's recommendation when you choose it."
        )
        self.probabilities = QCheckBox("Add probabilities as image layers")
        self.uncertainty = QCheckBox("Add uncertainty (entropy) as an image layer")
        # --- run
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = ProgressBar()
        self.progress_bar.setFormat("not run yet")  # no fake total before a run
        self.progress_bar.setValue(0)
        self._tiles_started: float | None = None
        self._tile_passes = 0  # the tile passes of the run (the bar shows other stages as "busy")
        self.status = status_label()
        # --- result
        self.legend = status_label()
        self.save_layer = LayerCombo(self.viewer, Labels)
        self.save_button = QPushButton("Save...")
        self.save_button.setToolTip("Save the labels as NIfTI with the source scan's geometry")

        self._build_layout()
        self.architecture.currentIndexChanged.connect(self._on_architecture)
        self.checkpoints.changed.connect(self._on_checkpoint)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.save_button.clicked.connect(lambda: self.save_labels())
        self._on_checkpoint()

    # ---------------------------------------------------------------------------- layout
    def _build_layout(self) -> None:
        box_in = QGroupBox("Image")
        form = QFormLayout(box_in)
        form.addRow("Channels:", self.channels)

        box_model = QGroupBox("Model")
        form = QFormLayout(box_model)
        form.addRow("Architecture:", self.architecture)
        form.addRow("Checkpoint:", self.checkpoints)
        form.addRow(self.model_info)

        box_opt = QGroupBox("Options")
        form = QFormLayout(box_opt)
        form.addRow("Device:", self.device)
        form.addRow(self.mirror)
        form.addRow("Tile step:", self.step)
        form.addRow("Tiles per batch:", self.batch)
        form.addRow(self.largest)
        form.addRow(self.probabilities)
        form.addRow(self.uncertainty)

        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)

        box_out = QGroupBox("Result")
        out = QVBoxLayout(box_out)
        out.addWidget(self.legend)
        save_row = QHBoxLayout()
        save_row.addWidget(self.save_layer, 1)
        save_row.addWidget(self.save_button)
        out.addLayout(save_row)

        layout = QVBoxLayout(self)
        for w in (box_in, box_model, box_opt):
            layout.addWidget(w)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(box_out)
        layout.addStretch(1)

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.checkpoints.refresh()  # a run trained meanwhile appears here
        super().showEvent(event)

    # -------------------------------------------------------------------------- choices
    def _on_architecture(self, *_args) -> None:
        self.checkpoints.set_model_filter(self.architecture.model_name())

    def _on_checkpoint(self, *_args) -> None:
        info = self.checkpoints.current_info()
        if info is None:
            self.model_info.setText("No checkpoint chosen: train one, or Browse... to a .pt file.")
            return
        self.architecture.blockSignals(True)
        self.architecture.set_model(info.model_name)  # the checkpoint defines its architecture
        self.architecture.blockSignals(False)
        self.largest.setChecked(info.largest_component)  # the checkpoint's recommended post-processing
        lines = [describe_checkpoint(info)]
        if info.description:
            lines.append(info.description)
        if info.training_data:
            lines.append(f"Trained on: {info.training_data}")
        if info.dice:
            lines.append("Dice: " + ", ".join(f"{k} {v:.2f}" for k, v in info.dice.items()))
        self.model_info.setText("\n".join(lines))

    # ------------------------------------------------------------------------------- run
    @property
    def running(self) -> bool:
        """A prediction runs, or its result layers are still being added."""
        return self.worker is not None or self._pending is not None

    def run(self, *_args, force: bool = False) -> None:
        """Check the inputs, then start ``engine.predict`` in a worker thread.

        Args:
            force: Segment even an image far outside the model's training domain (set when the
                user answered "yes" to :meth:`ask_force`).
        """
        if self.running:
            return
        from napari_medseg.engine.checkpoints import CheckpointError, check_compatible
        from napari_medseg.engine.inference import PredictConfig, predict

        try:
            image = resolve_image_input(self.channels.layers())
            info = self.checkpoints.current_info()
            if info is None:
                raise InputError("Choose a checkpoint (or Browse... to a .pt file) first.")
            check_compatible(SimpleNamespace(in_channels=info.in_channels, spatial_dims=info.spatial_dims),
                             image.num_channels, image.spatial_dims)
        except (InputError, CheckpointError) as err:
            show_status(self.status, f"Cannot segment: {err}", error=True)
            return

        options = PredictConfig(
            device=self.device.device(), mirror=self.mirror.isChecked(), step=float(self.step.value()),
            batch_size=int(self.batch.value()), largest_component=self.largest.isChecked(),
            return_probabilities=self.probabilities.isChecked(),
            return_uncertainty=self.uncertainty.isChecked(), force=force,
        )
        affine = image_affine(image)
        path = info.path
        plan = ResultPlan.of(image, info)
        self._succeeded = False
        self._progress = ProgressRelay(f"Segmenting {image.reference.name}")
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setFormat("starting…")
        self._tiles_started = None
        self._tile_passes = 0
        show_status(self.status, f"Segmenting {image.reference.name} with {info.name}...")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        logger.info("predict(%s, %s, %s)", image.reference.name, path, options)
        self.watch_window_close()
        self._worker_done = False

        def job():  # runs in the worker thread: reading the layers, predicting, building the result
            from napari_medseg.engine.jobs import Progress

            result = yield from predict(image.array(), image.spacing, [path], options, affine=affine)
            yield Progress("layers", 0, 0, "building the result layers")
            return prepare_result(result, plan)

        self.worker, self._stop = start_engine_worker(
            job, on_yield=self._on_event, on_return=self._on_result, on_error=self._on_error,
            on_finish=self._on_finish,
        )

    def cancel(self) -> None:
        """Stop the running prediction at its next tile; nothing is added."""
        if self.worker is None:
            return
        self._stop.set()  # the worker closes the engine at its next tile and returns Stopped
        show_status(self.status, "Cancelling...")

    def _on_event(self, event) -> None:
        stage = getattr(event, "stage", None)
        if stage is None or self.worker is None:  # late event of a finished run
            return
        if event.message.startswith("Out of memory"):  # the engine's fallback ladder took a step
            show_status(self.status, event.message)
        if stage == "tiles" and event.total:
            self.progress_bar.setRange(0, int(event.total))
            self.progress_bar.setValue(int(event.current))
            self._tile_passes = int(event.total)
            self.progress_bar.setFormat(tiles_text(event, self._tiles_started))
            if self._tiles_started is None:
                self._tiles_started = time.perf_counter()
        elif stage != "tiles":
            self.progress_bar.setRange(0, 0)  # busy: stages without a count show their name only
            self.progress_bar.setFormat(f"{stage}…")
        # Last: napari's progress widgets may process pending events (even this run's end).
        if self._progress is not None:
            self._progress.update(stage, event.current, event.total, event.message)

    def _on_error(self, err: Exception) -> None:
        from napari_medseg.engine.inference.config import DomainError

        if isinstance(err, DomainError):  # raised before any compute: ask once the worker has ended
            self._domain_question = str(err)
            show_status(self.status, f"Not segmented: {err}", error=True)
            return
        show_status(self.status, f"Segmentation failed: {err}", error=True)

    def ask_force(self, message: str) -> bool:
        """Ask whether to segment an image the engine found far outside the model's training domain.

        ``message`` is the engine's one-line reason. Returns True for "Yes" (tests replace this method).
        """
        answer = QMessageBox.question(
            self, "Segment anyway?", f"{message}\n\nSegment it anyway?",
            QMessageBox.Yes | QMessageBox.No, QMessageBox.No,
        )
        return answer == QMessageBox.Yes

    def _on_finish(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.worker is not None and self._stop is not None and self._stop.is_set():
            if not self.status.text().startswith("Cancelled"):
                show_status(self.status, "Cancelled: no layer was added.")
        self.worker = None
        self._worker_done = True
        if self._pending is None:  # else once the last result layer is in (_add_next_layer)
            self._end_run()

    def _end_run(self) -> None:
        """The run is over (its layers added): buttons, the progress bar, a pending domain question."""
        self.progress_bar.setRange(0, self._tile_passes or max(self.progress_bar.maximum(), 1))
        if self._succeeded:
            self.progress_bar.setValue(self.progress_bar.maximum())
            self.progress_bar.setFormat("done: %v / %m tile passes")
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        question, self._domain_question = self._domain_question, None
        if question is not None:
            if self.ask_force(question):
                self.run(force=True)
            else:
                show_status(self.status, f"Not segmented: {question}", error=True)

    def _on_result(self, result) -> None:
        """The worker's result (GUI thread): a :class:`PreparedResult`, whose layers are added one
        per event-loop turn from here on (no array work here)."""
        if result is None or isinstance(result, Stopped):
            show_status(self.status, "Cancelled: no layer was added.")
            return
        if not isinstance(result, PreparedResult):  # pragma: no cover - the job always prepares
            show_status(self.status, f"Could not add the result: unexpected {type(result).__name__}", error=True)
            return
        self._pending = result
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setFormat("adding the result layers…")
        self._add_timer.start()

    # ----------------------------------------------------------------------------- layers
    def _add_next_layer(self) -> None:
        """Add the next ready-made result layer; after the labels (the last), finish the run."""
        prepared = self._pending
        if prepared is None:
            return
        try:
            layer = prepared.layers[prepared.added]
            self.viewer.add_layer(layer)
            prepared.added += 1
            if prepared.added < len(prepared.layers):
                self._add_timer.start()  # the next one in the next turn of the event loop
                return
            self._finish_result(prepared)
        except Exception as err:  # noqa: BLE001 - shown to the user
            show_status(self.status, f"Could not add the result: {err}", error=True)
        self._pending = None
        if self._worker_done:
            self._end_run()

    def _finish_result(self, prepared: PreparedResult) -> None:
        from ._partial import tracker_for

        layer = prepared.labels
        self.result_layer = layer
        self.legend.setText(f"<b>{html.escape(layer.name)}</b><br>{prepared.legend}")
        self.save_layer.set_layer(layer)
        # baseline for partial-label fine-tuning: this prediction (copied in the worker)
        tracker_for(layer, self.viewer, baseline=prepared.baseline)
        self.last_result = prepared.result
        self.last_counts = prepared.counts
        self._succeeded = True
        names = prepared.names
        found = [f"{names.get(k, k)}: {int(n):,} voxels" for k, n in enumerate(prepared.counts) if k and n]
        show_status(self.status, f"Done: added {layer.name!r}. " + ("; ".join(found) or "No foreground found."))
        self.segmented.emit(layer)

    def shutdown(self, timeout: float = 120.0) -> bool:
        """Viewer closing: also drop result layers not added yet."""
        self._add_timer.stop()
        self._pending = None
        return super().shutdown(timeout)

    # ------------------------------------------------------------------------------- save
    def save_labels(self, path: str | None = None) -> list[str]:
        """Save the chosen Labels layer as NIfTI through the plugin's writer (asks for a path)."""
        from napari_medseg._writer import write_labels

        layer = self.save_layer.layer()
        if layer is None:
            show_status(self.status, "No labels layer to save.", error=True)
            return []
        if path is None:
            default = os.path.join(os.path.expanduser("~"), f"{layer.name.replace(' ', '_')}.nii.gz")
            path, _ = QFileDialog.getSaveFileName(self, "Save labels", default, "NIfTI (*.nii.gz *.nii)")
            if not path:
                return []
        if not path.endswith((".nii", ".nii.gz")):
            path += ".nii.gz"
        try:
            written = write_labels(path, layer.data, layer.as_layer_data_tuple()[1])
        except Exception as err:  # noqa: BLE001 - shown to the user
            show_status(self.status, f"Could not save {path}: {err}", error=True)
            return []
        show_status(self.status, f"Saved {layer.name!r} to {short_path(written[0], 3)}")
        self.status.setToolTip(written[0])
        return written


@dataclass
class ResultPlan:
    """What the result layers take from the image and checkpoint, read when the run starts (GUI thread).

    Attributes:
        name: The image layer's name (result layers are called after it).
        transform: ``scale``, ``translate``, ``rotate``, ``shear`` and ``affine`` of the image's spatial axes.
        geometry: Its ``medseg_geometry`` metadata (a copy), or ``None``.
        source: Its ``medseg_source`` metadata, or ``None``.
        checkpoint: The checkpoint's path.
    """

    name: str
    transform: dict
    geometry: dict | None
    source: str | None
    checkpoint: str

    @classmethod
    def of(cls, image, info) -> ResultPlan:
        ref = image.reference
        geometry = ref.metadata.get("medseg_geometry")
        return cls(name=ref.name, transform=image.spatial_transform(),
                   geometry=copy.deepcopy(geometry) if isinstance(geometry, dict) else None,
                   source=ref.metadata.get("medseg_source") or None, checkpoint=info.path)

    def metadata(self, names: dict, kind: str) -> dict:
        meta: dict = {}
        if self.geometry is not None:
            geometry = copy.deepcopy(self.geometry)
            geometry["channel_axis"] = None  # every result layer is one spatial volume
            meta["medseg_geometry"] = geometry
        if self.source:
            meta["medseg_source"] = self.source
        meta["medseg_label_names"] = {str(k): v for k, v in names.items()}
        meta["medseg_checkpoint"] = self.checkpoint
        meta["medseg_kind"] = kind
        return meta


@dataclass
class PreparedResult:
    """A prediction made ready for the viewer in the worker thread (:func:`prepare_result`).

    Attributes:
        result: The engine's ``PredictionResult``.
        layers: The napari layers, in the order they are added (probabilities, uncertainty, labels).
        labels: The Labels layer (the last of ``layers``).
        names: Class index -> name.
        counts: Voxels per class (index = class).
        baseline: A copy of the labels: what partial-label fine-tuning compares edits against.
        legend: The legend's rows (HTML): a colour swatch and name per foreground class.
        added: How many of ``layers`` the GUI thread has added so far.
    """

    result: Any
    layers: list
    labels: Any
    names: dict
    counts: np.ndarray
    baseline: np.ndarray
    legend: str
    added: int = field(default=0)


def prepare_result(result, plan: ResultPlan) -> PreparedResult:
    """Build the result layers of a prediction and everything shown about them (worker thread).

    napari's layer objects hold no Qt state until they are added to a viewer, so they are made
    here; contrast limits are given, so napari scans no volume for them, and the class names go in
    as the Labels layer's features at construction.
    """
    from napari.layers import Image, Labels

    names = {int(k): str(v) for k, v in result.label_names.items()}
    transform = plan.transform
    layers = []
    if result.probabilities is not None:
        for k in range(1, result.probabilities.shape[0]):
            layers.append(Image(
                result.probabilities[k], name=f"{plan.name} p({names.get(k, k)})", colormap="magma",
                blending="additive", visible=False, contrast_limits=(0.0, 1.0),
                metadata=plan.metadata(names, "probability"), **transform,
            ))
    if result.uncertainty is not None:
        layers.append(Image(
            result.uncertainty, name=f"{plan.name} uncertainty", colormap="inferno", opacity=0.6,
            blending="additive", contrast_limits=(0.0, 1.0), metadata=plan.metadata(names, "uncertainty"),
            **transform,
        ))
    values = list(range(max(names) + 1 if names else 1))
    kwargs = dict(name=f"{plan.name} segmentation", opacity=0.5, metadata=plan.metadata(names, "labels"), **transform)
    try:  # class names as features: the status bar names the class under the cursor
        labels = Labels(result.labels, features={"index": values, "name": [names.get(v, f"class_{v}") for v in values]},
                        **kwargs)
    except Exception:  # noqa: BLE001 - features are a convenience
        logger.debug("could not set label features", exc_info=True)
        labels = Labels(result.labels, **kwargs)
    layers.append(labels)
    counts = count_labels(result.labels, len(names))
    return PreparedResult(result=result, layers=layers, labels=labels, names=names, counts=counts,
                          baseline=np.array(labels.data, copy=True), legend=legend_html(labels, names))


def count_labels(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Voxels per label value (``np.bincount`` of the whole volume, a slab at a time so that no
    int64 copy of a large volume is made)."""
    flat = np.asarray(labels).reshape(-1)
    counts = np.zeros(max(int(minlength), 1), np.int64)
    step = 1 << 22
    for start in range(0, flat.size, step):
        part = np.bincount(flat[start:start + step], minlength=counts.size)
        if part.size > counts.size:
            part[: counts.size] += counts
            counts = part
        else:
            counts += part
    return counts


def legend_html(layer, names: dict) -> str:
    """The rows of a Labels layer's legend: a colour swatch and name per foreground class."""
    rows = []
    for value, name in sorted(names.items()):
        if value == 0:
            continue
        try:
            rgba = np.asarray(layer.get_color(value), float)
            color = "#" + "".join(f"{int(round(255 * c)):02x}" for c in rgba[:3])
        except Exception:  # noqa: BLE001
            color = "#888888"
        rows.append(f"<span style='background-color:{color}'>&nbsp;&nbsp;&nbsp;&nbsp;</span> "
                    f"{value}: {html.escape(name)}")
    return "<br>".join(rows)


def tiles_text(event, started: float | None) -> str:
    """The progress bar's text for a ``tiles`` event: counts, what they count, and an ETA."""
    text = f"%v / %m tile passes ({event.message})" if event.message else "%v / %m tiles"
    if started is not None and event.current:
        elapsed = time.perf_counter() - started
        left = elapsed / max(event.current - 1, 1) * (event.total - event.current)
        text += f" · about {int(left) // 60}:{int(left) % 60:02d} left"
    return text


def image_affine(image) -> np.ndarray | None:
    """The 4x4 voxel-to-RAS+ affine of the array the engine gets from ``image`` (an ``ImageInput``).

    Measured through the reference layer's whole data-to-world transform (so a layer shown with
    permuted axes, flips or an oblique affine gives the right matrix). ``None`` for layers this
    plugin did not read (no ``medseg_geometry`` metadata): their world is not known to be RAS+,
    so the engine does not reorient them.
    """
    from napari_medseg.io import affine_from_napari

    ref = image.reference
    if not isinstance(getattr(ref, "metadata", {}).get("medseg_geometry"), dict):
        return None
    n = image.spatial_dims
    lead = (0,) * (ref.ndim - n)
    origin = np.asarray(ref.data_to_world(lead + (0,) * n), dtype=np.float64)[-n:]
    matrix = np.eye(n + 1)
    for axis in range(n):
        step = tuple(int(a == axis) for a in range(n))
        matrix[:n, axis] = np.asarray(ref.data_to_world(lead + step), dtype=np.float64)[-n:] - origin
    matrix[:n, n] = origin
    try:
        return affine_from_napari(matrix)
    except ValueError:
        return None
