"""The reader, writers and sample data inside a real napari viewer (run under Xvfb)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.io import NiftiError

pytestmark = pytest.mark.gui
PLUGIN = "napari-medseg"
DOCS = Path(__file__).resolve().parents[1] / "docs"

# an oblique, LPS-like affine with anisotropic voxels (NIfTI (i, j, k) -> world)
OBLIQUE = np.array([
    [-0.78, 0.05, 0.10, 101.5],
    [-0.04, -0.79, 0.20, 88.0],
    [0.02, 0.03, 2.99, -40.25],
    [0.0, 0.0, 0.0, 1.0],
])


def save(path: Path, data_ijk: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 1) -> str:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data_ijk.shape)
    hdr.set_data_dtype(data_ijk.dtype)
    hdr.set_qform(affine, code=qcode)
    hdr.set_sform(affine, code=scode)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data_ijk, None, header=hdr), str(path))
    return str(path)


@pytest.fixture
def scan(tmp_path):
    data = np.random.default_rng(0).normal(100, 10, (24, 20, 12)).astype(np.float32)
    return save(tmp_path / "scan.nii.gz", data, OBLIQUE, qcode=1, scode=2)


@pytest.fixture
def label_file(tmp_path):
    lab = np.zeros((24, 20, 12), np.uint8)
    lab[5:15, 4:12, 3:9] = 1
    lab[16:20, 12:18, 2:5] = 3
    return save(tmp_path / "labelsTr" / "case_000.nii.gz", lab, OBLIQUE, qcode=1, scode=2)


def test_open_image_scale_translate(make_napari_viewer, scan):
    viewer = make_napari_viewer()
    layers = viewer.open(scan, plugin=PLUGIN)
    assert len(layers) == 1
    layer = layers[0]
    assert type(layer).__name__ == "Image" and layer.name == "scan"
    zooms = nib.load(scan).header.get_zooms()
    np.testing.assert_allclose(layer.scale, zooms[::-1], rtol=1e-6)
    np.testing.assert_allclose(layer.translate, OBLIQUE[:3, 3][::-1], atol=1e-5)
    assert layer.data.shape == (12, 20, 24)
    assert layer.metadata["medseg_source"] == scan
    np.testing.assert_allclose(layer.metadata["medseg_geometry"]["affine"], nib.load(scan).affine)


def test_open_labels_and_save_back(make_napari_viewer, scan, label_file, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(scan, plugin=PLUGIN)
    (labels,) = viewer.open(label_file, plugin=PLUGIN)
    assert type(labels).__name__ == "Labels"
    assert np.issubdtype(labels.data.dtype, np.integer)
    labels.data[0, 0, 0] = 2  # edit, then save through napari and the plugin writer
    out = str(tmp_path / "edited.nii.gz")
    written = labels.save(out, plugin=PLUGIN)
    assert written == [out]
    src, dst = nib.load(label_file), nib.load(out)
    np.testing.assert_allclose(dst.affine, src.affine, atol=1e-6)
    np.testing.assert_allclose(dst.header.get_qform(), src.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(dst.header.get_sform(), src.header.get_sform(), atol=1e-6)
    assert (int(dst.header["qform_code"]), int(dst.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(dst.header.get_zooms(), src.header.get_zooms())
    assert dst.header.get_data_dtype() == np.uint8
    saved = np.asanyarray(dst.dataobj).T
    assert saved[0, 0, 0] == 2
    np.testing.assert_array_equal(saved, labels.data)
    # the image writer takes the same route
    image_out = str(tmp_path / "scan_copy.nii")
    assert viewer.layers["scan"].save(image_out, plugin=PLUGIN) == [image_out]
    np.testing.assert_allclose(nib.load(image_out).affine, OBLIQUE, atol=1e-5)


def test_new_labels_layer_saved_from_scale_translate(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = np.zeros((6, 7, 8), np.uint16)
    data[2, 3, 4] = 300
    layer = viewer.add_labels(data, scale=(2.0, 0.5, 0.25), translate=(10.0, 20.0, 30.0))
    out = str(tmp_path / "new.nii.gz")
    layer.save(out, plugin=PLUGIN)
    img = nib.load(out)
    expected = np.array([[0.25, 0, 0, 30.0], [0, 0.5, 0, 20.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(img.affine, expected, atol=1e-6)
    assert img.header.get_data_dtype() == np.uint16


def test_multichannel_opens_one_layer_per_channel(make_napari_viewer, tmp_path):
    data = np.random.default_rng(1).normal(size=(10, 9, 8, 2)).astype(np.float32)
    path = save(tmp_path / "two_channels.nii.gz", data, OBLIQUE)
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)
    assert len(layers) == 2
    for c, layer in enumerate(layers):
        assert layer.data.shape == (8, 9, 10)
        np.testing.assert_array_equal(layer.data, data[..., c].T)
        np.testing.assert_allclose(layer.scale, nib.load(path).header.get_zooms()[:3][::-1], rtol=1e-6)


def test_corrupt_file_gives_readable_error_and_keeps_layers(make_napari_viewer, scan, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(scan, plugin=PLUGIN)
    before = [(layer.name, id(layer.data)) for layer in viewer.layers]
    blob = Path(scan).read_bytes()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(Exception) as err:
        viewer.open(str(broken), plugin=PLUGIN)
    chain, exc = [], err.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    nifti = [e for e in chain if isinstance(e, NiftiError)]
    assert nifti, chain
    assert "broken.nii.gz" in str(nifti[0]) and "truncated or corrupt" in str(nifti[0])
    assert [(layer.name, id(layer.data)) for layer in viewer.layers] == before


def test_sample_data(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "colin27_deepgm")
    kinds = sorted(type(layer).__name__ for layer in layers)
    assert kinds == ["Image", "Labels"]
    image, labels = viewer.layers["Colin27 T1"], viewer.layers["Colin27 deep GM labels"]
    assert image.data.shape == labels.data.shape
    np.testing.assert_allclose(image.scale, (1, 1, 1))
    np.testing.assert_allclose(image.translate, labels.translate)
    assert set(np.unique(labels.data)) == {0, 1, 2, 3, 4, 5, 6}
    assert labels.metadata["medseg_label_names"][3] == "caudate"
    # the labels cover grey matter of both hemispheres: voxels on both sides of x = 0 mm
    xs = np.nonzero(labels.data)[2] * labels.scale[2] + labels.translate[2]
    assert (xs < -5).sum() > 1000 and (xs > 5).sum() > 1000
    phantom = viewer.open_sample(PLUGIN, "phantom")
    assert sorted(type(layer).__name__ for layer in phantom) == ["Image", "Labels"]


def test_screenshot_with_colin27_overlay(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)  # a hidden canvas renders nothing under Xvfb
    viewer.window.resize(1200, 800)
    viewer.open_sample(PLUGIN, "colin27_deepgm")
    labels = viewer.layers["Colin27 deep GM labels"]
    viewer.dims.ndisplay = 2
    z = int(np.argmax((labels.data > 0).sum(axis=(1, 2))))  # the axial slice with most labels
    viewer.dims.set_point(0, z * labels.scale[0] + labels.translate[0])
    viewer.camera.orientation2d = ("up", "right")  # anterior up, as radiology viewers show it
    viewer.reset_view()
    labels.visible = True
    labels.opacity = 0.5
    with_labels = viewer.screenshot(canvas_only=True, flash=False)
    labels.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)
    labels.visible = True
    changed = np.any(with_labels[..., :3] != without[..., :3], axis=-1)
    assert changed.mean() > 0.02  # the overlay is drawn on the scan
    gray = without[..., :3].astype(int)
    assert (np.abs(gray[..., 0] - gray[..., 1]) < 3).mean() > 0.95  # the T1 alone is greyscale
    if os.environ.get("MEDSEG_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        viewer.screenshot(path=str(DOCS / "screenshot_io.png"), canvas_only=False, flash=False)


# ------------------------------------------------------------------------- DICOM, world space
def _dicom_series(folder: Path, affine: np.ndarray, shape=(8, 20, 24), description="CT oblique") -> np.ndarray:
    from napari_medseg.io._dicom_synth import write_dicom_series

    data = np.random.default_rng(5).integers(-500, 800, shape).astype(np.int16)
    write_dicom_series(folder, data, affine, modality="CT", intercept=-1024, description=description,
                       shuffle_seed=4, seed=str(folder))
    return data


def _file_world(ds, voxel) -> np.ndarray:
    """(S, A, R) world position of napari voxel (k, j, i) computed from a DICOM file's own attributes."""
    _, j, i = voxel
    row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    lps = np.asarray(ds.ImagePositionPatient, float) + i * row * float(ds.PixelSpacing[1]) + j * col * float(ds.PixelSpacing[0])
    ras = lps * np.array([-1.0, -1.0, 1.0])
    return ras[::-1]


def test_open_dicom_folder_in_world_space(make_napari_viewer, tmp_path):
    import pydicom

    q, _ = np.linalg.qr(OBLIQUE[:3, :3])  # the oblique LPS-like directions, made orthonormal
    affine = OBLIQUE.copy()
    affine[:3, :3] = q * np.sign(np.diag(_)) @ np.diag([0.78, 0.79, 2.5])  # 0.78 x 0.79 mm pixels, 2.5 mm slices
    data = _dicom_series(tmp_path / "dicom", affine)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "dicom"), plugin=PLUGIN)
    assert type(layer).__name__ == "Image" and layer.name == "CT oblique"
    np.testing.assert_array_equal(layer.data, data)  # shuffled files, sorted along the normal
    files = {int(pydicom.dcmread(p).InstanceNumber): pydicom.dcmread(p) for p in (tmp_path / "dicom").iterdir()}
    by_position = sorted(files.values(), key=lambda ds: np.dot(np.asarray(ds.ImagePositionPatient, float),
                                                               np.cross(np.asarray(ds.ImageOrientationPatient[:3], float),
                                                                        np.asarray(ds.ImageOrientationPatient[3:], float))))
    for voxel in [(0, 0, 0), (7, 19, 23), (3, 5, 11)]:
        np.testing.assert_allclose(layer.data_to_world(voxel), _file_world(by_position[voxel[0]], voxel), atol=1e-4)
    geom = layer.metadata["medseg_geometry"]
    assert geom["format"] == "dicom" and len(geom["dicom"]["instances"]) == 8


def test_dicom_seg_painted_and_saved_from_the_viewer(make_napari_viewer, tmp_path):
    from napari_medseg.io import read_volume, write_volume
    from napari_medseg.widgets._layers import check_same_grid, resolve_image_input

    affine = np.array([[-0.7, 0, 0, 90.0], [0, 0, 2.0, -30.0], [0, -0.8, 0, 40.0], [0, 0, 0, 1]])  # coronal, LPS-like
    _dicom_series(tmp_path / "study", affine, description="CT coronal")
    source = read_volume(tmp_path / "study")
    seg = np.zeros(source.data.shape, np.uint8)
    seg[2:5, 5:12, 6:14] = 1
    write_volume(tmp_path / "study" / "seg.dcm", seg, source, is_label=True, label_names={1: "tumour"})
    viewer = make_napari_viewer()
    image, labels = viewer.open(str(tmp_path / "study"), plugin=PLUGIN)
    assert type(labels).__name__ == "Labels" and labels.metadata["medseg_label_names"][1] == "tumour"
    check_same_grid(resolve_image_input([image]), labels)  # the SEG lies on the series' grid
    # a coronal series: napari shows it through a transposed view (slice axis along A, not S)
    assert labels.metadata["medseg_geometry"]["layer_axes"] == [1, 0, 2]
    assert labels.data.shape == (20, 8, 24) and image.data.shape == (20, 8, 24)
    np.testing.assert_array_equal(labels.data, np.transpose(seg, (1, 0, 2)))
    labels.data[1:4, 6, 1:4] = 2  # a correction, as the brush would paint it
    labels.metadata["medseg_label_names"][2] = "oedema"
    out = str(tmp_path / "corrected.dcm")
    assert labels.save(out, plugin=PLUGIN) == [out]
    back = read_volume(out)  # the file keeps the series' own layout
    np.testing.assert_array_equal(back.data, np.transpose(labels.data, (1, 0, 2)))
    assert back.data[6, 2, 2] == 2
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-6)
    assert back.header["label_names"] == {"1": "tumour", "2": "oedema"}
    (reopened,) = viewer.open(out, plugin=PLUGIN)
    np.testing.assert_array_equal(reopened.data, labels.data)
    for voxel in [(2, 6, 2), (8, 3, 10)]:
        np.testing.assert_allclose(reopened.data_to_world(voxel), image.data_to_world(voxel), atol=1e-6)


def test_nifti_and_oblique_dicom_sample_overlay(make_napari_viewer):
    """The shipped Colin27 crop as NIfTI (axis-aligned) and as an oblique DICOM series: at the world
    position of each DICOM voxel the NIfTI holds the same intensity (up to resampling)."""
    from scipy import ndimage

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "colin27_deepgm")
    viewer.open_sample(PLUGIN, "colin27_dicom")
    nifti, dicom = viewer.layers["Colin27 T1"], viewer.layers["Colin27 T1 oblique (synthetic)"]
    seg = viewer.layers["Colin27 deep GM labels (DICOM-SEG)"]
    assert not np.allclose(dicom.affine.affine_matrix, np.eye(4))  # truly oblique
    rng = np.random.default_rng(0)
    voxels = np.stack([rng.integers(5, n - 5, 400) for n in dicom.data.shape], axis=1)
    world = np.array([dicom.data_to_world(tuple(v)) for v in voxels])
    inside = np.array([nifti.world_to_data(w) for w in world])
    ok = np.all((inside > 1) & (inside < np.array(nifti.data.shape) - 2), axis=1)
    assert ok.sum() > 200
    expected = ndimage.map_coordinates(nifti.data.astype(np.float32), inside[ok].T, order=1)
    got = dicom.data[tuple(voxels[ok].T)]
    assert np.corrcoef(expected, got)[0, 1] > 0.99
    assert np.abs(expected - got).mean() < 2.0
    labels_nifti = viewer.layers["Colin27 deep GM labels"]
    lab_inside = np.round(np.array([labels_nifti.world_to_data(w) for w in world[ok]])).astype(int)
    agree = labels_nifti.data[tuple(lab_inside.T)] == seg.data[tuple(voxels[ok].T)]
    assert agree.mean() > 0.95  # the DICOM-SEG overlays the NIfTI labels in world space


def test_screenshot_dicom_series_and_segmentation(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1200, 800)
    viewer.open_sample(PLUGIN, "colin27_dicom")
    image, labels = viewer.layers["Colin27 T1 oblique (synthetic)"], viewer.layers["Colin27 deep GM labels (DICOM-SEG)"]
    viewer.dims.ndisplay = 2
    k = int(np.argmax((labels.data > 0).sum(axis=(1, 2))))  # the slice with most labels
    viewer.dims.set_point(0, float(image.data_to_world((k, 0, 0))[0]))
    viewer.camera.orientation2d = ("up", "right")
    viewer.reset_view()
    # napari's 2D view draws every slice of an oblique layer where slice 0 lies in-plane (it drops the
    # out-of-slice part of the transform), so centre on slice 0's middle
    middle = image.data_to_world((0, image.data.shape[1] / 2, image.data.shape[2] / 2))
    viewer.camera.center = tuple(float(c) for c in middle[1:])
    viewer.camera.zoom *= 1.4
    labels.opacity = 0.55
    with_labels = viewer.screenshot(canvas_only=True, flash=False)
    labels.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)
    labels.visible = True
    changed = np.any(with_labels[..., :3] != without[..., :3], axis=-1)
    assert changed.mean() > 0.01
    gray = without[..., :3].astype(int)
    assert (np.abs(gray[..., 0] - gray[..., 1]) < 3).mean() > 0.95
    assert (gray.sum(axis=-1) > 60).mean() > 0.1  # the scan is drawn
    if os.environ.get("MEDSEG_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        viewer.screenshot(path=str(DOCS / "screenshot_dicom.png"), canvas_only=False, flash=False)


# ------------------------------------------------------------- a plain napari picks this reader
@pytest.fixture
def fresh_napari_settings(tmp_path, monkeypatch):
    """napari settings of a new user: a private file, no reader preference, whatever earlier tests
    (or the developer's own napari) saved."""
    from napari import settings as napari_settings

    fresh = napari_settings.NapariSettings(config_path=tmp_path / "napari_settings.yaml")
    fresh._connect_events()
    monkeypatch.setattr(napari_settings, "_SETTINGS", fresh)
    assert not any(v == PLUGIN for v in fresh.plugins.extension2reader.values())
    return fresh


def _new_session() -> None:
    """As in a new napari session: the plugin has not been activated yet."""
    from npe2 import PluginManager

    PluginManager.instance().deactivate(PLUGIN)


def _volume_files(tmp_path) -> dict[str, str]:
    from napari_medseg.io import write_volume

    data = np.random.default_rng(3).normal(300, 50, (6, 8, 10)).astype(np.float32)  # napari order
    files = {"nifti": save(tmp_path / "plain" / "t1.nii.gz", data.T.copy(), np.diag([0.9, 0.8, 2.0, 1.0]))}
    files["nrrd"] = write_volume(tmp_path / "plain" / "t2.nrrd", data, None, spacing=(2.0, 0.8, 0.9),
                                 translate=(5.0, -3.0, 1.0))
    return files


def test_plain_napari_opens_volumes_with_this_plugin_after_its_first_use(
        make_napari_viewer, fresh_napari_settings, tmp_path, monkeypatch):
    """napari's own reader claims *.nii.gz and *.nrrd too and napari keeps no reader priority: a new
    user's first open of such a file asks. The first use of any of the plugin's contributions (here
    a sample) records the preference (npe2 ``on_activate``), and from then on napari's
    ``open(path, plugin=None)``, File > Open and drag-and-drop use this reader without a question."""
    from napari.errors import MultipleReaderError

    files = _volume_files(tmp_path)
    viewer = make_napari_viewer()
    _new_session()
    with pytest.raises(MultipleReaderError):  # napari would show "Choose reader"
        viewer.open(files["nifti"], plugin=None)

    viewer.open_sample(PLUGIN, "phantom")  # first use of the plugin in this session
    prefs = fresh_napari_settings.plugins.extension2reader
    assert {p: prefs.get(p) for p in ("*.nii", "*.nii.gz", "*.nrrd", "*.mha", "*.mhd", "*.dcm")} == dict.fromkeys(
        ("*.nii", "*.nii.gz", "*.nrrd", "*.mha", "*.mhd", "*.dcm"), PLUGIN)

    for kind, path in files.items():
        (layer,) = viewer.open(path, plugin=None)
        assert layer.source.reader_plugin == PLUGIN, kind
        assert layer.metadata["medseg_source"] == path
    np.testing.assert_allclose(viewer.layers["t1"].scale, [2.0, 0.8, 0.9])
    np.testing.assert_allclose(viewer.layers["t2"].translate, [5.0, -3.0, 1.0])

    # File > Open goes through the same preference: no reader dialog
    import napari._qt.qt_viewer as qt_viewer

    monkeypatch.setattr(qt_viewer, "handle_gui_reading", lambda *a, **k: pytest.fail("napari asked for a reader"))
    before = len(viewer.layers)
    viewer.window._qt_viewer._qt_open([files["nifti"]], stack=False)
    assert len(viewer.layers) == before + 1
    assert viewer.layers[-1].metadata["medseg_source"] == files["nifti"]


def test_a_reader_chosen_by_the_user_is_kept(make_napari_viewer, fresh_napari_settings):
    fresh_napari_settings.plugins.extension2reader = {"*.nrrd": "napari"}
    viewer = make_napari_viewer()
    _new_session()
    viewer.open_sample(PLUGIN, "phantom")
    prefs = fresh_napari_settings.plugins.extension2reader
    assert prefs["*.nrrd"] == "napari" and prefs["*.nii.gz"] == PLUGIN


def test_ct_opens_with_the_soft_tissue_window_and_mr_with_percentiles(make_napari_viewer, tmp_path):
    shape = (30, 32, 12)  # (i, j, k)
    i, j = np.indices(shape[:2])
    body = (np.hypot(i - 15, j - 16) < 11)[..., None].repeat(shape[2], axis=2)
    ct = np.where(body, 40, -1000) + np.random.default_rng(4).integers(-30, 30, shape)  # HU, with noise
    ct[12:15, 14:18] += 900  # bone
    ct = ct.astype(np.int16)
    mr = np.where(body, 400.0, 0.0).astype(np.float32) + np.random.default_rng(4).normal(0, 20, shape).astype(np.float32)
    viewer = make_napari_viewer()
    (ct_layer,) = viewer.open(save(tmp_path / "ct.nii.gz", ct, np.eye(4)), plugin=PLUGIN)
    (mr_layer,) = viewer.open(save(tmp_path / "mr.nii.gz", mr, np.eye(4)), plugin=PLUGIN)
    np.testing.assert_allclose(ct_layer.contrast_limits, [-160.0, 240.0])  # W400 / L40, not min..max
    assert ct_layer.metadata["medseg_window"] == "CT soft tissue"
    np.testing.assert_allclose(mr_layer.contrast_limits, np.percentile(mr, [1, 99]), rtol=1e-5)
    assert mr_layer.metadata["medseg_window"] == "MR 1-99 %"
