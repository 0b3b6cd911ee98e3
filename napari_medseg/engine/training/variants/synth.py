"""Training with domain randomisation (``augment="synth"``; CLI ``--augment synth``).

:class:`SynthTrainer` trains on a mix of real-image patches (ordinary augmentation) and images
painted from the cases' full label maps by
:class:`~napari_medseg.engine.data.synth.LabelSynthesizer` (SynthSeg-style: random contrast,
shape, resolution, bias, noise and field of view). It is meant for data sets with few label
maps: the model learns anatomy rather than one scanner's look.

**Full label maps.** A dataset may declare generation-only classes in ``dataset.json``
(``"generation_labels": {"white_matter": 9, ...}``, values beyond the ``labels``): the label files
then label every voxel (tissues, skull, air), the generator paints each class, and the loss sees
only ``labels`` (generation-only values become background). Other trainers read such a dataset
with those values as background. Without generation labels the generator paints the target
classes and background only.

``variant_options`` keys (all optional):

* ``synth_fraction``: share of each batch that is synthetic (default 0.5; the rest are real);
* ``synth_strip_labels``: label values painted as air in "skull-stripped" samples (e.g. scalp
  and skull classes of a head label map);
* ``synth_config``: a dict of :class:`~napari_medseg.engine.data.synth.SynthConfig` fields.

Needs single-channel images (the generator paints one channel).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace

import torch

from napari_medseg.engine.data import (
    LabelSynthesizer,
    PatchSampler,
    SynthConfig,
    enlarged_patch_size,
)
from napari_medseg.engine.jobs import Message, Progress
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.training.config import TrainingError, register_variant_option
from napari_medseg.engine.training.registry import register_trainer
from napari_medseg.engine.training.trainer import Trainer

SYNTH = "synth"  #: the ``TrainConfig.augment`` value that selects this trainer
DEFAULT_FRACTION = 0.5
for _key in ("synth_fraction", "synth_strip_labels", "synth_config"):
    register_variant_option(_key)


def _wants_synth(config, plan) -> bool:
    return config.augment == SYNTH


@register_trainer("synth", when=_wants_synth)
class SynthTrainer(Trainer):
    """Real and synthetic patches, half and half by default (see the module docstring)."""

    @classmethod
    def prepare_cases(cls, config, inputs, plan: Plan) -> Generator[Progress | Message, None, list]:
        """The cases with their full label maps (generation-only values kept)."""
        if inputs.raw_cases is not None:
            inputs.raw_cases = [replace(rc, keep_generation=True) for rc in inputs.raw_cases]
        return (yield from super().prepare_cases(config, inputs, plan))

    def _label_count(self) -> int:
        top = self.plan.num_classes - 1
        for case in self.data.train_cases:
            top = max(top, int(case.label.max()))
        return top + 1

    def make_sampler(self, patch: tuple[int, ...], batch_size: int) -> PatchSampler:
        """Enlarged patches (room for the generator's deformation); forced samples on targets."""
        if self.in_channels != 1:
            raise TrainingError(f"--augment synth paints one channel; this data has {self.in_channels}.")
        cfg = self.config
        return PatchSampler(
            self.data.train_cases, enlarged_patch_size(patch), batch_size,
            oversample_foreground=cfg.oversample_foreground, seed=self.sampler_seed,
            ignore_label=cfg.ignore_label, final_patch_size=patch,
            foreground_classes=range(1, self.plan.num_classes),
        )

    def make_augmenter(self, patch: tuple[int, ...]):
        """The real-image augmenter; also builds ``self.synthesizer`` and the target lookup."""
        opts = self.config.variant_options
        n_labels = self._label_count()
        lut = [v if v < self.plan.num_classes else 0 for v in range(n_labels)]
        if self.config.ignore_label is not None and self.config.ignore_label < n_labels:
            lut[self.config.ignore_label] = self.config.ignore_label
        self.target_lut = torch.tensor(lut, dtype=torch.int64, device=self.device)
        self.synth_fraction = float(opts.get("synth_fraction", DEFAULT_FRACTION))
        if not 0.0 <= self.synth_fraction <= 1.0:
            raise TrainingError(f"synth_fraction must be in [0, 1], got {self.synth_fraction}")
        mirror = self.config.mirror_axes if self.config.mirror_axes is not None else range(len(patch))
        self.synthesizer = LabelSynthesizer(
            n_labels, lut, patch, SynthConfig(**dict(opts.get("synth_config") or {})),
            strip_labels=opts.get("synth_strip_labels") or (), mirror_axes=tuple(mirror),
            seed=self.sampler_seed + 7,
        )
        self._coin = torch.Generator().manual_seed(self.sampler_seed + 11)
        return super().make_augmenter(patch)

    def prepare_batch(self, images: torch.Tensor, labels: torch.Tensor, train: bool = True):
        """Training: each sample synthetic with probability ``synth_fraction``, else augmented;
        validation: real patches. Labels through the target lookup."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if not train:
            return images, self.target_lut[labels.clamp(0, self.target_lut.numel() - 1)]
        synthetic = torch.rand(images.shape[0], generator=self._coin) < self.synth_fraction
        out_images, out_labels = [], []
        for i in range(images.shape[0]):
            if synthetic[i]:
                img, lab = self.synthesizer(labels[i:i + 1])
            else:
                img, lab = images[i:i + 1], labels[i:i + 1]
                if self.augmenter is not None:
                    img, lab = self.augmenter(img, lab)
                lab = self.target_lut[lab.clamp(0, self.target_lut.numel() - 1)]
            out_images.append(img.to(images.dtype))
            out_labels.append(lab)
        return torch.cat(out_images), torch.cat(out_labels)


__all__ = ["SYNTH", "SynthTrainer"]
