"""Annotation helpers that need no model: filling the slices a user did not paint.

:func:`fill_between_slices` interpolates a label map painted on some slices (every few slices along
one axis, as in 3D Slicer's or ITK-SNAP's "fill between slices") by shape-based interpolation;
:func:`painted_slices` lists the slices that hold a label. It is the baseline a fine-tuned model has
to beat on the same painted slices.
"""

from napari_medseg.engine.annotation.interpolation import fill_between_slices, painted_slices

__all__ = ["fill_between_slices", "painted_slices"]
