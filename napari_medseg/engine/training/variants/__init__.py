"""Trainer variants; importing this package registers them (nnU-Net v2's ``nnUNetTrainer/variants``).

Each variant subclasses :class:`~napari_medseg.engine.training.trainer.Trainer`, overrides public
hooks only and registers itself with
:func:`~napari_medseg.engine.training.registry.register_trainer`; registration order is the order
in which :func:`~napari_medseg.engine.training.registry.trainer_for` asks them.
"""

from napari_medseg.engine.training.variants import cascade, pfseg, synth  # noqa: F401  (importing registers)
from napari_medseg.engine.training.variants.cascade import CascadeTrainer
from napari_medseg.engine.training.variants.pfseg import PFSegTrainer
from napari_medseg.engine.training.variants.synth import SynthTrainer

__all__ = ["CascadeTrainer", "PFSegTrainer", "SynthTrainer"]
