"""The nnU-Net (v1) cascade: a full-resolution U-Net that also sees the low-resolution prediction.

Isensee et al., "nnU-Net", Nature Methods 18, 2021: the ``3d_cascade_fullres`` stage takes the image
channels plus the one-hot (``num_classes - 1`` channels) of the ``3d_lowres`` stage's segmentation,
resampled to the full-resolution grid. During training that segmentation is perturbed (random
binary morphology per class, random removal of connected components) so that the second stage
learns to correct the first.

The low-res checkpoint is copied beside the cascade's checkpoints as ``previous_stage.pt`` and the
cascade checkpoint names it in ``train_config["previous_stage"]``; :func:`previous_stage_checkpoint`
finds it again at inference.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .events import Progress
from .planning import Plan

PREVIOUS_STAGE_FILE = "previous_stage.pt"


def is_cascade(plan: Plan) -> bool:
    """Whether ``plan`` is a cascade stage (it needs a previous stage's segmentation)."""
    return bool(plan.previous_stage)


def previous_stage_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """The low-res checkpoint that a cascade checkpoint builds on (beside it, or at its recorded path)."""
    recorded = ckpt.train_config.get("previous_stage")
    candidates = []
    if ckpt.path:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(ckpt.path)), PREVIOUS_STAGE_FILE))
    if recorded:
        candidates.append(str(recorded))
    for path in candidates:
        if os.path.isfile(path):
            return load_checkpoint(path)
    raise CheckpointError(
        "This cascade checkpoint needs its low-resolution stage, which was not found "
        f"(looked for {', '.join(candidates) or PREVIOUS_STAGE_FILE}). Keep {PREVIOUS_STAGE_FILE} beside it."
    )


def previous_stage_labels(
    image: np.ndarray, spacing, previous: Checkpoint, **predict_kwargs
) -> Generator[Progress, None, np.ndarray]:
    """Segment ``image`` (source geometry) with the previous stage; returns its labels."""
    from .inference import predict

    gen = predict(image, spacing, [previous], **predict_kwargs)
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value.labels
        yield Progress(f"previous stage {event.stage}", event.current, event.total, event.message)


def cascade_input(
    image: np.ndarray, spacing, plan: Plan, previous_labels: np.ndarray, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, object]:
    """Preprocess ``image`` with the cascade plan and append the previous stage's one-hot channels.

    Returns ``(input (C + K - 1, *grid), label on the grid or None, CaseProperties)``.
    """
    from .preprocessing import preprocess_case

    pre, lab, props = preprocess_case(image, spacing, plan, label=label)
    _, prev, _ = preprocess_case(image, spacing, plan, label=np.asarray(previous_labels))
    onehot = np.stack([(prev == c) for c in range(1, plan.num_classes)]).astype(np.float32)
    return np.concatenate([pre, onehot]), lab, props


def onehot_torch(seg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, *sp)`` integer segmentation -> ``(B, K - 1, *sp)`` float one-hot without background."""
    seg = seg[:, 0].long().clamp_(0, num_classes - 1)
    return torch.stack([(seg == c) for c in range(1, num_classes)], dim=1).float()


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
    dims = out.ndim - 2
    pool = F.max_pool3d if dims == 3 else F.max_pool2d

    def dilate(x, r):
        return pool(x[None, None], kernel_size=2 * r + 1, stride=1, padding=r)[0, 0]

    def erode(x, r):
        return 1 - dilate(1 - x, r)

    ops = {0: lambda x, r: dilate(x, r), 1: lambda x, r: erode(x, r),
           2: lambda x, r: dilate(erode(x, r), r), 3: lambda x, r: erode(dilate(x, r), r)}
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
