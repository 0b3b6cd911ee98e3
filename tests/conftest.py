"""Fixtures shared by all tests."""

from __future__ import annotations

import os

import pytest
import torch

# The widgets freeze the objects alive after the engine's import (no full garbage collection of
# napari's and torch's objects while a job runs). In a test process that would keep earlier tests'
# viewers out of collection: off here; tests/widgets/test_quiet_import.py turns it on where it tests it.
os.environ.setdefault("MEDSEG_GC_FREEZE", "0")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (small models: less contention on a shared 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_napari_settings(tmp_path, monkeypatch):
    """napari settings of a new user (a private file, no reader preference yet): the reader
    preference the plugin records stays in the test."""
    from napari import settings as napari_settings

    fresh = napari_settings.NapariSettings(config_path=tmp_path / "napari_settings.yaml")
    fresh._connect_events()
    monkeypatch.setattr(napari_settings, "_SETTINGS", fresh)
    return fresh
