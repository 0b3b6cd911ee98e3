"""Fixtures for the reliability tests: one torch thread and a private ``MEDSEG_HOME``."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread_and_home(one_thread, tmp_path, monkeypatch):
    """Single-threaded torch (tiny tensors on a busy machine) and a private ``MEDSEG_HOME``."""
    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path / "medseg_home"))
