"""Importing torch in the background without holding napari's event loop, and keeping what it made
out of full garbage collections without leaking napari's layers (widgets/_quiet_import)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

from napari_medseg.widgets._quiet_import import (
    FREEZE_ENV,
    FrozenImports,
    collector_paused,
    torch_library_paths,
)


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


# ------------------------------------------------ FrozenImports: no full collection of the imports
class _Node:
    """A reference cycle (only the collector can reclaim it) that a weak reference can watch."""

    def __init__(self):
        self.me = self


@pytest.fixture
def policy(monkeypatch):
    """A FrozenImports over a settable list of keys, freezing on; everything unfrozen after."""
    monkeypatch.setenv(FREEZE_ENV, "1")
    keys: list[str] = []
    frozen = FrozenImports(lambda: list(keys))
    frozen.keys = keys
    assert gc.get_freeze_count() == 0
    yield frozen
    frozen.close()
    gc.unfreeze()


def test_what_is_frozen_is_not_scanned_by_a_full_collection(policy):
    junk = [[i] for i in range(100_000)]
    assert policy.freeze()
    assert gc.get_freeze_count() >= 100_000
    tracked = len(gc.get_objects())  # the objects a full collection scans
    assert tracked < 100_000
    del junk


def test_a_released_key_unfreezes_and_its_cycle_is_reclaimed_then_frozen_again(policy):
    node = _Node()
    alive = weakref.ref(node)
    policy.keys.append("layer-a")
    assert policy.freeze()
    del node
    gc.collect()
    assert alive() is not None  # frozen: the collector never looks at it (why removal must unfreeze)
    assert not policy.released("layer-b")  # not alive at the freeze: nothing to do
    assert gc.get_freeze_count() > 0
    assert policy.released("layer-a")
    assert gc.get_freeze_count() == 0 and policy.waiting
    gc.collect()  # the next full collection reclaims it, and the policy freezes again after it
    assert alive() is None
    assert policy.active and not policy.waiting and gc.get_freeze_count() > 0


def test_refreeze_collects_the_unfrozen_garbage_before_freezing(policy):
    assert policy.freeze()
    before = gc.get_freeze_count()
    garbage = _Node()
    gone = weakref.ref(garbage)
    del garbage
    kept = [[i] for i in range(1000)]
    policy.keys.append("later")
    assert policy.refreeze()
    assert gone() is None  # collected, not frozen
    assert gc.get_freeze_count() >= before + 1000 and "later" in policy.frozen_keys
    del kept


def test_freezing_can_be_turned_off_and_leaves_an_applications_freeze_alone(policy, monkeypatch):
    monkeypatch.setenv(FREEZE_ENV, "0")
    assert not policy.freeze() and gc.get_freeze_count() == 0
    monkeypatch.setenv(FREEZE_ENV, "1")
    gc.freeze()  # the application's own
    count = gc.get_freeze_count()
    assert not policy.freeze() and not policy.refreeze()
    assert gc.get_freeze_count() == count
    gc.unfreeze()


def test_a_failing_layer_listing_freezes_nothing(monkeypatch):
    monkeypatch.setenv(FREEZE_ENV, "1")

    def broken():
        raise RuntimeError("viewer closed")

    frozen = FrozenImports(broken)
    assert not frozen.freeze() and gc.get_freeze_count() == 0


@pytest.mark.gui
def test_a_layer_alive_at_the_freeze_is_freed_after_napari_removes_it(make_napari_viewer, monkeypatch):
    """The widgets' wiring: the engine warm-up freezes; removing a layer of the viewer that was
    alive then lets the collector free its data (without the release it would stay)."""
    from napari_medseg.widgets import _common
    from napari_medseg.widgets._segment import SegmentWidget

    monkeypatch.setenv(FREEZE_ENV, "1")
    monkeypatch.setattr(_common, "_FROZEN", None)
    monkeypatch.setattr(_common, "_WATCHES", [])
    viewer = make_napari_viewer()
    data = np.zeros((8, 16, 16), np.float32)
    freed = weakref.ref(data)
    viewer.add_image(data, name="scan")
    kept = viewer.add_labels(np.zeros((8, 16, 16), np.uint8), name="kept")
    del data
    widget = SegmentWidget(viewer)  # watches the viewer
    loader = _common._EngineLoader()  # a fresh loader: its warm-up (modules already imported) emits
    loader.warm()
    try:
        assert _common.frozen_imports().active
        assert {layer.unique_id for layer in viewer.layers} <= _common.frozen_imports().frozen_keys
        viewer.layers.remove("scan")
        gc.collect()
        assert freed() is None
        assert _common.frozen_imports().active  # frozen again after that collection
        assert kept.unique_id in _common.frozen_imports().frozen_keys
    finally:
        _common.frozen_imports().close()
        gc.unfreeze()
    widget.close()


@pytest.mark.gui
def test_a_viewers_layers_stay_listed_when_the_widgets_proxy_of_it_is_gone(make_napari_viewer, monkeypatch):
    """napari hands each plugin widget its own proxy of the viewer; the watch must not die with it
    (a freeze after the widgets closed would otherwise miss the layers, which would then leak)."""
    from napari.utils._proxies import PublicOnlyProxy

    from napari_medseg.widgets import _common

    monkeypatch.setattr(_common, "_WATCHES", [])
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((4, 8, 8), np.float32), name="scan")
    proxy = PublicOnlyProxy(viewer)
    _common.watch_viewer(proxy)
    del proxy
    gc.collect()
    assert _common._layer_keys() == [layer.unique_id]
    viewer.layers.remove(layer)
    assert _common._layer_keys() == []
