"""napari-medseg: medical image segmentation inside napari.

The package is split into compute (``io``, ``models``, ``engine``, ``cli``), which never imports
Qt or napari, and ``widgets``, the thin Qt layer over the engine.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
