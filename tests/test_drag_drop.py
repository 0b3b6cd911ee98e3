"""Dropping a NIfTI file on the napari window opens it through this plugin with its geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_drop_nifti_on_window(make_napari_viewer, tmp_path):
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    data = np.random.default_rng(0).normal(size=(20, 24, 12)).astype(np.float32)  # (i, j, k)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    from napari.settings import get_settings

    from napari_medseg._launcher import prefer_medseg_reader

    viewer = make_napari_viewer()
    # napari's builtin reader also claims every file name, so napari asks once which reader to use
    # for *.nii.gz and can remember the answer; `napari-medseg view` records that answer for the user.
    prefer_medseg_reader()
    assert get_settings().plugins.extension2reader["*.nii.gz"] == "napari-medseg"
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    viewer.window._qt_viewer.dropEvent(event)
    assert len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.data.shape == (12, 24, 20)  # napari order: (k, j, i)
    np.testing.assert_allclose(layer.scale, [2.5, 0.9, 0.8])
    np.testing.assert_allclose(layer.translate, [30.0, 5.0, -10.0])
    np.testing.assert_allclose(np.asarray(layer.metadata["medseg_geometry"]["affine"]), affine, atol=1e-6)
