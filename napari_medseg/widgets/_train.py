"""The Train / Fine-tune widget: collect a ``TrainConfig``, run ``engine.train`` in a worker.

Data comes from image + labels layers in the viewer or from an nnU-Net raw dataset folder.
Fine-tuning can use only the voxels (or slices) the user corrected since the last prediction
(see :mod:`._partial`). Stop closes the engine generator, which saves ``checkpoint_latest.pt``;
Resume continues from it. A finished (or stopped) run is registered in the checkpoint catalogue,
so it appears in the Segment widget at once.

napari's event loop never waits for array or file work here: the loss curves are drawn in a
background thread (:mod:`._plots`), the partial-label summary and the per-class comparison after
"segment again" are counted in one, and the new checkpoint is read and registered in one (the
run counts as running until it is listed).
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QRadioButton,
    QScrollArea,
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
    after_warm_up,
    call_in_thread,
    catalog_events,
    short_path,
    show_status,
    start_engine_worker,
    status_label,
    watch_viewer,
)
from ._fill import FillBetweenSlicesWidget
from ._layers import ChannelPicker, InputError, LayerCombo, check_same_grid, resolve_image_input
from ._partial import MODES, tracker_for
from ._plots import TrainingCurves

logger = logging.getLogger(__name__)

_ARCH_KEYS_FROM_PLAN = ("pool_kernels", "conv_kernels", "deep_supervision")


#: The default time budget of a run, minutes (a fine-tune on a laptop CPU pays off in minutes).
DEFAULT_MINUTES = 5.0
#: Iterations per "epoch" (a curve point and a validation) in a budgeted run.
BUDGET_EPOCH_ITERATIONS = 10

#: A new model from a few painted slices: the measured recipe (``benchmarks/bench_finetune.py --k 5
#: --minutes 3 --starts scratch scratch3d``: five painted slices of a CT, 3 minutes on 2 CPU cores,
#: mean Dice on the unpainted slices 0.89-0.93 with the largest component kept; the 3D full-res U-Net
#: with the planner's settings, the architecture's default: 0.02). A 2D U-Net trains on the
#: painted slices themselves, and is small enough for a CPU.
SLICES_FROM_SCRATCH = {"model": "unet-2d", "model_kwargs": {"base_width": 16, "max_width": 128}, "batch_size": 4}

#: The augmentation choices: (shown text, ``TrainConfig.augment``).
AUGMENTATIONS = (
    ("Default (nnU-Net's)", True),
    ("Synthetic (from the labels)", "synth"),
    ("None", False),
)


class TrainWidget(EngineJobOwner, QWidget):
    """Train a model from scratch or fine-tune a checkpoint, with live loss and Dice curves.

    Args:
        napari_viewer: The viewer (npe2 passes it).
    """

    def __init__(self, napari_viewer):
        super().__init__()
        from napari.layers import Labels

        self.viewer = napari_viewer
        watch_viewer(napari_viewer)
        self.worker = None
        self._stop = None
        self._progress: ProgressRelay | None = None
        self._run: dict | None = None
        self.last_config = None
        self.last_data = None
        self.last_training_labels = None
        self.last_checkpoint: str | None = None
        self.last_epoch = None
        self.last_resegmented = None
        self.events_seen: list = []

        # --- data
        self.source_layers = QRadioButton("Layers")
        self.source_folder = QRadioButton("Dataset folder")
        self.source_folder.setToolTip("A dataset in the nnU-Net raw format: imagesTr/, labelsTr/, dataset.json")
        self.source_layers.setChecked(True)
        self._source_group = QButtonGroup(self)
        self._source_group.addButton(self.source_layers)
        self._source_group.addButton(self.source_folder)
        self.channels = ChannelPicker(self.viewer)
        self.labels = LayerCombo(self.viewer, Labels)
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("folder with imagesTr/, labelsTr/, dataset.json")
        self.folder_button = QPushButton("Browse...")
        # --- model
        self.architecture = ModelCombo()
        self.configuration = status_label()
        self.start_from = QComboBox()
        self.start_from.addItems(["From scratch", "Fine-tune a checkpoint"])
        self.checkpoints = CheckpointPicker()
        self.model_kwargs = QLineEdit()
        self.model_kwargs.setPlaceholderText('architecture options, JSON, e.g. {"base_width": 16}')
        # --- settings
        self.minutes = QDoubleSpinBox()
        self.minutes.setRange(0.0, 10000.0)
        self.minutes.setDecimals(1)
        self.minutes.setSingleStep(1.0)
        self.minutes.setValue(DEFAULT_MINUTES)
        self.minutes.setSuffix(" min")
        self.minutes.setSpecialValueText("off: epochs x iterations")
        self.minutes.setToolTip(
            "Train for this long; the learning rate decays over the time, so a short run anneals fully. "
            "Curves update every few iterations. 'off': train the epochs x iterations below."
        )
        self.epochs = _spin(1, 100000, 50)
        self.iterations = _spin(1, 100000, 250)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(0.0, 1.0)
        self.lr.setSingleStep(1e-3)
        self.lr.setSpecialValueText("auto (the model's recipe)")
        self.lr.setValue(0.0)
        self.lr.setToolTip("auto: with a time budget Adam 1e-3 (measured to converge in minutes), 3e-5 when correcting a checkpoint on its own classes; else the architecture's recipe (nnU-Net: SGD 1e-2, poly decay)")
        self.batch = _spin(0, 512, 0)
        self.batch.setSpecialValueText("auto")
        self.batch.setToolTip("auto: the planner's choice for this data and memory")
        self.patch = QLineEdit()
        self.patch.setPlaceholderText("auto (planner); or e.g. 64,128,128")
        self.device = DeviceCombo()
        self.augment = QComboBox()
        for text, value in AUGMENTATIONS:
            self.augment.addItem(text, value)
        self.augment.setToolTip(
            "Synthetic: half the patches are painted from the label maps with random contrast, shape, "
            "resolution and artefacts (domain randomisation), so that a model trained on few scans "
            "holds on scans that look different. Needs one image channel."
        )
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.0, 0.9)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.2)
        self.output = QLineEdit()
        self.output.setPlaceholderText("auto: ~/.napari-medseg/runs/<time>-<model>")
        self.output_button = QPushButton("Browse...")
        # --- partial labels
        self.partial_mode = QComboBox()
        for key, text in MODES.items():
            self.partial_mode.addItem(text, key)
        self.partial_summary = status_label()
        self.partial_reset = QPushButton("Forget edits (new baseline)")
        self.fill = FillBetweenSlicesWidget(self.viewer)
        self.fill.setToolTip("Interpolate painted slices through the volume (no model): the baseline a "
                             "fine-tuned model must beat, and a quick first draft to correct.")
        # --- run
        self.resegment = QCheckBox("Segment again with the new model")
        self.resegment.setChecked(True)
        self.resegment.setToolTip("When training ends, run Segment on the training image with the new "
                                  "checkpoint and say what changed per class.")
        self.train_button = QPushButton("Train")
        self.stop_button = QPushButton("Stop")
        self.resume_button = QPushButton("Resume")
        self.stop_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.stop_button.setToolTip("Stop within one iteration; checkpoint_latest.pt is saved")
        self.progress_bar = ProgressBar()
        self.progress_bar.setValue(0)
        self.status = status_label()
        self.curves = TrainingCurves()
        after_warm_up(self.curves.prepare)  # matplotlib before the first run, not during it
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumHeight(70)
        self._summary_timer = QTimer(self)
        self._summary_timer.setSingleShot(True)
        self._summary_timer.setInterval(150)
        self._summary_seq = 0  # the newest summary request; older answers are dropped
        self._summary_busy = False
        self._finishing = 0  # background steps of a finished run still to come (registering it)
        self._loop_layer: int | None = None  # id of the Segment result the loop's defaults were set for
        self._loop_checkpoint: str | None = None  # its checkpoint, selected once the list is read
        self._architecture_chosen = False  # the user picked an architecture: no recipe overrides it
        self._slices_recipe_set = False  # SLICES_FROM_SCRATCH was applied (once)

        self._build_layout()
        self._connect()
        self._on_source()
        self._on_start_from()
        self._on_architecture()
        self._on_labels_layer()
        self._on_minutes()

    # ---------------------------------------------------------------------------- layout
    def _build_layout(self) -> None:
        box_data = QGroupBox("Data")
        form = QFormLayout(box_data)
        row = QHBoxLayout()
        row.addWidget(self.source_layers)
        row.addWidget(self.source_folder)
        form.addRow(row)
        form.addRow("Image channels:", self.channels)
        form.addRow("Labels:", self.labels)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(self.folder_button)
        form.addRow("Folder:", row)

        box_model = QGroupBox("Model")
        form = QFormLayout(box_model)
        form.addRow("Architecture:", self.architecture)
        form.addRow("Configuration:", self.configuration)
        form.addRow("Start:", self.start_from)
        form.addRow("Checkpoint:", self.checkpoints)
        form.addRow("Options:", self.model_kwargs)

        box_set = QGroupBox("Settings")
        form = QFormLayout(box_set)
        form.addRow("Train for:", self.minutes)
        form.addRow("Epochs:", self.epochs)
        form.addRow("Iterations / epoch:", self.iterations)
        form.addRow("Learning rate:", self.lr)
        form.addRow("Batch size:", self.batch)
        form.addRow("Patch size:", self.patch)
        form.addRow("Device:", self.device)
        form.addRow("Augmentation:", self.augment)
        form.addRow("Validation fraction:", self.val_fraction)
        row = QHBoxLayout()
        row.addWidget(self.output, 1)
        row.addWidget(self.output_button)
        form.addRow("Output folder:", row)

        box_partial = QGroupBox("Which labels count")
        form = QFormLayout(box_partial)
        form.addRow("Count:", self.partial_mode)
        form.addRow(self.partial_summary)
        form.addRow(self.partial_reset)
        box_fill = QGroupBox("Fill between slices (no model)")
        QVBoxLayout(box_fill).addWidget(self.fill)

        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.resume_button)

        # Fit a narrow dock (no sideways scrolling, every Browse button in view): combos do not
        # take the width of their longest entry (it is elided; the tooltip and popup show it), and a
        # form puts a label above its field when both do not fit side by side.
        for combo in (self.architecture, self.start_from, self.device, self.augment, self.partial_mode,
                      self.checkpoints.combo):
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)
        for box in (box_data, box_model, box_set, box_partial):
            box.layout().setRowWrapPolicy(QFormLayout.WrapLongRows)

        inner = QWidget()
        layout = QVBoxLayout(inner)
        for w in (box_data, box_model, box_set, box_partial, box_fill):
            layout.addWidget(w)
        layout.addWidget(self.resegment)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(self.curves)
        layout.addWidget(self.log)
        layout.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)

    def _connect(self) -> None:
        self.source_layers.toggled.connect(self._on_source)
        self.folder_button.clicked.connect(self._browse_folder)
        self.output_button.clicked.connect(self._browse_output)
        self.architecture.currentIndexChanged.connect(self._on_architecture)
        self.start_from.currentIndexChanged.connect(self._on_start_from)
        self.minutes.valueChanged.connect(self._on_minutes)
        self.checkpoints.changed.connect(self._on_start_from)
        self.checkpoints.changed.connect(self._select_loop_checkpoint)
        self.labels.currentIndexChanged.connect(self._on_labels_layer)
        self.partial_mode.currentIndexChanged.connect(self._update_summary)
        self.partial_mode.currentIndexChanged.connect(self._slices_from_scratch)
        self.start_from.currentIndexChanged.connect(self._slices_from_scratch)
        self.architecture.activated.connect(self._on_architecture_chosen)
        self.partial_reset.clicked.connect(self._reset_edits)
        self._summary_timer.timeout.connect(self._update_summary)
        self.train_button.clicked.connect(lambda: self.start())
        self.stop_button.clicked.connect(self.stop)
        self.resume_button.clicked.connect(self.resume)

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.checkpoints.refresh()
        super().showEvent(event)

    # ------------------------------------------------------------------------- reactions
    def _on_source(self, *_args) -> None:
        layers = self.source_layers.isChecked()
        for w in (self.channels, self.labels, self.partial_mode, self.partial_reset):
            w.setEnabled(layers)
        for w in (self.folder, self.folder_button):
            w.setEnabled(not layers)
        if not layers:
            self.partial_mode.setCurrentIndex(0)

    def _on_start_from(self, *_args) -> None:
        finetune = self.start_from.currentIndex() == 1
        self.checkpoints.setEnabled(finetune)
        info = self.checkpoints.current_info() if finetune else None
        self.architecture.setEnabled(info is None)  # a checkpoint defines its architecture
        if info is not None:
            self.architecture.blockSignals(True)
            self.architecture.set_model(info.model_name)
            self.architecture.blockSignals(False)
            self.configuration.setText(f"{info.configuration or '?'} (the checkpoint's plan)")
        else:
            self._on_architecture()

    def _on_minutes(self, *_args) -> None:
        budget = self.minutes.value() > 0
        self.epochs.setEnabled(not budget)
        self.iterations.setEnabled(not budget)

    def _on_architecture(self, *_args) -> None:
        if not self.architecture.isEnabled() or not getattr(self.architecture, "loaded", True):
            return  # the combo fills (and signals again) once the engine is imported in the background
        name = self.architecture.model_name()
        self.configuration.setText(
            f"{_model_configuration(name) or 'the model default'} · {_recipe(name)} · patch and batch: planner's choice"
        )

    def _on_architecture_chosen(self, *_args) -> None:
        self._architecture_chosen = True

    def _slices_from_scratch(self, *_args) -> None:
        """From scratch on painted slices: :data:`SLICES_FROM_SCRATCH` (once; not over an
        architecture, options or batch size the user chose)."""
        if self.start_from.currentIndex() != 0 or self.partial_key() != "slices":
            return
        if self._slices_recipe_set or self._architecture_chosen:
            return
        self._slices_recipe_set = True
        recipe = SLICES_FROM_SCRATCH
        self.architecture.set_model(recipe["model"])
        if not self.model_kwargs.text().strip():
            self.model_kwargs.setText(json.dumps(recipe["model_kwargs"]))
        if not self.batch.value():
            self.batch.setValue(recipe["batch_size"])
        self._log(f"A new model from painted slices: {recipe['model']} {json.dumps(recipe['model_kwargs'])}, batch "
                  f"{recipe['batch_size']} (five painted CT slices, 3 minutes on a laptop CPU: Dice 0.89-0.93 on the "
                  "other slices, keeping the largest component as the run chose on a held-out slice; 0.02 with the "
                  "3D default). Change it above.")

    def _on_labels_layer(self, *_args) -> None:
        layer = self.labels.layer()
        if layer is not None:
            tracker = tracker_for(layer, self.viewer)
            tracker.on_change(self._summary_timer.start)
            self._loop_defaults(layer)
        self._update_summary()

    def _loop_defaults(self, layer) -> None:
        """A Segment result chosen as the labels (once per layer): the correction loop's settings,
        fine-tune the checkpoint that made it, on the painted slices only (training a new model on
        every voxel of a prediction would learn the prediction, mistakes included)."""
        path = (layer.metadata or {}).get("medseg_checkpoint")
        if id(layer) == self._loop_layer or not path or not os.path.isfile(path):
            return
        self._loop_layer, self._loop_checkpoint = id(layer), os.path.realpath(path)
        self.start_from.setCurrentIndex(1)
        self.partial_mode.setCurrentIndex(self.partial_mode.findData("slices"))
        self._select_loop_checkpoint()
        self._log(f"{layer.name!r} is a Segment result: fine-tuning {os.path.basename(path)} on the painted "
                  "slices (change it above).")

    def _select_loop_checkpoint(self) -> None:
        """Select the loop's checkpoint once the list is read (added to it when not listed)."""
        path = self._loop_checkpoint
        if path is None or not self.checkpoints.loaded:
            return
        self._loop_checkpoint = None
        idx = self.checkpoints.combo.findData(path)
        if idx >= 0:
            self.checkpoints.combo.setCurrentIndex(idx)
            return
        try:
            self.checkpoints.add_path(path)
        except Exception as err:  # noqa: BLE001 - the user picks one instead
            self._log(f"Could not list {path}: {err}")

    def _reset_edits(self) -> None:
        layer = self.labels.layer()
        if layer is not None:
            tracker_for(layer, self.viewer).reset()
        self._update_summary()

    def partial_key(self) -> str:
        return self.partial_mode.currentData()

    def _update_summary(self, *_args) -> None:
        """Say what counts for training; the counting (whole-volume comparisons) runs in a
        background thread, one at a time, the newest request last."""
        layer = self.labels.layer()
        mode = self.partial_key()
        self._summary_seq += 1
        if layer is None or not self.source_layers.isChecked():
            self.partial_summary.setText(MODES[mode] + ".")
            return
        if self._summary_busy:  # asked again when the running count ends
            return
        tracker = tracker_for(layer, self.viewer)
        since = time.strftime("%H:%M:%S", time.localtime(tracker.started))
        head = f"<b>{MODES[mode]}</b> · edits of {layer.name!r} since {since}: "
        seq = self._summary_seq
        if not self.partial_summary.text().startswith(head):
            self.partial_summary.setText(head + "counting…")
        self._summary_busy = True
        call_in_thread(lambda: tracker.summary(mode), lambda text, err: self._show_summary(seq, head, text, err))

    def _show_summary(self, seq: int, head: str, text: str | None, error: BaseException | None) -> None:
        self._summary_busy = False
        if seq != self._summary_seq:  # the layer, the mode or the edits changed meanwhile
            self._update_summary()
            return
        if error is not None:  # e.g. the layer's data was replaced while counting
            logger.debug("could not summarise the edits: %s", error)
            self.partial_summary.setText(head + "(could not count the edits)")
            return
        self.partial_summary.setText(head + text)

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "nnU-Net raw dataset folder")
        if path:
            self.folder.setText(path)

    def _browse_output(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Output folder")
        if path:
            self.output.setText(path)

    # ------------------------------------------------------------------------- settings
    def _parse_patch(self) -> tuple[int, ...] | None:
        text = self.patch.text().strip().lower()
        if not text or text == "auto":
            return None
        try:
            patch = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
        except ValueError as err:
            raise InputError(f"Patch size {text!r}: write 'auto' or sizes like 64,128,128.") from err
        if len(patch) not in (2, 3) or min(patch) < 4:
            raise InputError(f"Patch size {text!r}: give 2 or 3 sizes of at least 4.")
        return patch

    def _parse_kwargs(self) -> dict:
        text = self.model_kwargs.text().strip()
        if not text:
            return {}
        try:
            kwargs = json.loads(text)
        except ValueError as err:
            raise InputError(f"Architecture options must be JSON, e.g. {{\"base_width\": 16}}: {err}") from err
        if not isinstance(kwargs, dict):
            raise InputError("Architecture options must be a JSON object.")
        return kwargs

    def build_config(self):
        """The ``TrainConfig`` the settings describe (no data yet).

        Raises:
            InputError: settings that cannot work, explained.
        """
        from napari_medseg.engine.checkpoints import medseg_home
        from napari_medseg.engine.training import TrainConfig

        kwargs = self._parse_kwargs()
        info = self.checkpoints.current_info() if self.start_from.currentIndex() == 1 else None
        if self.start_from.currentIndex() == 1 and info is None:
            raise InputError("Choose the checkpoint to fine-tune (or start from scratch).")
        model = info.model_name if info else self.architecture.model_name()
        if not model:
            raise InputError("Choose an architecture.")
        extra: dict = {}
        if info is not None:  # rebuild exactly the checkpoint's architecture
            kwargs = {**{k: v for k, v in info.model_kwargs.items() if k not in _ARCH_KEYS_FROM_PLAN}, **kwargs}
            # same heads as the checkpoint (factories default to no deep supervision)
            extra["deep_supervision"] = bool(info.model_kwargs.get("deep_supervision", False))
            names = {int(k): v for k, v in info.label_names.items()}
            extra["label_names"] = {c: names.get(c, f"class_{c}") for c in range(info.num_classes)}
        output = self.output.text().strip()
        if not output:
            output = str(medseg_home() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{model}")
        minutes = float(self.minutes.value()) or None
        if minutes:  # the budget decides; short epochs so that the curves move every few iterations
            extra.update(epochs=10**6, iterations_per_epoch=BUDGET_EPOCH_ITERATIONS, val_batches=2)
        else:
            extra.update(epochs=int(self.epochs.value()), iterations_per_epoch=int(self.iterations.value()))
        return TrainConfig(
            output_dir=os.path.expanduser(output), model=model, model_kwargs=kwargs,
            configuration=info.configuration if info and info.configuration else _model_configuration(model),
            minutes=minutes,
            lr=float(self.lr.value()) or None, batch_size=int(self.batch.value()) or None,
            patch_size=self._parse_patch(), device=self.device.device(),
            val_fraction=float(self.val_fraction.value()), augment=self.augment.currentData(),
            init_checkpoint=info.path if info else None, **extra,
        )

    def build_data(self, config):
        """``(data for engine.train, description)``; may set ``config.ignore_label``.

        Raises:
            InputError: missing or inconsistent data.
        """

        if self.source_folder.isChecked():
            folder = self.folder.text().strip()
            if not folder or not os.path.isdir(os.path.expanduser(folder)):
                raise InputError("Choose an nnU-Net raw dataset folder (with imagesTr/, labelsTr/, dataset.json).")
            self.last_training_labels = None
            return os.path.expanduser(folder), f"dataset {os.path.basename(os.path.normpath(folder))}"
        image = resolve_image_input(self.channels.layers())
        layer = self.labels.layer()
        if layer is None:
            raise InputError("Choose a labels layer (paint one, or segment the image first).")
        check_same_grid(image, layer)
        mode = self.partial_key()
        names = layer.metadata.get("medseg_label_names")
        if names:  # the layer's own class names win over a parent checkpoint's (another task: a new head)
            config.label_names = {int(k): str(v) for k, v in names.items()}
        if mode == "all":
            labels = np.array(layer.data, dtype=np.int16, copy=True)
        else:
            tracker = tracker_for(layer, self.viewer)
            painted = tracker.painted_voxels()  # one comparison of the volume for all that follows
            counted = tracker.counted(mode, painted)
            if not counted.any():
                raise InputError("No painted voxels yet: paint or correct some labels first (or count all voxels).")
            if config.init_checkpoint is None and not names:  # a new model: the classes are what was painted
                config.label_names = painted_classes(np.asarray(layer.data)[counted])
            ignore = len(config.label_names)  # TrainConfig.ignore_label = num_classes
            labels, _ = tracker.training_labels(mode, ignore, counted)
            config.ignore_label = ignore
            across = sorted(set(tracker.painted_slices(painted)) - {0})
            if mode == "slices" and config.configuration == "2d" and across:
                self._log(f"Your painted slices cut axis {across[0]}, but a 2D model learns from slices that cut "
                          "axis 0 (napari's default view): it would see only lines of paint. Paint slices in the "
                          "default view, or choose a 3D model.")
        self.last_training_labels = labels
        desc = f"layers {', '.join(lay.name for lay in image.layers)} + {layer.name}"
        if mode != "all":
            desc += f" ({MODES[mode].lower()})"
        return [(image, labels, image.spacing)], desc

    # ------------------------------------------------------------------------------- run
    @property
    def running(self) -> bool:
        """Training runs, or its checkpoint is still being registered."""
        return self.worker is not None or self._finishing > 0

    def start(self, resume_from: str | None = None) -> None:
        """Build the config and data from the settings and start training in a worker."""
        if self.running:
            return
        from napari_medseg.engine.training import TrainingError

        try:
            if resume_from and self._run:
                config, data, desc = self._run["config"], self._run["data"], self._run["desc"]
                config.resume = resume_from
            else:
                config = self.build_config()
                data, desc = self.build_data(config)
                self.curves.clear()
        except (InputError, TrainingError, ValueError) as err:
            show_status(self.status, f"Cannot train: {err}", error=True)
            return
        self._run = {"config": config, "data": data, "desc": desc}
        self.last_config, self.last_data = config, data
        self.events_seen = []
        engine_data = [(item[0], item[1], item[2]) for item in data] if isinstance(data, list) else data

        def make_gen():
            from napari_medseg.engine.training import train

            if isinstance(engine_data, list):  # read the image layers in the worker thread
                arrays = [(img.array(), lab, sp) for img, lab, sp in engine_data]
                return train(config, arrays)
            return train(config, engine_data)

        self._progress = ProgressRelay("Training")
        self._epochs_done = 0 if not resume_from else self._epochs_done
        budgeted = bool(config.minutes)
        self.progress_bar.setRange(0, int(config.minutes * 60) if budgeted else config.epochs * config.iterations_per_epoch)
        self.train_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        show_status(self.status, f"{'Resuming' if resume_from else 'Training'} {config.model} on {desc} → "
                    f"{short_path(config.output_dir, 1)}")
        self.status.setToolTip(config.output_dir)
        self._log(f"Output: {config.output_dir}")
        self.watch_window_close()
        self.worker, self._stop = start_engine_worker(
            make_gen, on_yield=self._on_event, on_return=self._on_result, on_error=self._on_error,
            on_finish=self._on_finish,
        )

    def stop(self) -> None:
        """Stop at the next iteration; the engine saves ``checkpoint_latest.pt``."""
        if self.worker is not None:
            self._stop.set()
            show_status(self.status, "Stopping (saving checkpoint_latest.pt)...")

    def resume(self) -> None:
        """Continue the stopped run from its ``checkpoint_latest.pt``."""
        if self._run is None:
            return
        latest = os.path.join(self._run["config"].output_dir, "checkpoint_latest.pt")
        if not os.path.isfile(latest):
            show_status(self.status, f"Nothing to resume: {latest} does not exist.", error=True)
            return
        self.start(resume_from=latest)

    def _on_event(self, event) -> None:
        from napari_medseg.engine.jobs import EpochEnd, Message, Progress

        self.events_seen.append(event)
        if isinstance(event, Progress):
            if self.worker is None:  # late event of a finished run
                return
            if event.stage == "train" and event.total:
                budgeted = bool(self._run and self._run["config"].minutes)  # current/total: seconds
                self.progress_bar.setValue(event.current if budgeted else self._epochs_done * event.total + event.current)
                self.progress_bar.setFormat(event.message or "%p%")
            else:
                self.progress_bar.setFormat(f"{event.stage} {event.current}/{event.total} {event.message}")
            # Last: napari's progress widgets may process pending events (even this run's end).
            if self._progress is not None:
                self._progress.update(event.stage, event.current, event.total, event.message)
        elif isinstance(event, EpochEnd):
            self._epochs_done = event.epoch + 1
            self.last_epoch = event
            self.curves.add_epoch(event)
            dice = ", ".join(f"{k} {v:.3f}" for k, v in event.val_dice.items())
            of = "" if self._run and self._run["config"].minutes else f"/{event.epochs}"
            self._log(f"epoch {event.epoch + 1}{of}: loss {event.train_loss:.4f}"
                      + (f", Dice ({event.validation or 'validation'}) {dice}" if dice else ""))
        elif isinstance(event, Message):
            self._log(event.text)
            if event.level in ("warning", "error"):
                show_status(self.status, event.text, error=event.level == "error")

    def _on_result(self, result) -> None:
        config = self._run["config"]
        if isinstance(result, Stopped):
            latest = os.path.join(config.output_dir, "checkpoint_latest.pt")
            if result.error or not os.path.isfile(latest):
                show_status(self.status, f"Stopped; no checkpoint could be saved ({result.error}).", error=True)
                return
            self.last_checkpoint = latest

            def stopped(_listed: bool = True) -> None:
                self.resume_button.setEnabled(True)
                show_status(self.status, f"Stopped. Saved {short_path(latest)}; Resume continues it.")

            self._register(latest, stopped=True, then=stopped)
            return
        self.last_checkpoint = str(result)
        resegment = self.resegment.isChecked() and isinstance(self._run["data"], list)

        def done(listed: bool = True) -> None:
            where = "listed in the Segment widget" if listed else "not in the catalogue (see the log): Segment opens it by path"
            show_status(self.status, f"Done: {short_path(self.last_checkpoint)} ({where}).", error=not listed)
            if resegment:
                self.segment_again(self.last_checkpoint)

        show_status(self.status, f"Saved {short_path(self.last_checkpoint)}; adding it to the catalogue…")
        self._register(self.last_checkpoint, stopped=False, then=done)

    # --------------------------------------------------------------------- close the loop
    def segment_widget(self):
        """The viewer's Segment widget (docked, tabbed with this one, when none is open)."""
        from napari_medseg.widgets._segment import SegmentWidget

        for inner in list(self.viewer.window.dock_widgets.values()):  # the docked (inner) widgets
            found = inner if isinstance(inner, SegmentWidget) else inner.findChild(SegmentWidget)
            if found is not None:
                return found
        widget = SegmentWidget(self.viewer)
        self.viewer.window.add_dock_widget(widget, name="Segment", tabify=True)
        return widget

    def segment_again(self, checkpoint: str) -> None:
        """Segment the training image with ``checkpoint``; log what changed per class."""
        segment = self.segment_widget()
        segment.checkpoints.add_path(checkpoint)
        segment.channels.set_layers(self.channels.layers())
        before = self.labels.layer()
        names = dict(self._run["config"].label_names or {})
        ignore = self._run["config"].ignore_label
        reference = np.asarray(before.data) if before is not None else None

        def report(layer) -> None:
            segment.segmented.disconnect(report)
            if reference is None or layer.data.shape != reference.shape:
                self.last_resegmented = layer
                return
            new = np.asarray(layer.data)

            def show(lines, error) -> None:  # GUI thread, once the voxels are counted
                self._log(f"Segmented again with the new model: {layer.name!r}. Voxels per class, "
                          f"{before.name!r} -> new:")
                if error is not None:
                    self._log(f"  (could not count: {error})")
                for line in lines or ():
                    self._log("  " + line)
                self.last_resegmented = layer

            call_in_thread(lambda: class_changes(reference, new, names, ignore), show)

        segment.segmented.connect(report)
        self._log(f"Segmenting {', '.join(lay.name for lay in self.channels.layers())} with the new model...")
        segment.run()

    def _register(self, path: str, stopped: bool, then=None) -> None:
        """Register ``path`` in the catalogue in a background thread (it reads the checkpoint),
        then tell every widget's list and call ``then(listed)``; the run counts as running meanwhile."""
        from napari_medseg.engine.checkpoints import register_checkpoint

        config, desc = self._run["config"], self._run["desc"]
        start = f"fine-tuned from {os.path.basename(config.init_checkpoint)}" if config.init_checkpoint else "from scratch"
        kind = self.last_epoch.validation if self.last_epoch is not None else "none"
        # Only a held-out Dice goes into the catalogue beside the shipped models' held-out figures.
        dice = dict(self.last_epoch.val_dice) if kind.startswith("held-out") else None
        epochs = self._epochs_done
        name = f"{config.model} · {os.path.basename(config.output_dir)}" + (" (stopped)" if stopped else "")
        description = (f"Trained in napari {start}, {epochs} epoch(s) on {desc}. "
                       f"Dice: {'on ' + kind if dice else 'not measured on held-out data (' + kind + ')'}.")

        def registered(_entry, error) -> None:  # GUI thread
            try:
                if error is not None:  # the run itself succeeded
                    self._log(f"Could not register {path} in the catalogue: {error}")
                else:
                    catalog_events().changed.emit()
                if then is not None:
                    then(error is None)
            finally:
                self._finishing -= 1

        self._finishing += 1
        call_in_thread(lambda: register_checkpoint(path, name=name, training_data=desc, dice=dice,
                                                   description=description), registered)

    def _on_error(self, err: Exception) -> None:
        show_status(self.status, f"Training failed: {err}", error=True)
        self._log(f"Error: {err}")

    def _on_finish(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.worker = None
        self.train_button.setEnabled(True)
        self.stop_button.setEnabled(False)

    def _log(self, text: str) -> None:
        self.log.appendPlainText(text)
        logger.info(text)


def class_changes(before, after, names: dict, ignore_label: int | None = None) -> list[str]:
    """One line per class: voxels labelled in ``before`` (ignore label excluded) and in ``after``."""
    n = int(max(before.max(initial=0), after.max(initial=0))) + 1
    counted = before != ignore_label if ignore_label is not None else np.ones(before.shape, bool)
    old = np.bincount(before[counted].ravel().astype(np.int64), minlength=n)
    new = np.bincount(after.ravel().astype(np.int64), minlength=n)
    return [f"{names.get(c, f'class_{c}')}: {int(old[c]):,} -> {int(new[c]):,} ({int(new[c]) - int(old[c]):+,})"
            for c in range(1, n) if c != ignore_label and (old[c] or new[c])]


def painted_classes(values: np.ndarray) -> dict[int, str]:
    """Class names for a new model from the painted ``values``: background and ``label_1`` up to
    the largest value painted (a class painted nowhere still gets its name, so values keep their meaning).

    Raises:
        InputError: nothing but background was painted.
    """
    top = int(values.max()) if values.size else 0
    if top < 1:
        raise InputError("Only background is painted: paint the structures to learn (labels 1, 2, ...) on a "
                         "few slices.")
    return {0: "background", **{k: f"label_{k}" for k in range(1, top + 1)}}


def _model_configuration(model_name: str) -> str | None:
    """The planner configuration a model serves (``None``: let the engine choose)."""
    from napari_medseg.models import get_model_spec

    return get_model_spec(model_name).configuration


def _recipe(model_name: str) -> str:
    """The model's default optimiser and learning rate, in a few words."""
    from napari_medseg.models import get_model_spec

    training = get_model_spec(model_name).training or {}
    opt, lr = training.get("optimizer"), training.get("lr")
    return f"{opt or 'sgd'} lr {lr:g}" if lr else str(opt or "default recipe")


def _spin(lo: int, hi: int, value: int) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(lo, hi)
    spin.setValue(value)
    return spin
