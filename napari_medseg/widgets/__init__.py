"""Qt widgets (npe2 widget contributions): thin layers over the engine, no compute.

``SegmentWidget`` (inference), ``TrainWidget`` (training / fine-tuning) and ``ModelLibraryWidget``
(architectures and checkpoints). Imported lazily so that importing this package stays cheap.
"""

from __future__ import annotations

__all__ = ["ModelLibraryWidget", "SegmentWidget", "TrainWidget"]

_WHERE = {
    "SegmentWidget": "._segment",
    "TrainWidget": "._train",
    "ModelLibraryWidget": "._library",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
