"""The radiological view in a real viewer and the Display widget: anterior up, direction letters on
the canvas, the radiological/neurological switch and the window presets; layers never change."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("fresh_napari_settings")]
PLUGIN = "napari-medseg"


def _ras_file(tmp_path, name="ras.nii.gz", affine=None) -> str:
    """An RAS+ volume whose anterior quarter is bright and whose right third is brighter."""
    data = np.random.default_rng(0).normal(100, 5, (40, 48, 24)).astype(np.float32)  # (i=R, j=A, k=S)
    data[:, 36:, :] += 300  # anterior
    data[28:, :, :] += 150  # patient's right (high i)
    path = str(tmp_path / name)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def _letters(viewer) -> dict[str, str]:
    overlays = viewer.canvas.overlays
    return {edge: overlays[f"medseg_{edge}"].text for edge in ("top", "bottom", "left", "right")
            if overlays[f"medseg_{edge}"].visible}


def _thirds(image: np.ndarray) -> dict[str, float]:
    gray = image[..., :3].astype(float).mean(axis=-1)
    h, w = gray.shape
    return {"top": gray[: h // 3].mean(), "bottom": gray[-h // 3:].mean(),
            "left": gray[:, : w // 3].mean(), "right": gray[:, -w // 3:].mean()}


def test_a_plain_viewer_shows_an_ras_volume_anterior_up_radiologically(make_napari_viewer, qtbot, tmp_path):
    from npe2 import PluginManager

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(900, 700)
    PluginManager.instance().deactivate(PLUGIN)  # a new session: opening the file activates the plugin
    (layer,) = viewer.open(_ras_file(tmp_path), plugin=PLUGIN)
    assert tuple(viewer.scene.camera.orientation2d) == ("up", "left")
    assert viewer.dims.order == (0, 1, 2) and viewer.dims.axis_labels == ("S", "A", "R")
    assert _letters(viewer) == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    assert viewer.canvas.overlays["medseg_view"].text == "axial · radiological"
    viewer.reset_view()
    qtbot.wait(200)
    parts = _thirds(viewer.screenshot(canvas_only=True, flash=False))
    assert parts["top"] > parts["bottom"] + 20  # anterior (bright) at the top
    assert parts["left"] > parts["right"] + 10  # patient's right (brighter) on screen left
    np.testing.assert_allclose(layer.affine.affine_matrix, np.eye(4))  # the layer itself is untouched


def test_display_widget_switches_convention_and_plane_without_touching_layers(make_napari_viewer, qtbot, tmp_path):
    from napari_medseg.widgets._display import DisplayWidget

    viewer = make_napari_viewer()
    widget = DisplayWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Display")
    (layer,) = viewer.open(_ras_file(tmp_path), plugin=PLUGIN)
    before = (layer.data.copy(), layer.affine.affine_matrix.copy(), tuple(layer.scale), tuple(layer.translate))
    assert "top A, bottom P, left R, right L" in widget.directions.text()

    widget.set_convention("neurological")
    assert tuple(viewer.scene.camera.orientation2d) == ("up", "right")
    assert _letters(viewer) == {"top": "A", "bottom": "P", "left": "L", "right": "R"}
    widget.set_plane("coronal")
    assert viewer.dims.order == (1, 0, 2)
    assert _letters(viewer) == {"top": "S", "bottom": "I", "left": "L", "right": "R"}
    widget.set_convention("radiological")
    assert _letters(viewer)["left"] == "R" and widget.plane.currentData() == "coronal"
    widget.set_plane("sagittal")
    assert _letters(viewer) == {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    viewer.dims.ndisplay = 3
    assert not any(viewer.canvas.overlays[f"medseg_{e}"].visible for e in ("top", "left"))
    viewer.dims.ndisplay = 2
    widget.standard_view()  # isotropic in-plane, 2 mm slices along S: axial
    assert viewer.dims.order == (0, 1, 2) and widget.plane.currentData() == "axial"

    data, affine, scale, translate = before
    np.testing.assert_array_equal(layer.data, data)
    np.testing.assert_array_equal(layer.affine.affine_matrix, affine)
    assert (tuple(layer.scale), tuple(layer.translate)) == (scale, translate)


def test_a_coronal_acquisition_opens_in_the_coronal_view(make_napari_viewer, tmp_path):
    from napari_medseg._launcher import follow_viewer

    viewer = make_napari_viewer()
    follow_viewer(viewer)
    coronal = np.array([[0.8, 0, 0, 0], [0, 0, 3.0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1.0]])  # k along A
    viewer.open(_ras_file(tmp_path, "coronal.nii.gz", coronal), plugin=PLUGIN)
    assert viewer.dims.order == (1, 0, 2)
    assert _letters(viewer) == {"top": "S", "bottom": "I", "left": "R", "right": "L"}


def test_window_presets(make_napari_viewer, tmp_path):
    from napari_medseg.widgets._display import DisplayWidget

    shape = (30, 32, 12)
    i, j = np.indices(shape[:2])
    body = (np.hypot(i - 15, j - 16) < 11)[..., None].repeat(shape[2], axis=2)
    ct = (np.where(body, 40, -1000) + np.random.default_rng(1).integers(-30, 30, shape)).astype(np.int16)
    path = str(tmp_path / "abdomen.nii.gz")
    nib.save(nib.Nifti1Image(ct, np.eye(4)), path)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin=PLUGIN)
    widget = DisplayWidget(viewer)
    assert "CT soft tissue, W400 / L40" in widget.window_info.text()
    expected = {"CT lung": (-1350, 150), "CT bone": (-700, 1300), "CT brain": (0, 80), "CT soft tissue": (-160, 240)}
    for name, limits in expected.items():
        widget.preset_buttons[name].click()
        np.testing.assert_allclose(layer.contrast_limits, limits)
        assert layer.metadata["medseg_window"] == name
    widget.preset_buttons["MR 1-99 %"].click()
    np.testing.assert_allclose(layer.contrast_limits, np.percentile(ct, [1, 99]), rtol=1e-6)
