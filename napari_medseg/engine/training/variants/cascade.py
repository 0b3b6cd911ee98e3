"""The nnU-Net (v1) cascade's trainer variant: a full-resolution stage that sees the low-res prediction.

Isensee et al., "nnU-Net", Nature Methods 18, 2021: the ``3d_cascade_fullres`` stage takes the image
channels plus the one-hot (``num_classes - 1`` channels) of the ``3d_lowres`` stage's segmentation,
resampled to the full-resolution grid. During training that segmentation is perturbed (random
binary morphology per class, random removal of connected components) so that the second stage
learns to correct the first.

:class:`CascadeTrainer` is chosen for every run whose plan is a cascade stage. It overrides two
hooks (convention 8):

* :meth:`CascadeTrainer.prepare_cases` segments every case with the previous stage (the checkpoint
  in ``TrainConfig.variant_options["previous_stage"]``) and appends its labels, on the plan's grid,
  as an extra image channel, so that patches and spatial augmentation treat them like the image;
* :meth:`CascadeTrainer.prepare_batch` splits that channel off, augments image and both label maps
  with the same spatial transform (labels by nearest neighbour), perturbs the previous stage's
  one-hot (:func:`perturb_onehot`) and appends it to the image channels.

The low-res checkpoint is copied beside the cascade's checkpoints as ``previous_stage.pt``, where
inference finds it. Data too small for the planner's low-res stage may still ask for the cascade:
it then runs on the ``3d_fullres`` plan (a derived configuration).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_medseg.engine.checkpoints import load_checkpoint
from napari_medseg.engine.data import Case, case_from_arrays
from napari_medseg.engine.inference.variants.cascade import (
    PREVIOUS_STAGE_FILE,
    is_cascade,
    previous_stage_labels,
)
from napari_medseg.engine.jobs import Message, Progress
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.preprocessing import preprocess_case
from napari_medseg.engine.training.config import TrainConfig, TrainingError, register_variant_option
from napari_medseg.engine.training.prepare import CaseInputs, register_derived_configuration
from napari_medseg.engine.training.registry import register_trainer
from napari_medseg.engine.training.trainer import Trainer

#: ``TrainConfig.variant_options`` key: path of the trained ``3d_lowres`` checkpoint.
PREVIOUS_STAGE = "previous_stage"
CASCADE, FULLRES, LOWRES = "3d_cascade_fullres", "3d_fullres", "3d_lowres"

register_variant_option(PREVIOUS_STAGE)  # older configs stored it as a top-level setting


def cascade_on_fullres(plans: dict[str, Plan]) -> Plan | None:
    """The cascade stage on the ``3d_fullres`` plan, for data the planner made no low-res stage for."""
    if FULLRES not in plans:
        return None
    return replace(plans[FULLRES], configuration=CASCADE, extras={PREVIOUS_STAGE: LOWRES})


register_derived_configuration(
    CASCADE, cascade_on_fullres,
    "The planner made no low-res stage for this data; the cascade uses the 3d_fullres plan.",
)


def onehot_torch(seg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, *sp)`` integer segmentation -> ``(B, K - 1, *sp)`` float one-hot without background."""
    seg = seg[:, 0].long().clamp_(0, num_classes - 1)
    return torch.stack([(seg == c) for c in range(1, num_classes)], dim=1).float()


def _morphology(pool):
    def dilate(x, r):
        return pool(x[None, None], kernel_size=2 * r + 1, stride=1, padding=r)[0, 0]

    def erode(x, r):
        return 1 - dilate(1 - x, r)

    return {0: dilate, 1: erode, 2: lambda x, r: dilate(erode(x, r), r), 3: lambda x, r: erode(dilate(x, r), r)}


def perturb_onehot(
    onehot: torch.Tensor, generator: torch.Generator | None = None, p_morph: float = 0.4,
    p_remove: float = 0.2, max_radius: int = 4,
) -> torch.Tensor:
    """nnU-Net's cascade augmentation on a one-hot batch, per sample and class.

    With probability ``p_morph`` one of dilation, erosion, opening or closing with a cube of random
    radius 1..``max_radius`` (max-pooling, so it runs on the GPU); with probability ``p_remove`` one
    random connected component of the class is removed (on the CPU, as nnU-Net does).
    """
    out = onehot.clone()
    b, k = out.shape[:2]
    ops = _morphology(F.max_pool3d if out.ndim - 2 == 3 else F.max_pool2d)
    rand = torch.rand(b, k, 3, generator=generator)
    radii = torch.randint(1, max_radius + 1, (b, k), generator=generator)
    for i in range(b):
        for c in range(k):
            x = out[i, c]
            if rand[i, c, 0] < p_morph and x.any():
                x = ops[int(rand[i, c, 1] * 4) % 4](x, int(radii[i, c]))
            if rand[i, c, 2] < p_remove and x.any():
                lab, n = ndimage.label(x.detach().cpu().numpy() > 0.5)
                if n > 1:
                    drop = int(torch.randint(1, n + 1, (1,), generator=generator))
                    x = x * torch.from_numpy(lab != drop).to(x)
            out[i, c] = x
    return out


def _previous_stage_path(config: TrainConfig) -> str:
    path = (config.variant_options or {}).get(PREVIOUS_STAGE)
    if not path:
        raise TrainingError(
            "This is a cascade stage: give the trained 3d_lowres checkpoint as previous_stage "
            "(--previous-stage)."
        )
    return str(path)


def _is_cascade_run(config: TrainConfig, plan: Plan) -> bool:
    return is_cascade(plan)


@register_trainer("cascade", when=_is_cascade_run)
class CascadeTrainer(Trainer):
    """:class:`Trainer` for ``3d_cascade_fullres``: image + one-hot of the low-res prediction."""

    def __init__(self, config, data):
        super().__init__(config, data)
        self._gen = torch.Generator().manual_seed(self.config.seed + 777 + self.rank)
        if self.rank != 0:  # under torchrun only rank 0 writes into the run folder
            return
        os.makedirs(self.config.output_dir, exist_ok=True)
        source = _previous_stage_path(self.config)
        target = os.path.join(self.config.output_dir, PREVIOUS_STAGE_FILE)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)

    @classmethod
    def prepare_cases(
        cls, config: TrainConfig, inputs: CaseInputs, plan: Plan
    ) -> Generator[Progress | Message, None, list[Case]]:
        """Preprocess each case and append the previous stage's labels (on the plan's grid) as a channel.

        Raises:
            TrainingError: ``variant_options`` names no previous stage.
        """
        previous = load_checkpoint(_previous_stage_path(config))
        cases = []
        for i in range(len(inputs)):
            img, sp, lab = inputs.read(i)
            prev = yield from previous_stage_labels(img, sp, previous, device=config.device, mirror=False)
            case = case_from_arrays(img, lab, sp, plan, name=inputs.name(i), ignore_label=config.ignore_label)
            _, prev_grid, _ = preprocess_case(img, sp, plan, label=prev)
            case.image = np.concatenate([case.image, prev_grid[None].astype(np.float32)])
            cases.append(case)
            yield Progress("preprocess", i + 1, len(inputs), case.name)
        return cases

    def prepare_batch(self, images, labels, train: bool = True):
        """Split off the previous stage's channel, augment, and append its (perturbed) one-hot."""
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


__all__ = ["PREVIOUS_STAGE", "CascadeTrainer", "cascade_on_fullres", "onehot_torch", "perturb_onehot"]
