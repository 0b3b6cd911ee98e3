"""The npe2 manifest is valid, its python_names import, and compute code stays free of Qt/napari."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MANIFEST = Path(__file__).resolve().parents[1] / "napari_medseg" / "napari.yaml"


def manifest() -> dict:
    with open(MANIFEST) as fh:
        return yaml.safe_load(fh)


def commands() -> list[dict]:
    return manifest()["contributions"]["commands"]


def test_manifest_names_the_package():
    data = manifest()
    assert data["name"] == "napari-medseg"
    assert isinstance(data["contributions"]["commands"], list)


@pytest.mark.parametrize("command", commands(), ids=lambda c: c["id"])
def test_python_name_resolves_to_callable(command):
    module_name, _, attr = command["python_name"].partition(":")
    assert attr, f"{command['id']}: python_name must be 'module:attribute'"
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    assert callable(obj), command["python_name"]


def test_contributions_refer_to_declared_commands():
    ids = {c["id"] for c in commands()}
    contrib = manifest()["contributions"]
    for section in ("readers", "writers", "sample_data", "widgets"):
        for item in contrib.get(section) or []:
            assert item["command"] in ids, (section, item)


def test_npe2_validate():
    npe2_cli = Path(sys.executable).with_name("npe2")
    cmd = [str(npe2_cli), "validate", "napari-medseg"] if npe2_cli.exists() else [
        sys.executable, "-c", "import sys; from npe2.cli import app; sys.argv=['npe2','validate','napari-medseg']; app()"
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in (res.stdout + res.stderr).lower()


def test_npe2_sees_the_installed_manifest():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-medseg")
    assert {r.command for r in pm.contributions.readers} == {"napari-medseg.get_reader"}
    assert {s.key for s in pm.contributions.sample_data} >= {"colin27_deepgm", "phantom"}


def test_compute_modules_do_not_import_qt_or_napari():
    code = (
        "import sys\n"
        "import napari_medseg.io, napari_medseg.engine, napari_medseg.models\n"
        "import napari_medseg._reader, napari_medseg._writer, napari_medseg._sample_data\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('qtpy', 'napari', 'PyQt5', 'PySide2'))\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
