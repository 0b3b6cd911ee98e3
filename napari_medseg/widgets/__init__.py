"""Qt widgets (npe2 widget contributions): thin layers over the engine, no compute.

``SegmentWidget`` (inference), ``TrainWidget`` (training / fine-tuning), ``ModelLibraryWidget``
(architectures and checkpoints), ``FillBetweenSlicesWidget`` (shape-based interpolation) and
``DisplayWidget`` (radiological/neurological orientation, window presets). Imported lazily so that
importing this package stays cheap; opening a widget does not wait for torch either (the pickers
fill once it is imported in the background, see ``_common``).
"""

from __future__ import annotations

__all__ = ["DisplayWidget", "FillBetweenSlicesWidget", "ModelLibraryWidget", "SegmentWidget", "TrainWidget"]

_WHERE = {
    "SegmentWidget": "._segment",
    "TrainWidget": "._train",
    "ModelLibraryWidget": "._library",
    "FillBetweenSlicesWidget": "._fill",
    "DisplayWidget": "._display",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
