"""The default inferer: each checkpoint's plan preprocesses the image, the sliding window runs,
the softmax is restored to the source geometry and averaged over the ensemble.

:class:`SlidingWindowInferer` serves every checkpoint no variant claims: U-Nets in 2D and 3D, RKSeg,
SDN, the cross-dimensional models. A 2D model on a volume runs slice by slice along axis 0 (the
window batches the slices as tiles), so no separate slice inferer is needed.

Two extension points, both documented hooks:

* :class:`InputStage` (registered with :func:`register_input_stage`, chosen per plan): how the
  source image becomes the network input of a plan, and which checkpoints may share that input. The
  default stage preprocesses; the cascade (``inference/variants/cascade.py``) first runs its
  previous stage and appends that stage's one-hot as input channels.
* :meth:`SlidingWindowInferer.build_model` and :meth:`SlidingWindowInferer.window`: the predictor of
  a checkpoint and the window it runs in (subclass, or wrap them to observe a prediction).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_medseg.engine.checkpoints import Checkpoint, build_model, check_compatible
from napari_medseg.engine.inference.config import PredictConfig
from napari_medseg.engine.inference.inferers import (
    Inferer,
    class_weights_of,
    clean_labels,
    finish_ensemble,
    label_names_of,
    plan_of,
    register_inferer,
    tta_mirror_axes,
)
from napari_medseg.engine.inference.postprocessing import (
    PredictionResult,
    argmax_relative,
    softmax_inplace,
)
from napari_medseg.engine.inference.sliding_window import Predictor, sliding_window
from napari_medseg.engine.inference.tiling import count_tiles
from napari_medseg.engine.jobs import Progress, relay
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.preprocessing import (
    CaseProperties,
    LazyNormalizedImage,
    is_resampled,
    preprocess_case,
    restore_labels,
    restore_probabilities,
)
from napari_medseg.engine.runtime import resolve_device
from napari_medseg.engine.runtime.memory import accumulation_device
from napari_medseg.engine.runtime.oom import sliding_window_with_fallback

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- input stages
class InputStage:
    """Extension point of :class:`SlidingWindowInferer`: how the image becomes a plan's network input.

    The base class is the default stage (plain preprocessing). A variant subclasses it, overrides
    :meth:`applies` (a predicate on the plan) and whatever else differs, and registers an instance
    with :func:`register_input_stage`.
    """

    name = "preprocess"

    def applies(self, plan: Plan) -> bool:
        """Hook: whether this stage prepares the input of ``plan``.

        Called by :func:`input_stage_for` for every plan of a prediction; must be cheap and must
        not raise. The default stage applies to every plan.
        """
        return True

    def group_key(self, plan: Plan, ckpt: Checkpoint, index: int) -> str:
        """Hook: checkpoints with equal keys share one prepared input.

        Called once per checkpoint (``index`` is its position in the ensemble) before anything is
        prepared. The default is the plan itself (as sorted JSON), so the folds of one
        configuration preprocess the image once. Must return a string.
        """
        return json.dumps(plan.to_dict(), sort_keys=True)

    def prepare(
        self, image: np.ndarray, spacing: tuple[float, ...], plan: Plan, ckpt: Checkpoint, config: PredictConfig
    ) -> Generator[Progress, None, tuple[Any, CaseProperties]]:
        """Hook: the network input of ``plan`` for ``image``.

        Called once per group of checkpoints (``ckpt`` is the group's first member), in the
        inferer's ``"preprocess"`` stage.

        Args:
            image: ``(C, *spatial)`` source image (napari order); a 2D image has 2 spatial axes.
            spacing: Its spacing, one value per spatial axis.
            plan: The plan of the group.
            ckpt: The group's first checkpoint.
            config: The prediction settings.

        Returns:
            A generator (it may yield ``Progress`` of its own work) returning ``(input, props)``:
            the ``(C', *grid)`` input on the plan grid (an array or a
            :class:`~napari_medseg.engine.preprocessing.preprocess.LazyNormalizedImage`) and the
            :class:`~napari_medseg.engine.preprocessing.preprocess.CaseProperties` that restore
            outputs to the source geometry. The default preprocesses lazily: without resampling
            tiles are normalised when read, and no float32 copy of the volume is made.
        """
        yield from ()  # plain preprocessing reports no events of its own
        pre, _, props = preprocess_case(image, spacing, plan, lazy=True)
        return pre, props


_DEFAULT_STAGE = InputStage()
_STAGES: list[InputStage] = []


def register_input_stage(stage: InputStage) -> InputStage:
    """Register an :class:`InputStage`; registered stages are asked in order, before the default.

    Returns:
        ``stage``.
    """
    if not isinstance(stage, InputStage):
        raise ValueError(f"register_input_stage needs an InputStage, got {type(stage).__name__}.")
    _STAGES.append(stage)
    return stage


def unregister_input_stage(stage: InputStage) -> None:
    """Remove a registered :class:`InputStage` (a plugin unloading, a test cleaning up); no-op if absent."""
    if stage in _STAGES:
        _STAGES.remove(stage)


def input_stage_for(plan: Plan) -> InputStage:
    """The first registered stage that applies to ``plan``, else the default (plain preprocessing)."""
    return next((s for s in _STAGES if s.applies(plan)), _DEFAULT_STAGE)


# ----------------------------------------------------------------------------------- the inferer
@dataclass
class PreparedInput:
    """One group of checkpoints sharing a prepared input.

    Attributes:
        plan: The group's plan.
        members: Indices of its checkpoints in the ensemble.
        image: The network input (see :meth:`InputStage.prepare`); ``None`` once consumed.
        props: What restores outputs to the source geometry.
    """

    plan: Plan
    members: list[int]
    image: Any
    props: CaseProperties


class SlidingWindowInferer(Inferer):
    """The default inferer: the sliding window over each checkpoint's preprocessed input.

    Checkpoints sharing an input (:meth:`InputStage.group_key`) share the preparation; each runs
    in the sliding window (mirroring over the axes it was trained mirrored on), on the out-of-memory
    ladder of :func:`~napari_medseg.engine.runtime.oom.sliding_window_with_fallback`; the softmax of
    each group is averaged, restored to the source geometry, and averaged over groups weighted by
    their size. One checkpoint asked for labels only, without resampling back, takes a shorter
    road: logits relative to class 0 (one volume fewer) and the argmax on the plan grid.
    """

    name = "sliding_window"

    def claims(self, ckpt: Checkpoint) -> bool:
        """Every checkpoint (the default inferer)."""
        return True

    def build_model(self, ckpt: Checkpoint, device: torch.device) -> Predictor:
        """Hook: the predictor of ``ckpt`` on ``device``.

        Called once per checkpoint, just before its tiles run. Must return a callable
        ``(B, C, *patch) -> (B, K, *patch)`` logits (or a list/tuple whose first item is), in eval
        mode. The default rebuilds the checkpoint's model.
        """
        return build_model(ckpt, device)

    def window(
        self, predictor: Predictor, image: Any, patch_size: Sequence[int], num_classes: int, **options: Any
    ) -> Generator[Progress, None, torch.Tensor]:
        """Hook: the sliding window of one checkpoint.

        Called once per checkpoint and out-of-memory rung, with the arguments of
        :func:`~napari_medseg.engine.inference.sliding_window.sliding_window` (``options``: step,
        batch_size, mirror_axes, device, accumulate_device, relative). Must return its generator
        (or one that behaves the same).
        """
        return sliding_window(predictor, image, patch_size, num_classes, **options)

    def run(
        self, image: np.ndarray, spacing: tuple[float, ...], ckpts: Sequence[Checkpoint], config: PredictConfig
    ) -> Generator[Progress, None, PredictionResult]:
        """Segment ``image`` with ``ckpts``; see :meth:`Inferer.run`."""
        for ck in ckpts:
            check_compatible(ck, image.shape[0], len(spacing))
            class_weights_of(ck)  # a malformed recommendation fails before the compute, not after
        plans = [plan_of(ck) for ck in ckpts]
        dev = resolve_device(config.device)
        groups = yield from self._prepare(image, spacing, ckpts, plans, config)
        counts = {
            i: count_tiles(g.image.shape[1:], g.plan.patch_size, config.step, tta_mirror_axes(ckpts[i], config.mirror))
            for g in groups for i in g.members
        }
        total = sum(counts.values())
        # Labels only, one checkpoint, no resampling back: accumulate logits relative to class 0
        # (num_classes - 1 volumes) and take the argmax on the plan grid; the softmax, the restore of
        # K probability volumes and their mean are never needed (the same labels: argmax is unchanged
        # by softmax and by the shift, and restoring without resampling is a crop and a transpose).
        if (
            len(ckpts) == 1 and ckpts[0].num_classes >= 2
            and not (config.return_probabilities or config.return_uncertainty)
            and not is_resampled(groups[0].props, groups[0].plan)
        ):
            return (yield from self._labels_only(groups[0], ckpts[0], config, dev, total))
        mean: np.ndarray | None = None
        done = 0
        for group in groups:
            group_mean = yield from self._group_mean(group, ckpts, config, dev, done, counts, total)
            done += sum(counts[i] for i in group.members)
            group.image = None  # free the prepared input before the restore (peak memory)
            restored = np.asarray(
                restore_probabilities(group_mean, group.props, group.plan, overwrite_input=True), dtype=np.float32
            )
            del group_mean
            restored *= len(group.members) / len(ckpts)
            mean = restored if mean is None else np.add(mean, restored, out=mean)

        return (yield from finish_ensemble(mean, config, ckpts))

    def _prepare(
        self, image: np.ndarray, spacing: tuple[float, ...], ckpts: Sequence[Checkpoint], plans: list[Plan],
        config: PredictConfig,
    ) -> Generator[Progress, None, list[PreparedInput]]:
        """Group the checkpoints by input and prepare each group's input (``"preprocess"`` stage)."""
        groups: dict[str, list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(input_stage_for(plan).group_key(plan, ckpts[i], i), []).append(i)
        prepared = []
        yield Progress("preprocess", 0, len(groups))
        for g, members in enumerate(groups.values()):
            plan = plans[members[0]]
            pre, props = yield from input_stage_for(plan).prepare(image, spacing, plan, ckpts[members[0]], config)
            prepared.append(PreparedInput(plan, members, pre, props))
            yield Progress("preprocess", g + 1, len(groups))
        return prepared

    def _input_tensor(
        self, group: PreparedInput, num_classes: int, labels_only: bool, dev: torch.device
    ) -> tuple[Any, torch.device]:
        """The group's input where the window reads it, and where the logits are accumulated."""
        pre = group.image
        nbytes = (num_classes * (1 if labels_only else 2) + 1 + pre.shape[0]) * int(np.prod(pre.shape[1:])) * 4
        acc_dev = accumulation_device(dev, nbytes)
        if isinstance(pre, LazyNormalizedImage) and acc_dev.type != "cpu":
            pre = pre.materialize()  # accumulating on the GPU: the image goes there once
        tensor = pre if isinstance(pre, LazyNormalizedImage) else (
            torch.from_numpy(np.ascontiguousarray(pre, dtype=np.float32)).to(acc_dev)
        )
        return tensor, acc_dev

    def _logits(
        self, ckpt: Checkpoint, tensor: Any, plan: Plan, acc_dev: torch.device, dev: torch.device,
        config: PredictConfig, relative: bool, done: int, total: int,
    ) -> Generator[Progress, None, torch.Tensor]:
        """One checkpoint's blended logits, on the out-of-memory ladder; tiles counted from ``done``."""
        model = self.build_model(ckpt, dev)
        axes = tta_mirror_axes(ckpt, config.mirror)

        def tiles(event: Progress) -> Progress:
            return Progress("tiles", done + event.current, total, event.message)

        def window(bs: int, acc: torch.device) -> Generator[Progress, None, torch.Tensor]:
            # One rung of the out-of-memory ladder: fewer tiles, then CPU accumulation.
            lazy = isinstance(tensor, LazyNormalizedImage)
            src = tensor if lazy or acc == tensor.device else tensor.to(acc)
            return relay(self.window(
                model, src, plan.patch_size, ckpt.num_classes, step=config.step, batch_size=bs,
                mirror_axes=axes, device=dev, accumulate_device=acc, relative=relative,
            ), tiles)

        return (yield from sliding_window_with_fallback(
            window, config.batch_size, acc_dev, dev, what=f"an image of {'x'.join(map(str, tensor.shape))} voxels",
        ))

    def _group_mean(
        self, group: PreparedInput, ckpts: Sequence[Checkpoint], config: PredictConfig, dev: torch.device,
        done: int, counts: dict[int, int], total: int,
    ) -> Generator[Progress, None, np.ndarray]:
        """The mean softmax of a group's checkpoints on the plan grid (a float32 CPU array)."""
        tensor, acc_dev = self._input_tensor(group, ckpts[0].num_classes, False, dev)
        group_sum = None
        for i in group.members:
            logits = yield from self._logits(ckpts[i], tensor, group.plan, acc_dev, dev, config, False, done, total)
            done += counts[i]
            with torch.inference_mode():
                probs = softmax_inplace(logits)  # in place: no second K-channel volume
                if group_sum is not None and group_sum.device != probs.device:  # one member fell back to CPU
                    group_sum, probs = group_sum.cpu(), probs.cpu()
                group_sum = probs if group_sum is None else group_sum.add_(probs)
            del logits, probs
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        with torch.inference_mode():
            n = len(group.members)
            return (group_sum.div_(n) if n > 1 else group_sum).cpu().numpy()

    def _labels_only(
        self, group: PreparedInput, ckpt: Checkpoint, config: PredictConfig, dev: torch.device, total: int
    ) -> Generator[Progress, None, PredictionResult]:
        """One checkpoint, labels only: relative logits, argmax on the plan grid, labels restored."""
        tensor, acc_dev = self._input_tensor(group, ckpt.num_classes, True, dev)
        logits = yield from self._logits(ckpt, tensor, group.plan, acc_dev, dev, config, True, 0, total)
        del tensor
        group.image = None
        yield Progress("postprocess", 0, 1)
        labels = argmax_relative(logits, weights=class_weights_of(ckpt))
        del logits  # before the restore: the K - 1 volumes are the peak
        labels = restore_labels(labels, group.props, group.plan)
        labels = clean_labels(labels, config, ckpt)
        result = PredictionResult(labels=labels)
        result.label_names = label_names_of(ckpt)
        yield Progress("postprocess", 1, 1)
        return result


register_inferer(SlidingWindowInferer(), default=True)


__all__ = [
    "InputStage",
    "PreparedInput",
    "SlidingWindowInferer",
    "input_stage_for",
    "register_input_stage",
    "unregister_input_stage",
]
