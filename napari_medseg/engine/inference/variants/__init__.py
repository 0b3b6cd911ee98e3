"""Inference variants: each registers itself where the inference pipeline expects it.

* :mod:`.patchfree` registers :class:`~.patchfree.PatchFreeInferer` (an inferer) for whole-volume,
  super-resolving models (PFSeg).
* :mod:`.cascade` registers :class:`~.cascade.CascadeInput` (an input stage of the default
  sliding-window inferer) for nnU-Net's cascade.

Imported at the bottom of ``napari_medseg/engine/inference/__init__.py``, so importing anything from
the inference package registers them.
"""

from napari_medseg.engine.inference.variants import cascade, patchfree

__all__ = ["cascade", "patchfree"]
