"""The README's "Python API" example runs as written (on the shipped sample, a one-case dataset)."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

import napari_medseg
from napari_medseg.io import read_nifti

PKG = os.path.dirname(napari_medseg.__file__)
README = os.path.join(os.path.dirname(PKG), "README.md")

pytestmark = pytest.mark.slow


def _readme_example() -> str:
    text = open(README, encoding="utf-8").read()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    data = os.path.join(PKG, "data")
    shutil.copy(os.path.join(data, "colin27_t1_deepgm.nii.gz"), tmp_path / "t1.nii.gz")
    ds = tmp_path / "my_dataset"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    shutil.copy(os.path.join(data, "colin27_t1_deepgm.nii.gz"), ds / "imagesTr" / "colin_0000.nii.gz")
    shutil.copy(os.path.join(data, "colin27_deepgm_labels.nii.gz"), ds / "labelsTr" / "colin.nii.gz")
    names = json.load(open(os.path.join(data, "labels.json")))["labels"]
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {v: int(k) for k, v in names.items()},
        "numTraining": 1, "file_ending": ".nii.gz",
    }))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path / "home"))
    exec(compile(_readme_example(), "README.md", "exec"), {})
    first = read_nifti(tmp_path / "t1_labels.nii.gz")
    tuned = read_nifti(tmp_path / "t1_labels_finetuned.nii.gz")
    source = read_nifti(tmp_path / "t1.nii.gz")
    assert first.data.shape == tuned.data.shape == source.data.shape
    np.testing.assert_allclose(tuned.affine, source.affine)
    assert set(np.unique(first.data)) > {0} and (tmp_path / "runs" / "finetune" / "checkpoint_final.pt").is_file()
