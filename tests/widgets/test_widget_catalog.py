"""The checkpoint catalogue (engine/catalog.py): shipped + user checkpoints, atomic index."""

from __future__ import annotations

import json
import os
import sys

import pytest

from napari_medseg.engine.checkpoints import CheckpointError, catalog


def test_catalog_imports_no_qt():
    import subprocess  # pytest-qt has Qt loaded here: check in a fresh interpreter

    code = "import sys, napari_medseg.engine.checkpoints.catalog; sys.exit(any(m in sys.modules for m in ('qtpy', 'napari', 'PyQt5')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_user_dir_follows_medseg_home(medseg_home):
    assert catalog.user_checkpoint_dir() == medseg_home / "checkpoints"


def test_register_and_list(tiny_checkpoint, medseg_home):
    path = tiny_checkpoint("liver", register=False, num_classes=3)
    assert all(i.path != os.path.realpath(path) for i in catalog.list_checkpoints())
    info = catalog.register_checkpoint(path, name="Liver test", training_data="phantoms", dice={"organ_1": 0.5})
    assert info.name == "Liver test" and info.num_classes == 3 and info.in_channels == 1
    listed = [i for i in catalog.list_checkpoints() if i.path == os.path.realpath(path)]
    assert len(listed) == 1
    entry = listed[0]
    assert entry.model_name == "unet-3d-fullres" and entry.spatial_dims == 3
    assert entry.label_names == {0: "background", 1: "organ_1", 2: "organ_2"}
    assert entry.dice == {"organ_1": 0.5} and not entry.shipped
    assert entry.model_kwargs["base_width"] == 4
    index = json.loads((medseg_home / "checkpoints" / "index.json").read_text())
    assert os.path.realpath(path) in index
    assert catalog.unregister_checkpoint(path)
    assert all(i.path != os.path.realpath(path) for i in catalog.list_checkpoints())


def test_a_class_absent_from_validation_does_not_stop_the_registration(tiny_checkpoint, medseg_home):
    """A fine-tune validated on held-out slices without one class has Dice NaN for it: JSON cannot
    hold NaN, and the checkpoint went unregistered (so not listed in Segment)."""
    path = tiny_checkpoint("nan", register=False, num_classes=3)
    info = catalog.register_checkpoint(path, name="corrected", dice={"organ_1": 0.7, "organ_2": float("nan")})
    assert info.dice == {"organ_1": 0.7}
    assert [i.dice for i in catalog.list_checkpoints() if i.path == os.path.realpath(path)] == [{"organ_1": 0.7}]


def test_register_refuses_non_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        catalog.register_checkpoint(bad)
    with pytest.raises(TypeError):
        catalog.register_checkpoint(bad, colour="red")


def test_unreadable_files_are_skipped(tmp_path, tiny_checkpoint):
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "broken.pt").write_bytes(b"garbage")
    good = tiny_checkpoint("good", register=False)
    os.replace(good, folder / "good.pt")
    names = [os.path.basename(i.path) for i in catalog.list_checkpoints(extra_dirs=[folder])]
    assert names.count("good.pt") == 1 and "broken.pt" not in names


def test_shipped_folder_has_a_catalog():
    assert (catalog.SHIPPED_DIR / "catalog.json").is_file()
    assert isinstance(json.loads((catalog.SHIPPED_DIR / "catalog.json").read_text()), dict)
