"""The Segment widget: pick an image and a checkpoint, run ``engine.predict`` in a worker.

The result becomes a Labels layer on the image's exact grid (scale, translate, affine and the
``medseg_geometry`` metadata are copied), so "Save..." writes a NIfTI that overlays the source scan.

The engine gets the image layer's world geometry as an affine (layers this plugin read: their world
is RAS+), so it can reorient the image to the orientation the model was trained in. An image far
outside the model's training domain stops before any compute with a one-line reason; the widget
asks whether to segment anyway (:meth:`SegmentWidget.ask_force`) and reruns with ``force=True``.
"""

from __future__ import annotations

import copy
import html
import logging
import os
import time
from types import SimpleNamespace

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QMessageBox,
    QProgressBar,
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
    ProgressRelay,
    Stopped,
    describe_checkpoint,
    short_path,
    show_status,
    start_engine_worker,
    status_label,
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
        self.worker = None
        self._stop = None
        self._progress: ProgressRelay | None = None
        self.last_result = None
        self.result_layer = None
        self._succeeded = False
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
        self.probabilities = QCheckBox("Add probabilities as image layers")
        self.uncertainty = QCheckBox("Add uncertainty (entropy) as an image layer")
        # --- run
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("not run yet")  # no fake total before a run
        self.progress_bar.setValue(0)
        self._tiles_started: float | None = None
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
        return self.worker is not None

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
        self._job = (image, info)
        self._succeeded = False
        self._progress = ProgressRelay(f"Segmenting {image.reference.name}")
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setFormat("starting…")
        self._tiles_started = None
        show_status(self.status, f"Segmenting {image.reference.name} with {info.name}...")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        logger.info("predict(%s, %s, %s)", image.reference.name, path, options)
        self.watch_window_close()
        self.worker, self._stop = start_engine_worker(
            lambda: predict(image.array(), image.spacing, [path], options, affine=affine),
            on_yield=self._on_event, on_return=self._on_result, on_error=self._on_error,
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
        self.progress_bar.setRange(0, max(self.progress_bar.maximum(), 1))
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
        if result is None or isinstance(result, Stopped):
            show_status(self.status, "Cancelled: no layer was added.")
            return
        image, info = self._job
        try:
            self.result_layer = self._add_layers(result, image, info)
        except Exception as err:  # noqa: BLE001 - shown to the user
            show_status(self.status, f"Could not add the result: {err}", error=True)
            return
        self.last_result = result
        self._succeeded = True
        counts = np.bincount(result.labels.ravel(), minlength=len(result.label_names))
        found = [f"{result.label_names.get(k, k)}: {int(n):,} voxels" for k, n in enumerate(counts) if k and n]
        show_status(self.status, f"Done: added {self.result_layer.name!r}. " + ("; ".join(found) or "No foreground found."))
        self.segmented.emit(self.result_layer)

    # ----------------------------------------------------------------------------- layers
    def _add_layers(self, result, image, info):
        transform = image.spatial_transform()
        ref = image.reference
        name = ref.name
        names = {int(k): str(v) for k, v in result.label_names.items()}
        if result.probabilities is not None:
            fg = list(range(1, result.probabilities.shape[0]))
            self.viewer.add_image(
                result.probabilities[1:], channel_axis=0, name=[f"{name} p({names.get(k, k)})" for k in fg],
                colormap="magma", blending="additive", visible=False, contrast_limits=(0.0, 1.0),
                metadata=[self._metadata(ref, info, names, "probability") for _ in fg], **transform,
            )
        if result.uncertainty is not None:
            self.viewer.add_image(
                result.uncertainty, name=f"{name} uncertainty", colormap="inferno", opacity=0.6,
                blending="additive", contrast_limits=(0.0, 1.0),
                metadata=self._metadata(ref, info, names, "uncertainty"), **transform,
            )
        layer = self.viewer.add_labels(
            result.labels, name=f"{name} segmentation", opacity=0.5,
            metadata=self._metadata(ref, info, names, "labels"), **transform,
        )
        values = list(range(max(names) + 1 if names else 1))
        try:
            layer.features = {"index": values, "name": [names.get(v, f"class_{v}") for v in values]}
        except Exception:  # noqa: BLE001 - features are a convenience (hover status)
            logger.debug("could not set label features", exc_info=True)
        self._show_legend(layer, names)
        self.save_layer.set_layer(layer)
        from ._partial import tracker_for

        tracker_for(layer, self.viewer)  # baseline for partial-label fine-tuning: this prediction
        return layer

    @staticmethod
    def _metadata(ref, info, names: dict, kind: str) -> dict:
        meta = {}
        geometry = ref.metadata.get("medseg_geometry")
        if isinstance(geometry, dict):
            geometry = copy.deepcopy(geometry)
            if kind in ("labels", "uncertainty", "probability"):
                geometry["channel_axis"] = None
            meta["medseg_geometry"] = geometry
        if ref.metadata.get("medseg_source"):
            meta["medseg_source"] = ref.metadata["medseg_source"]
        meta["medseg_label_names"] = {str(k): v for k, v in names.items()}
        meta["medseg_checkpoint"] = info.path
        meta["medseg_kind"] = kind
        return meta

    def _show_legend(self, layer, names: dict) -> None:
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
        self.legend.setText(f"<b>{html.escape(layer.name)}</b><br>" + "<br>".join(rows))

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
