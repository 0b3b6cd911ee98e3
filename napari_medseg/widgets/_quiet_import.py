"""Importing torch in a background thread without stalling napari's event loop.

A background thread does not help by itself: Python holds the GIL while it loads an extension
module, and loading ``torch._C`` first loads ``libtorch_cpu`` (hundreds of MB) and runs its
static initialisers (every operator registers itself): about half a second in which napari's
event loop cannot run. The hundreds of thousands of objects that the import allocates then set
off garbage collections (a full one scans napari's objects too), which hold the GIL as well.

So :func:`quiet_imports`:

1. loads torch's C++ libraries first by calling the C library's ``dlopen`` through ctypes, which
   releases the GIL during a foreign call: the static initialisers run while napari draws. The
   import then finds them loaded (the dynamic loader shares a library by its name). Libraries
   that depend on Python (``libtorch_python``) are left to the import;
2. pauses the garbage collector for the imports, then hands the objects they made to the oldest
   generation at once (``gc.freeze()`` then ``gc.unfreeze()``: both constant-time list splices),
   so the young-generation collections do not scan them and no full collection is due at once.

That leaves the *next* full collection: it scans every object of napari and torch (half a million,
0.4-1.2 s here) and whichever thread sets it off holds the GIL meanwhile; a training run set one
off in its worker and napari's event loop stood still for 1.2 s (``bench_widgets.py --stalls
--trace``). :class:`FrozenImports` therefore freezes for good what is alive once the engine is
imported and warmed (``gc.freeze()``: modules, classes, functions, napari's window; later full
collections scan only what was made after). A frozen object is never collected, so a napari layer
alive at that moment would leak once removed: the widgets report each removed layer
(:meth:`FrozenImports.released`), and the removal of one that was frozen unfreezes everything (the
next full collection reclaims it, with the usual pause) and freezes again after that collection.
``MEDSEG_GC_FREEZE=0`` turns this off; objects an application froze itself are left alone.

Measured (``benchmarks/bench_widgets.py --imports``, ``--stalls``): see the README's table.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

logger = logging.getLogger(__name__)

#: torch's C++ libraries that need no Python, in dependency order (those present are loaded).
TORCH_LIBRARIES = ("libc10", "libtorch_cpu", "libc10_cuda", "libtorch_cuda", "libtorch")


def torch_library_paths() -> list[str]:
    """The files of :data:`TORCH_LIBRARIES` in the installed torch (without importing it)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return []
    folder = os.path.join(os.path.dirname(spec.origin), "lib")
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    paths = (os.path.join(folder, name + suffix) for name in TORCH_LIBRARIES)
    return [p for p in paths if os.path.isfile(p)]


def preload_torch_libraries() -> list[str]:
    """``dlopen`` torch's C++ libraries with the GIL released (Linux and macOS; a no-op elsewhere
    or once torch is imported). Returns the paths loaded; a failure only loses the head start."""
    if "torch" in sys.modules or not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return []
    try:
        libc = ctypes.CDLL(None)  # a CDLL function call releases the GIL (a PyDLL one would not)
        dlopen = libc.dlopen
        dlopen.restype = ctypes.c_void_p
        dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    except (OSError, AttributeError):
        return []
    loaded = []
    for path in torch_library_paths():
        if dlopen(os.fsencode(path), os.RTLD_NOW | os.RTLD_LOCAL):
            loaded.append(path)
        else:  # the import will load it (and say why it cannot)
            logger.debug("could not preload %s", path)
            break
    return loaded


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection inside; the objects made inside join the oldest generation after."""
    was_enabled = gc.isenabled()
    others_frozen = gc.get_freeze_count() > 0  # the application froze objects itself: leave them
    gc.disable()
    try:
        yield
    finally:
        if not others_frozen:
            gc.freeze()
            gc.unfreeze()
        if was_enabled:
            gc.enable()


#: Set to ``0`` to keep the collector as Python leaves it (no freezing after the engine's import).
FREEZE_ENV = "MEDSEG_GC_FREEZE"


class FrozenImports:
    """Keep what is alive after the engine's import out of the collector's full scans, without
    leaking the napari layers that were alive then.

    Args:
        keys_now: the keys (napari layers' ``unique_id``) of what must be reclaimable when it is
            released later; called when freezing (in the GUI thread, or in the thread whose full
            collection re-freezes). It may raise: nothing is frozen then.
    """

    def __init__(self, keys_now: Callable[[], Iterable[str]]):
        self._keys_now = keys_now
        self._lock = threading.RLock()  # a collection inside freeze() may call back into it
        self.frozen_keys: set[str] = set()
        self.active = False  # objects frozen by us
        self.waiting = False  # unfrozen after a release: freeze again after the next full collection
        self._hooked = False

    @staticmethod
    def enabled() -> bool:
        return os.environ.get(FREEZE_ENV, "1").strip() != "0"

    def freeze(self) -> bool:
        """Freeze everything alive now (constant time) and note the keys alive now. Returns whether
        it froze (not when turned off, or when the application froze objects itself)."""
        with self._lock:
            if not self.enabled() or (gc.get_freeze_count() > 0 and not self.active):
                return False
            keys = self._current_keys()
            if keys is None:
                return False
            gc.freeze()
            self.frozen_keys, self.active, self.waiting = keys, True, False
            return True

    def _current_keys(self) -> set[str] | None:
        """The keys alive now; None when they cannot be listed (then nothing may be frozen: an
        unlisted layer would leak once removed)."""
        try:
            return set(self._keys_now())
        except Exception:  # noqa: BLE001 - whatever the listing raised
            logger.debug("could not list the layers; not freezing", exc_info=True)
            return None

    def refreeze(self) -> bool:
        """After a later import (matplotlib for the first curves): collect the unfrozen objects
        (only those are scanned: cheap while the rest is frozen, so no garbage gets frozen), then
        freeze what is alive. Only while frozen (never turns freezing on). Returns whether it froze."""
        with self._lock:
            if not self.active:
                return False
            gc.collect()
            keys = self._current_keys()
            if keys is None:
                return False
            gc.freeze()
            self.frozen_keys |= keys
            return True

    def released(self, key: str) -> bool:
        """``key`` is gone (a layer removed): if it was alive at the freeze, unfreeze everything so
        the collector can reclaim it, and freeze again after the next full collection. Returns
        whether it unfroze."""
        with self._lock:
            if not self.active or key not in self.frozen_keys:
                return False
            gc.unfreeze()
            self.frozen_keys, self.active, self.waiting = set(), False, True
            if not self._hooked:  # registered once: a callback must not remove itself from the list
                gc.callbacks.append(self._after_collection)
                self._hooked = True
            return True

    def _after_collection(self, phase: str, info: dict) -> None:
        if phase == "stop" and info.get("generation") == 2 and self.waiting:
            self.freeze()

    def close(self) -> None:
        """Unfreeze what we froze and stop watching collections (tests, a plugin unloaded)."""
        with self._lock:
            if self.active:
                gc.unfreeze()
            self.frozen_keys, self.active, self.waiting = set(), False, False
            if self._hooked:
                with contextlib.suppress(ValueError):
                    gc.callbacks.remove(self._after_collection)
                self._hooked = False


def quiet_imports(names: Iterable[str]) -> None:
    """Import ``names`` (in a background thread) with as little hold on the GIL as we can."""
    names = [n for n in names if n not in sys.modules]
    if not names:
        return
    preload_torch_libraries()
    with collector_paused():
        for name in names:
            importlib.import_module(name)


__all__ = ["FREEZE_ENV", "FrozenImports", "collector_paused", "preload_torch_libraries", "quiet_imports", "torch_library_paths"]
