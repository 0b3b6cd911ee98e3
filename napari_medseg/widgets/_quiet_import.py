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
   Nothing is frozen for good (a frozen object is never collected).

Measured (``benchmarks/bench_widgets.py --imports``): see the README's table.
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
from collections.abc import Iterable, Iterator

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


def quiet_imports(names: Iterable[str]) -> None:
    """Import ``names`` (in a background thread) with as little hold on the GIL as we can."""
    names = [n for n in names if n not in sys.modules]
    if not names:
        return
    preload_torch_libraries()
    with collector_paused():
        for name in names:
            importlib.import_module(name)


__all__ = ["collector_paused", "preload_torch_libraries", "quiet_imports", "torch_library_paths"]
