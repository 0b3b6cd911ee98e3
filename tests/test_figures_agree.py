"""One source for each model figure: the README's model table, ``napari-medseg models`` and the
model library all show ``engine.evaluation.default_parameter_count`` (issue 18, point 6)."""

from __future__ import annotations

import json
import os
import re

import pytest

import napari_medseg
from napari_medseg.cli import main
from napari_medseg.engine.evaluation import default_parameter_count

README = os.path.join(os.path.dirname(os.path.dirname(napari_medseg.__file__)), "README.md")
ROW = re.compile(r"^\| `([a-z0-9-]+)` \| [a-z]+ \| \dD \| ([0-9.]+) M \|", re.M)

pytestmark = pytest.mark.slow


def test_readme_cli_and_library_show_the_same_parameter_counts(capsys):
    readme = dict(ROW.findall(open(README, encoding="utf-8").read()))
    assert {"rkseg-l", "rkseg-r", "unet-3d-fullres", "pfseg"} <= set(readme)
    assert main(["models", "--json"]) == 0
    cli = {m["name"]: m["parameters"] for m in json.loads(capsys.readouterr().out)}
    for name, shown in readme.items():
        figure = f"{default_parameter_count(name) / 1e6:.2f}"
        assert shown == figure, (name, shown, figure)
        assert cli[name] == f"{figure}M", name


HELDOUT_ROW = re.compile(r"^\| `([a-z0-9_]+)` \|[^|]*\|((?: [0-9.]+ \|){6}) \*\*([0-9.]+)\*\* \| ([0-9]+) \|", re.M)


def test_readme_shows_the_catalogues_held_out_figures_of_the_shipped_model():
    """The README's held-out table is the catalogue's (``scripts/train_default_model.py`` writes
    both from one evaluation): per structure, the mean and the voxels labelled outside the brain."""
    with open(os.path.join(os.path.dirname(napari_medseg.__file__), "checkpoints", "catalog.json")) as fh:
        heldout = json.load(fh)["colin27_deepgm_unet3d.pt"]["heldout"]
    rows = {key: (cells, mean, outside) for key, cells, mean, outside in
            HELDOUT_ROW.findall(open(README, encoding="utf-8").read())}
    assert set(heldout) <= set(rows), (sorted(heldout), sorted(rows))
    for case, figures in heldout.items():
        cells, mean, outside = rows[case]
        per_structure = [float(v) for v in cells.replace("|", " ").split()]
        assert per_structure == [round(v, 3) for v in figures["dice"].values()], case
        assert mean == f"{figures['mean_dice']:.3f}" and int(outside) == figures["outside_brain_voxels"], case
