"""Radiology display logic without Qt or a viewer: standard views, direction letters, the plane a
volume was acquired in, intensity windows, and the reader's default window."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_medseg._launcher import (
    READER_PATTERNS,
    acquisition_plane,
    default_convention,
    direction_letters,
    view_spec,
)
from napari_medseg._reader import (
    FILE_PATTERNS,
    PERCENTILE_WINDOW,
    WINDOW_PRESETS,
    default_window,
    looks_like_ct,
    percentile_limits,
    volume_to_layer_data,
    window_limits,
)
from napari_medseg.io import Volume


# ------------------------------------------------------------------------------------ views
def test_axial_radiological_puts_anterior_up_and_patient_left_on_screen_right():
    spec = view_spec("axial", "radiological")
    assert spec.order == (0, 1, 2)  # slice along S; A drawn vertically, R horizontally
    assert spec.orientation2d == ("up", "left")
    assert spec.letters() == {"top": "A", "bottom": "P", "left": "R", "right": "L"}


def test_neurological_switch_mirrors_left_and_right_only():
    rad, neuro = view_spec("axial", "radiological"), view_spec("axial", "neurological")
    assert neuro.orientation2d == ("up", "right")
    assert neuro.letters() == {"top": "A", "bottom": "P", "left": "L", "right": "R"}
    assert (rad.order, rad.orientation2d[0]) == (neuro.order, neuro.orientation2d[0])


@pytest.mark.parametrize("plane, convention, order, letters", [
    ("coronal", "radiological", (1, 0, 2), {"top": "S", "bottom": "I", "left": "R", "right": "L"}),
    ("coronal", "neurological", (1, 0, 2), {"top": "S", "bottom": "I", "left": "L", "right": "R"}),
    ("sagittal", "radiological", (2, 0, 1), {"top": "S", "bottom": "I", "left": "A", "right": "P"}),
    ("sagittal", "neurological", (2, 0, 1), {"top": "S", "bottom": "I", "left": "A", "right": "P"}),
])
def test_coronal_and_sagittal_views(plane, convention, order, letters):
    spec = view_spec(plane, convention)
    assert spec.order == order and spec.letters() == letters


def test_napari_default_camera_shows_anterior_at_the_bottom():
    """What the issue reported: napari's default 2D camera draws the A axis downwards."""
    assert direction_letters((1, 2), ("down", "right")) == {"top": "P", "bottom": "A", "left": "L", "right": "R"}


def test_bad_plane_or_convention_is_refused():
    with pytest.raises(ValueError, match="plane"):
        view_spec("oblique")
    with pytest.raises(ValueError, match="convention"):
        view_spec("axial", "upside-down")


def test_convention_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEDSEG_CONVENTION", "Neurological")
    assert default_convention() == "neurological" and view_spec("axial").orientation2d == ("up", "right")
    monkeypatch.setenv("MEDSEG_CONVENTION", "nonsense")
    assert default_convention() == "radiological"


def _affine(columns, spacing) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(columns, float).T * np.asarray(spacing, float)
    return a


@pytest.mark.parametrize("columns, spacing, plane", [
    (np.eye(3), (1.0, 1.0, 1.0), "axial"),                    # isotropic: axial
    (np.eye(3), (0.8, 0.8, 3.0), "axial"),                    # thick slices along S
    ([[1, 0, 0], [0, 0, 1], [0, 1, 0]], (0.7, 0.7, 4.0), "coronal"),    # k along A (coronal slices)
    ([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], (0.9, 0.9, 5.0), "sagittal"),  # k along -R (LPS-like sagittal)
])
def test_acquisition_plane_from_the_affine(columns, spacing, plane):
    assert acquisition_plane(_affine(columns, spacing)) == plane


def test_acquisition_plane_of_an_oblique_coronal_series():
    angle = np.deg2rad(20)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    coronal = rot @ np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]]).T  # columns: R, S, A tilted by 20 degrees
    assert acquisition_plane(_affine(coronal.T, (0.5, 0.5, 3.0))) == "coronal"


def test_reader_patterns_are_the_readers():
    assert set(READER_PATTERNS) == set(FILE_PATTERNS)


# ---------------------------------------------------------------------------------- windows
def _hu_volume(shape=(20, 40, 40)) -> np.ndarray:
    """A CT-like volume in Hounsfield units: air around a soft-tissue cylinder with a bone rim."""
    z, y, x = np.indices(shape)
    r = np.hypot(y - shape[1] / 2, x - shape[2] / 2)
    data = np.full(shape, -1000, np.int16)
    data[r < 15] = 40
    data[(r >= 13) & (r < 15)] = 700
    return data + np.random.default_rng(0).integers(-20, 20, shape).astype(np.int16)


def _mr_volume(shape=(20, 40, 40)) -> np.ndarray:
    rng = np.random.default_rng(1)
    data = rng.gamma(4.0, 100.0, shape).astype(np.float32)
    data[:, :5] = 0
    return data


def test_presets_are_the_radiology_windows():
    assert {k: window_limits(*v) for k, v in WINDOW_PRESETS.items()} == {
        "CT soft tissue": (-160.0, 240.0), "CT lung": (-1350.0, 150.0),
        "CT bone": (-700.0, 1300.0), "CT brain": (0.0, 80.0),
    }


def test_ct_is_recognised_by_hounsfield_units_or_modality():
    ct, mr = _hu_volume(), _mr_volume()
    assert looks_like_ct(ct) and not looks_like_ct(mr)
    assert looks_like_ct(mr, "CT") and not looks_like_ct(ct, "MR")
    assert default_window(ct) == ("CT soft tissue", (-160.0, 240.0))


def test_mr_gets_the_percentile_window():
    mr = _mr_volume()
    name, (lo, hi) = default_window(mr)
    assert name == PERCENTILE_WINDOW
    np.testing.assert_allclose((lo, hi), np.percentile(mr, [1, 99]), rtol=1e-6)
    assert percentile_limits(np.zeros((4, 4, 4))) is None  # a constant image keeps napari's default


def test_reader_opens_a_hu_volume_with_the_soft_tissue_window():
    vol = Volume(_hu_volume(), (2.0, 0.8, 0.8), np.diag([0.8, 0.8, 2.0, 1.0]))
    ((_data, kwargs, kind),) = volume_to_layer_data(vol, name="ct")
    assert kind == "image"
    assert kwargs["contrast_limits"] == [-160.0, 240.0]
    assert kwargs["metadata"]["medseg_window"] == "CT soft tissue"


def test_reader_windows_each_channel_and_leaves_labels_alone():
    data = np.stack([_mr_volume(), 2 * _mr_volume()])
    vol = Volume(data, (1.0, 1.0, 1.0), np.eye(4), channel_axis=0)
    ((_d, kwargs, _k),) = volume_to_layer_data(vol, name="two")
    assert len(kwargs["contrast_limits"]) == 2
    assert kwargs["contrast_limits"][1][1] == pytest.approx(2 * kwargs["contrast_limits"][0][1], rel=0.05)
    labels = Volume(np.zeros((4, 5, 6), np.uint8), (1.0, 1.0, 1.0), np.eye(4))
    ((_d, kwargs, kind),) = volume_to_layer_data(labels, as_labels=True, name="lab")
    assert kind == "labels" and "contrast_limits" not in kwargs


def test_launcher_and_reader_import_without_qt_or_napari():
    code = (
        "import sys, napari_medseg._launcher, napari_medseg._reader\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('qtpy', 'napari', 'PyQt5', 'vispy'))\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
