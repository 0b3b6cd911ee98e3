"""`napari-medseg view --sample`: the README's main job opens the sample and docks every widget."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui


def test_view_opens_sample_and_docks_widgets(qtbot):
    from napari_medseg._launcher import launch_viewer

    viewer = launch_viewer([], sample=True, run=False)
    try:
        names = [layer.name for layer in viewer.layers]
        assert any("Colin27 T1" in n for n in names)
        docked = set(viewer.window.dock_widgets)
        for title in ("Segment", "Train / Fine-tune", "Model library"):
            assert any(title in d for d in docked), docked
    finally:
        viewer.close()


def test_cli_view_parses():
    from napari_medseg.cli import build_parser

    args = build_parser().parse_args(["view", "--sample", "a.nii.gz"])
    assert args.sample and args.files == ["a.nii.gz"]
