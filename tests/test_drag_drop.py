"""Dropping a NIfTI file on the napari window opens it through this plugin with its geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_drop_nifti_on_window(make_napari_viewer, tmp_path, fresh_napari_settings, monkeypatch):
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    data = np.random.default_rng(0).normal(size=(20, 24, 12)).astype(np.float32)  # (i, j, k)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    import napari._qt.qt_viewer as qt_viewer
    from npe2 import PluginManager

    viewer = make_napari_viewer()
    # napari's builtin reader also claims *.nii.gz and napari has no reader priority; the first use
    # of any of the plugin's contributions in a session (npe2 on_activate; here a sample, as in a new
    # session) records the plugin as the reader for its file patterns, so the drop asks nothing.
    PluginManager.instance().deactivate("napari-medseg")
    assert "*.nii.gz" not in fresh_napari_settings.plugins.extension2reader
    viewer.open_sample("napari-medseg", "phantom")
    viewer.layers.clear()
    assert fresh_napari_settings.plugins.extension2reader["*.nii.gz"] == "napari-medseg"
    monkeypatch.setattr(qt_viewer, "handle_gui_reading", lambda *a, **k: pytest.fail("napari asked for a reader"))
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


def _drop(viewer, path) -> None:
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    viewer.window._qt_viewer.dropEvent(event)


def test_drop_dicom_folder_on_window(make_napari_viewer, tmp_path, qtbot):
    """A DICOM series folder dropped on the window: napari asks which reader (its builtin reader also
    claims folders), the user picks napari-medseg and ticks "remember"; the series opens in world
    space, and the next drop of that folder opens without asking."""
    from napari.settings import get_settings

    from napari_medseg.io._dicom_synth import write_dicom_series

    affine = np.array([[-0.7, 0.0, 0.1, 60.0], [0.0, -0.7, 0.0, 80.0], [0.0, 0.0, 2.0, -20.0], [0, 0, 0, 1.0]])
    affine[:3, 2] = np.cross(affine[:3, 0], affine[:3, 1]) / 0.49 * 2.0
    data = np.random.default_rng(2).integers(-1000, 1000, (6, 16, 18)).astype(np.int16)
    folder = tmp_path / "CT series"
    write_dicom_series(folder, data, affine, modality="CT", intercept=-1024, description="Abdomen CT",
                       shuffle_seed=1)
    viewer = make_napari_viewer()
    before = dict(get_settings().plugins.extension2reader)
    try:
        _drop_and_choose(viewer, folder, data)
    finally:  # the remembered folder choice must not outlive the test
        get_settings().plugins.extension2reader = before


def _drop_and_choose(viewer, folder, data) -> None:
    from napari.settings import get_settings
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_medseg.io import read_volume

    seen = []

    def choose_medseg():
        dialogs = [w for w in QApplication.topLevelWidgets() if type(w).__name__ == "QtReaderDialog" and w.isVisible()]
        if not dialogs:
            QTimer.singleShot(50, choose_medseg)
            return
        dialog = dialogs[0]
        seen.append(sorted(b.text() for b in dialog.reader_btn_group.buttons()))
        for button in dialog.reader_btn_group.buttons():
            if button.text() == "napari-medseg":
                button.setChecked(True)
        dialog.persist_checkbox.setChecked(True)
        dialog.accept()

    QTimer.singleShot(50, choose_medseg)
    _drop(viewer, folder)
    assert seen and "napari-medseg" in seen[0]
    assert len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.name == "Abdomen CT"
    np.testing.assert_array_equal(layer.data, data)
    vol = read_volume(folder)
    for voxel in [(0, 0, 0), (5, 15, 17)]:
        ras = vol.affine @ np.array([voxel[2], voxel[1], voxel[0], 1.0])
        np.testing.assert_allclose(layer.data_to_world(voxel), ras[:3][::-1], atol=1e-6)
    assert layer.metadata["medseg_geometry"]["dicom"]["series_description"] == "Abdomen CT"
    remembered = [k for k, v in get_settings().plugins.extension2reader.items() if v == "napari-medseg"]
    assert any(k.rstrip("/").endswith("CT series") for k in remembered), remembered
    _drop(viewer, folder)  # remembered: no dialog this time
    assert len(viewer.layers) == 2 and len(seen) == 1
