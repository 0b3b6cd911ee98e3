"""Fixtures for the reliability tests: one torch thread and a private ``MEDSEG_HOME``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_home(tmp_path, monkeypatch):
    """Single-threaded torch (tiny tensors on a busy machine) and a private ``MEDSEG_HOME``."""
    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path / "medseg_home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
