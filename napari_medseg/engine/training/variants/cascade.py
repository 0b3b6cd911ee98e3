"""The cascade's trainer variant: one hook, :meth:`CascadeTrainer.prepare_batch` (convention 8).

Patches carry the previous stage's labels as their last image channel (see ``prepare_data``). The
hook splits them off, augments image and both label maps with the same spatial transform (labels
by nearest neighbour), perturbs the previous stage's one-hot as nnU-Net v1 does
(:func:`~napari_medseg.engine.cascade.perturb_onehot`) and appends it to the image channels.
"""

from __future__ import annotations

import os
import shutil

import torch

from .cascade import PREVIOUS_STAGE_FILE, onehot_torch, perturb_onehot
from .training import Trainer


class CascadeTrainer(Trainer):
    """:class:`Trainer` for ``3d_cascade_fullres``: image + one-hot of the low-res prediction."""

    def __init__(self, config, data):
        super().__init__(config, data)
        self._gen = torch.Generator().manual_seed(self.config.seed + 777 + self.rank)
        if self.rank != 0:  # under torchrun only rank 0 writes into the run folder
            return
        os.makedirs(self.config.output_dir, exist_ok=True)
        target = os.path.join(self.config.output_dir, PREVIOUS_STAGE_FILE)
        if os.path.abspath(self.config.previous_stage) != os.path.abspath(target):
            shutil.copyfile(self.config.previous_stage, target)

    def prepare_batch(self, images, labels, train: bool = True):
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        image, previous = images[:, :-1], images[:, -1:].round().to(labels.dtype)
        both = torch.cat([labels, previous], dim=1)
        if train and self.augmenter is not None:
            image, both = self.augmenter(image, both)
        labels, previous = both[:, :1], both[:, 1:]
        onehot = onehot_torch(previous, self.num_classes)
        if train:
            onehot = perturb_onehot(onehot, self._gen)
        return torch.cat([image, onehot.to(image.dtype)], dim=1), labels
