"""nnU-Net (v1) generic U-Net, configurable by the experiment planner, in 2D or 3D.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18, 2021 (doi:10.1038/s41592-020-01008-z). Re-implemented from the
paper and ARCHITECTURES.md section 1; registered as ``unet-2d``, ``unet-3d-fullres``,
``unet-3d-lowres`` and ``unet-3d-cascade``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from napari_medseg.models import cpu_inference
from napari_medseg.models.blocks import ConvNormAct, conv_nd, conv_transpose_nd, init_he_
from napari_medseg.models.registry import ModelError, ModelSpec, register_model

logger = logging.getLogger(__name__)

DEFAULT_MAX_WIDTH = {2: 480, 3: 320}
DEFAULT_NUM_POOL = {2: 5, 3: 4}


def input_divisor(pool_kernels: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Per-axis number every input size must be divisible by: the product of the pool kernels."""
    if not pool_kernels:
        raise ModelError("pool_kernels is empty: input_divisor needs at least one pooling.")
    return tuple(math.prod(int(p[a]) for p in pool_kernels) for a in range(len(pool_kernels[0])))


def _check_kernels(value, name: str, spatial_dims: int, odd: bool) -> list[list[int]]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ModelError(f"{name} must be a list of per-axis kernel lists, got {value!r}.")
    out = []
    for i, k in enumerate(value):
        if isinstance(k, int) and not isinstance(k, bool):
            k = [k] * spatial_dims
        if not isinstance(k, Sequence) or len(k) != spatial_dims:
            raise ModelError(
                f"{name}[{i}] must have {spatial_dims} entries (one per axis), got {k!r}."
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in k):
            raise ModelError(f"{name}[{i}] must hold positive ints, got {k!r}.")
        if odd and not all(v % 2 == 1 for v in k):
            raise ModelError(f"{name}[{i}] must hold odd kernel sizes (same padding), got {k!r}.")
        out.append([int(v) for v in k])
    return out


def default_kernels(spatial_dims: int) -> tuple[list[list[int]], list[list[int]]]:
    """Isotropic default ``(pool_kernels, conv_kernels)``: 4 pools in 3D, 5 in 2D, all 3x3(x3)."""
    n = DEFAULT_NUM_POOL[spatial_dims]
    return [[2] * spatial_dims for _ in range(n)], [[3] * spatial_dims for _ in range(n + 1)]


class NNUNet(nn.Module):
    """nnU-Net (v1) ``Generic_UNet`` with strided-conv downsampling and transposed-conv upsampling.

    Encoder stage ``d`` is 2 x [conv (``conv_kernels[d]``) -> InstanceNorm (affine, eps 1e-5) ->
    LeakyReLU(0.01)]; the first conv of stage ``d >= 1`` has stride ``pool_kernels[d - 1]``. Widths
    ``base_width * 2**d`` capped at ``max_width``. Each decoder level upsamples with a transposed
    conv (kernel = stride = pool kernel, no bias) to the skip's width, concatenates the skip and
    applies 2 convs with the kernels of the encoder stage at the same resolution. Note: nnU-Net v1
    (``Generic_UNet``) uses the kernels of the stage one level deeper in the decoder; this only
    differs for anisotropic plans, and we follow the specification (mirrored stage) as nnU-Net v2 does.

    Deep supervision: when ``deep_supervision`` is set, a 1x1 head (no bias) sits on every decoder
    level and, in training mode, ``forward`` returns ``n_pool`` logits ``[full, 1/2, 1/4, ...]``
    (full resolution first), like v1, whose loss gives the lowest-resolution head weight 0 (see
    ``engine.losses.deep_supervision_weights``). In eval mode, and always without deep supervision,
    ``forward`` returns the full-resolution logits only. Weights: He normal (a = 0.01), zero bias.

    Args:
        in_channels: Channels of the network input.
        num_classes: Output channels (logits, no softmax).
        spatial_dims: 2 or 3.
        pool_kernels: One per-axis kernel list per downsampling (default: isotropic, 5 pools in
            2D, 4 in 3D).
        conv_kernels: ``len(pool_kernels) + 1`` per-axis kernel lists (default: all 3).
        deep_supervision: Build the auxiliary heads and return all decoder outputs in training
            mode. Default ``False`` here so that a plain model always returns a tensor; nnU-Net
            trains with it on, and the registered specs' ``training`` recipe says so.
        base_width: Width of stage 0 (32 in nnU-Net).
        max_width: Width cap (``None``: 480 in 2D, 320 in 3D).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int = 3,
        pool_kernels: Sequence[Sequence[int]] | None = None,
        conv_kernels: Sequence[Sequence[int]] | None = None,
        deep_supervision: bool = False,
        base_width: int = 32,
        max_width: int | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ModelError(f"NNUNet supports spatial_dims 2 or 3, got {spatial_dims!r}.")
        d = spatial_dims
        if pool_kernels is None and conv_kernels is None:
            pool_kernels, conv_kernels = default_kernels(d)
        elif pool_kernels is None:
            pool_kernels = [[2] * d for _ in range(len(conv_kernels) - 1)]
        pools = _check_kernels(pool_kernels, "pool_kernels", d, odd=False)
        if not pools:
            raise ModelError("pool_kernels must hold at least one downsampling step.")
        convs = (
            [[3] * d for _ in range(len(pools) + 1)]
            if conv_kernels is None
            else _check_kernels(conv_kernels, "conv_kernels", d, odd=True)
        )
        if len(convs) != len(pools) + 1:
            raise ModelError(
                f"conv_kernels needs len(pool_kernels) + 1 = {len(pools) + 1} entries "
                f"(one per encoder stage incl. the bottleneck), got {len(convs)}."
            )
        max_width = DEFAULT_MAX_WIDTH[d] if max_width is None else max_width
        if not (isinstance(base_width, int) and base_width >= 1):
            raise ModelError(f"base_width must be a positive int, got {base_width!r}.")
        if not (isinstance(max_width, int) and max_width >= base_width):
            raise ModelError(
                f"max_width must be an int >= base_width ({base_width}), got {max_width!r}."
            )

        self.spatial_dims, self.num_classes, self.in_channels = d, num_classes, in_channels
        self.pool_kernels, self.conv_kernels = pools, convs
        self.widths = [min(base_width * 2**s, max_width) for s in range(len(pools) + 1)]

        self.encoder = nn.ModuleList()
        prev = in_channels
        for s, (width, kernel) in enumerate(zip(self.widths, convs)):
            stride = pools[s - 1] if s > 0 else 1
            self.encoder.append(
                nn.Sequential(
                    ConvNormAct(prev, width, d, kernel, stride),
                    ConvNormAct(width, width, d, kernel),
                )
            )
            prev = width

        self.upsamples, self.decoder = nn.ModuleList(), nn.ModuleList()
        for s in range(len(pools) - 1, -1, -1):  # decoder level at the resolution of stage s
            skip = self.widths[s]
            self.upsamples.append(conv_transpose_nd(d)(prev, skip, pools[s], pools[s], bias=False))
            self.decoder.append(
                nn.Sequential(
                    ConvNormAct(2 * skip, skip, d, convs[s]),
                    ConvNormAct(skip, skip, d, convs[s]),
                )
            )
            prev = skip
        self.head = conv_nd(d)(self.widths[0], num_classes, 1, bias=False)
        # Heads of the coarser decoder levels, coarsest first (decoder order); deep supervision only.
        self.aux_heads = (
            nn.ModuleList(
                conv_nd(d)(self.widths[s], num_classes, 1, bias=False)
                for s in range(len(pools) - 1, 0, -1)
            )
            if deep_supervision
            else nn.ModuleList()
        )
        self._deep_supervision = bool(deep_supervision)
        # Inference on the CPU takes the channels-last, in-place forward (models/cpu_inference.py)
        # when nothing needs autograd; set False to always run the stock nn.Module graph.
        self.cpu_fast_path = True
        self.apply(init_he_)

    @property
    def deep_supervision(self) -> bool:
        """Whether training-mode forward returns the list of all decoder outputs."""
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        if value and len(self.aux_heads) != len(self.pool_kernels) - 1:
            raise ModelError(
                "This model was built without deep_supervision heads; rebuild it with "
                "deep_supervision=True to turn it on."
            )
        self._deep_supervision = bool(value)

    @property
    def input_divisor(self) -> tuple[int, ...]:
        """Per-axis divisor every input spatial size must be a multiple of."""
        return input_divisor(self.pool_kernels)

    @property
    def deep_supervision_scales(self) -> list[tuple[float, ...]]:
        """Per-axis scale of each deep-supervision output relative to the input, full-res first."""
        scales, cur = [], [1.0] * self.spatial_dims
        for s in range(len(self.pool_kernels)):
            scales.append(tuple(cur))
            cur = [c / p for c, p in zip(cur, self.pool_kernels[s])]
        return scales

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"NNUNet({self.spatial_dims}D) expects (B, C, {'z, ' if self.spatial_dims == 3 else ''}y, x) "
                f"input, got shape {tuple(x.shape)}."
            )
        bad = [(n, q) for n, q in zip(x.shape[2:], self.input_divisor) if n % q]
        if bad:
            raise ValueError(
                f"Input spatial shape {tuple(x.shape[2:])} must be divisible by {self.input_divisor} "
                f"per axis (product of pool_kernels)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``(B, num_classes, *spatial)``, or the deep-supervision list in training mode."""
        self._check_input(x)
        if cpu_inference.applicable(self, x):
            return cpu_inference.forward(self, x)
        skips = []
        for stage in self.encoder[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.encoder[-1](x)
        with_ds = self._deep_supervision and self.training
        outputs = []
        for level, (up, block) in enumerate(zip(self.upsamples, self.decoder)):
            x = block(torch.cat([up(x), skips[-(level + 1)]], dim=1))
            if with_ds and level < len(self.aux_heads):
                outputs.append(self.aux_heads[level](x))
        x = self.head(x)
        if with_ds:
            return [x, *outputs[::-1]]
        return x


# --------------------------------------------------------------------------- registered variants
_PAPER = (
    "Isensee, Jaeger, Kohl, Petersen, Maier-Hein: nnU-Net: a self-configuring method for deep "
    "learning-based biomedical image segmentation, Nature Methods 18, 2021"
)
_CITATION = "https://doi.org/10.1038/s41592-020-01008-z"
_DIVISIBILITY = (
    "each spatial axis divisible by the product of pool_kernels along it (input_divisor)"
)


def _training(batch_dice: bool) -> dict:
    """nnU-Net v1 defaults; ``batch_dice`` as v1 without a low-res stage (``Plan.batch_dice`` wins)."""
    return {
        "optimizer": "sgd",
        "nesterov": True,
        "momentum": 0.99,
        "lr": 1e-2,
        "lr_schedule": "poly",
        "poly_exponent": 0.9,
        "weight_decay": 3e-5,
        "epochs": 1000,
        "iterations_per_epoch": 250,
        "loss": "dice_ce",
        "deep_supervision": True,
        "oversample_foreground": 0.33,
        "batch_dice": batch_dice,
        "augmentation": [
            "rotation",
            "scaling",
            "mirroring",
            "gamma",
            "noise",
            "brightness",
            "contrast",
        ],
        "mirror_tta": True,
        "step": 0.5,
    }


_TINY = {
    2: (
        (16, 16),
        {"pool_kernels": [[2, 2], [2, 2]], "conv_kernels": [[3, 3]] * 3, "base_width": 4},
    ),
    3: (
        (8, 8, 8),
        {"pool_kernels": [[2, 2, 2], [2, 2, 2]], "conv_kernels": [[3, 3, 3]] * 3, "base_width": 4},
    ),
}


def _spec(
    name: str, dims: tuple[int, ...], description: str, configuration: str, **extra
) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="nnunet",
        spatial_dims=dims,
        description=description,
        paper=_PAPER,
        citation=_CITATION,
        divisibility=_DIVISIBILITY,
        default_kwargs={},
        training=_training(batch_dice=configuration in ("2d", "3d_cascade_fullres")),
        configurable_by_plan=True,
        min_input={k: _TINY[k] for k in dims},
        configuration=configuration,
        **extra,
    )


@register_model(spec=_spec("unet-2d", (2,), "nnU-Net 2D U-Net (slice-wise)", "2d"))
def unet_2d(
    in_channels,
    num_classes,
    spatial_dims=2,
    pool_kernels=None,
    conv_kernels=None,
    deep_supervision=False,
    base_width=32,
    max_width=None,
) -> NNUNet:
    """nnU-Net's ``2d`` configuration: 2D U-Net on slices along the first (transposed) axis."""
    return NNUNet(
        in_channels,
        num_classes,
        spatial_dims,
        pool_kernels,
        conv_kernels,
        deep_supervision,
        base_width,
        max_width,
    )


@register_model(
    spec=_spec("unet-3d-fullres", (3,), "nnU-Net 3D full-resolution U-Net", "3d_fullres")
)
def unet_3d_fullres(
    in_channels,
    num_classes,
    spatial_dims=3,
    pool_kernels=None,
    conv_kernels=None,
    deep_supervision=False,
    base_width=32,
    max_width=None,
) -> NNUNet:
    """nnU-Net's ``3d_fullres`` configuration at the target (median) spacing."""
    return NNUNet(
        in_channels,
        num_classes,
        spatial_dims,
        pool_kernels,
        conv_kernels,
        deep_supervision,
        base_width,
        max_width,
    )


@register_model(
    spec=_spec(
        "unet-3d-lowres", (3,), "nnU-Net 3D low-resolution U-Net (cascade stage 1)", "3d_lowres"
    )
)
def unet_3d_lowres(
    in_channels,
    num_classes,
    spatial_dims=3,
    pool_kernels=None,
    conv_kernels=None,
    deep_supervision=False,
    base_width=32,
    max_width=None,
) -> NNUNet:
    """nnU-Net's ``3d_lowres`` configuration: same network on a coarser grid."""
    return NNUNet(
        in_channels,
        num_classes,
        spatial_dims,
        pool_kernels,
        conv_kernels,
        deep_supervision,
        base_width,
        max_width,
    )


@register_model(
    spec=_spec(
        "unet-3d-cascade",
        (3,),
        "nnU-Net 3D cascade full-resolution U-Net (image + one-hot low-res prediction)",
        "3d_cascade_fullres",
        cascade_from="3d_lowres",
    )
)
def unet_3d_cascade(
    in_channels,
    num_classes,
    spatial_dims=3,
    pool_kernels=None,
    conv_kernels=None,
    deep_supervision=False,
    base_width=32,
    max_width=None,
) -> NNUNet:
    """nnU-Net's ``3d_cascade_fullres``. ``in_channels`` counts *image* channels only: the network
    takes ``in_channels + num_classes - 1`` channels, the extra ones being the one-hot (background
    dropped) upsampled ``3d_lowres`` prediction, which the engine concatenates after the image."""
    return NNUNet(
        in_channels + num_classes - 1,
        num_classes,
        spatial_dims,
        pool_kernels,
        conv_kernels,
        deep_supervision,
        base_width,
        max_width,
    )
