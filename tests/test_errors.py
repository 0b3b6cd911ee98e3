"""One base for the package's errors (``napari_medseg.MedsegError``), each keeping the built-in
class it always had, so that existing ``except ValueError`` code still works."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import napari_medseg
from napari_medseg import MedsegError


def _package_error_classes() -> dict[str, type]:
    """Every exception class defined in a module of the package (widgets included)."""
    found = {}
    for info in pkgutil.walk_packages(napari_medseg.__path__, "napari_medseg."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_error_the_package_defines_is_a_medseg_error():
    classes = _package_error_classes()
    assert len(classes) >= 20, sorted(classes)
    # control flow, not failures: a stop request and a cancelled job
    not_errors = {name for name, cls in classes.items() if not name.endswith("Error")}
    missing = sorted(name for name, cls in classes.items() if name not in not_errors and not issubclass(cls, MedsegError))
    assert missing == [], missing


@pytest.mark.parametrize("name, builtin", [
    ("napari_medseg.engine.data.dataset.DatasetError", ValueError),
    ("napari_medseg.io.volume.VolumeError", ValueError),
    ("napari_medseg.io.atomic.AtomicWriteError", OSError),
    ("napari_medseg.engine.runtime.oom.InsufficientMemoryError", RuntimeError),
    ("napari_medseg.engine.inference.config.DomainError", ValueError),
])
def test_errors_keep_their_builtin_base(name, builtin):
    module, cls = name.rsplit(".", 1)
    error = getattr(importlib.import_module(module), cls)
    assert issubclass(error, MedsegError) and issubclass(error, builtin)


def test_the_api_raises_it_for_a_missing_file(tmp_path):
    with pytest.raises(MedsegError, match="no such file"):
        napari_medseg.predict_file(tmp_path / "missing.nii.gz", tmp_path / "out.nii.gz", "colin27_deepgm_unet3d")


def test_the_cli_shows_a_memory_error_of_ours_as_the_users_not_as_a_bug():
    from napari_medseg.cli import _one_line
    from napari_medseg.engine.runtime import InsufficientMemoryError

    line = _one_line(InsufficientMemoryError("Out of memory at batch 1 and the smallest patch."))
    assert line.startswith("error: Out of memory") and "internal error" not in line
