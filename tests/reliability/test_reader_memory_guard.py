"""NRRD and MetaImage readers estimate their memory from the header and refuse before reading."""

from __future__ import annotations

import numpy as np
import pytest
from rel_helpers import tree_hashes

from napari_medseg.io import VolumeError, read_volume, write_volume
from napari_medseg.io.limits import MEMORY_ENV


@pytest.mark.parametrize("name", ["scan.nrrd", "scan.mha"])
def test_reader_refuses_a_volume_larger_than_the_memory_cap(tmp_path, monkeypatch, name):
    path = tmp_path / name
    data = np.random.default_rng(0).normal(size=(40, 64, 64)).astype(np.float32)  # 655 kB of voxels
    write_volume(str(path), data, None, spacing=(1.0, 1.0, 1.0))
    assert read_volume(str(path)).data.shape == data.shape
    before = tree_hashes(tmp_path)
    monkeypatch.setenv(MEMORY_ENV, "0.0005")  # 0.5 MB allowed
    with pytest.raises(VolumeError, match="reading 64 x 64 x 40"):
        read_volume(str(path))
    assert tree_hashes(tmp_path) == before
