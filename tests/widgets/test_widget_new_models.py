"""PFSeg and the cross-dimensional models from the GUI: train in the Train widget, then segment.

One real (tiny) training per model through the widget's worker, then the Segment widget runs the
checkpoint it produced on the same image and adds labels on the image's grid.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from medseg_testing import select_checkpoint

pytestmark = pytest.mark.gui

# (model, tiny architecture options, patch typed in the Train widget, batch): BatchNorm models need
# more than one value per channel at stride 32, hence batch 2 for the 32-pixel patches.
MODELS = [
    ("pfseg", {"width": 4}, "", 1),  # whole volumes: no patch
    ("omnia-net-b0", {"decoder_widths": [32, 16, 16, 8, 8]}, "32,32", 2),
    ("dx-net", {"decoder_widths": [16, 16, 8, 8, 8]}, "32,32,32", 2),
    ("ds-net", {"widths": [4, 8, 8, 8], "mid_channels": 2, "decoder_widths": [16, 16, 8, 8, 8]}, "24,32,32", 1),
]


@pytest.mark.parametrize(("model", "kwargs", "patch", "batch"), MODELS, ids=[m[0] for m in MODELS])
def test_train_then_segment_in_the_viewer(make_napari_viewer, qtbot, tmp_path, model, kwargs, patch, batch):
    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.io.phantom import make_phantom
    from napari_medseg.widgets._segment import SegmentWidget
    from napari_medseg.widgets._train import TrainWidget

    image, labels = make_phantom((24, 32, 32), num_classes=2, seed=3)
    viewer = make_napari_viewer()
    scan = viewer.add_image(image.astype(np.float32), name="scan", scale=(1.5, 1.0, 1.0), translate=(4.0, 0.0, -2.0))
    viewer.add_labels(labels, name="truth", scale=(1.5, 1.0, 1.0), translate=(4.0, 0.0, -2.0))

    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train")
    assert train.architecture.set_model(model)
    assert train.architecture.model_name() == model  # the registry-driven list offers it
    train.minutes.setValue(0)  # epochs x iterations, not the default time budget
    train.resegment.setChecked(False)
    train.epochs.setValue(1)
    train.iterations.setValue(2)
    train.batch.setValue(batch)
    train.patch.setText(patch)
    train.model_kwargs.setText(json.dumps(kwargs))
    train.device.setCurrentText("cpu")
    train.output.setText(str(tmp_path / "run"))
    train.train_button.click()
    assert train.running, train.status.text()
    qtbot.waitUntil(lambda: not train.running, timeout=180_000)
    ckpt_path = train.last_checkpoint
    assert ckpt_path and os.path.isfile(ckpt_path), train.status.text()
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.model_name == model and ckpt.num_classes == 2
    assert len(train.curves.loss_line.get_xdata()) == 1

    segment = SegmentWidget(viewer)  # opened after training: lists the new checkpoint itself
    viewer.window.add_dock_widget(segment, name="Segment")
    select_checkpoint(segment.checkpoints, ckpt_path, refresh=False)
    assert segment.architecture.model_name() == model
    segment.mirror.setChecked(False)
    segment.device.setCurrentText("cpu")
    segment.run_button.click()
    qtbot.waitUntil(lambda: not segment.running, timeout=180_000)
    assert "Done" in segment.status.text(), segment.status.text()
    out = viewer.layers["scan segmentation"]
    assert out.data.shape == image.shape
    assert set(np.unique(out.data)) <= {0, 1}
    np.testing.assert_allclose(out.scale, scan.scale)
    np.testing.assert_allclose(out.translate, scan.translate)
