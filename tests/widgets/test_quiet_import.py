"""Importing torch in the background without holding napari's event loop (widgets/_quiet_import)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from napari_medseg.widgets._quiet_import import collector_paused, torch_library_paths


def test_the_torch_libraries_are_found_without_importing_torch():
    code = textwrap.dedent("""
        import sys
        from napari_medseg.widgets._quiet_import import torch_library_paths
        paths = torch_library_paths()
        print(len(paths), "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(len(torch_library_paths())), "False"]
    assert any("libtorch_cpu" in p for p in torch_library_paths())


def test_preloaded_libraries_are_the_ones_torch_then_uses():
    """dlopen'd before the import (GIL released), and torch imports and computes on them."""
    code = textwrap.dedent("""
        import sys
        from napari_medseg.widgets._quiet_import import preload_torch_libraries, quiet_imports
        loaded = preload_torch_libraries()
        maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
        assert "torch" not in sys.modules
        assert all(p in maps for p in loaded) if maps else True
        quiet_imports(["torch"])
        import torch
        print(len(loaded), float(torch.ones(3).sum()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    expected_loaded = len(torch_library_paths()) if sys.platform.startswith("linux") else int(out[0])
    assert out == [str(expected_loaded), "3.0"]


def test_the_collector_is_paused_inside_and_nothing_stays_frozen():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        junk = [[i] for i in range(50_000)]  # would set off collections with the collector on
        assert gc.get_count()[0] > 40_000
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.get_count()[0] < 50_000  # the objects went to the oldest generation, not the youngest
    del junk


def test_objects_frozen_by_the_application_stay_frozen():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with collector_paused():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
