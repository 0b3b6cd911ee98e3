"""RKSeg: segmentation networks built from Runge-Kutta stages, in 2D or 3D.

Zhu, Fu, Wang, "Semantic Segmentation of Medical Images Based on Runge-Kutta Methods",
Bioengineering 10(5):506, 2023 (doi:10.3390/bioengineering10050506). Re-implemented from the paper
and ARCHITECTURES.md section 2; registered as ``rkseg-l`` (RK stages in the encoder) and ``rkseg-r``
(RK stages in the decoder). Both take the nnU-Net (v1) plan's ``pool_kernels`` / ``conv_kernels``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_medseg.models.blocks import ConvNormAct, conv_nd, init_he_, max_pool_nd
from napari_medseg.models.registry import ModelError, ModelSpec, register_model
from napari_medseg.models.unet import _check_kernels, default_kernels, input_divisor

logger = logging.getLogger(__name__)

VARIANTS = ("L", "R")
_MODES = {2: "bilinear", 3: "trilinear"}


def _two_convs(cin: int, cout: int, dims: int, kernel: Sequence[int]) -> nn.Sequential:
    """conv -> InstanceNorm(affine) -> LeakyReLU(0.01), twice (``cin -> cout -> cout``)."""
    return nn.Sequential(
        ConvNormAct(cin, cout, dims, kernel), ConvNormAct(cout, cout, dims, kernel)
    )


class RKSeg(nn.Module):
    """RKSeg-L / RKSeg-R with one width ``C`` at every stage (Zhu et al., Bioengineering 2023).

    Every conv unit is conv (plan kernel, padding ``k // 2``: 1 for kernel 3, 0 for 1, bias) ->
    InstanceNorm (affine, eps 1e-5) -> LeakyReLU(0.01); downsampling is max-pooling with the
    plan's per-axis kernels, upsampling is parameter-free (bi/tri)linear interpolation with
    ``align_corners=False``, and the head is a 1x1 conv ``C -> num_classes`` without bias. No
    dropout, no deep supervision. He init (a = 0.01).

    * ``variant="L"`` (RK stages in the encoder): stage 0 is 2 convs ``in -> C``. Stage ``k``
      (``k = 1..n``, stage ``n`` being the bottleneck) takes the concatenation, in the order
      ``[stage k-1, stage 0, ..., stage k-2]``, of all earlier stage outputs max-pooled step by step
      down to level ``k`` (``k*C`` channels) and applies 2 convs ``k*C -> C -> C``. Every stage
      ``k >= 1`` is interpolated to full resolution in one step and summed with stage 0; 2 convs
      ``C -> C -> C`` and the head follow.
    * ``variant="R"`` (RK stages in the decoder): stage 0 (``y0``) is 2 convs ``in -> C``,
      max-pooled ``n`` times without convs; a 2-conv bottleneck at the lowest level. Decoder step
      ``u`` (``u = 0..n-1``) upsamples the previous output one level and concatenates
      ``[upsampled output, y0 at this level, earlier decoder inputs (bottleneck first), each
      re-upsampled one level at a time]`` (``C*(u+2)`` channels) before 2 convs ``-> C -> C``; the
      final, full-resolution step sums these tensors instead (``C`` channels).

    Both have ``in*C*k + C^2*k*(n(n-1)/2 + 2n + 3) + 3C*(2n+4) + C*classes`` parameters when every
    stage's kernel volume is ``k`` (``3C`` per conv: bias plus InstanceNorm weight and bias).

    Kernels: each conv uses the plan kernel of the resolution it runs at (stage ``k``:
    ``conv_kernels[k]``; the full-resolution output convs of RKSeg-L: ``conv_kernels[0]``; decoder
    step ``u`` of RKSeg-R: ``conv_kernels[n-1-u]``), as the nnU-Net U-Nets here do. The authors'
    code inherits nnU-Net v1's indexing (kernel of the level one deeper) for those decoder/output
    convs; this differs only for anisotropic plans whose kernels change between levels.

    Args:
        in_channels: Input channels.
        num_classes: Output channels (logits).
        spatial_dims: 2 or 3.
        variant: ``"L"`` or ``"R"``.
        pool_kernels: One per-axis kernel list per max-pooling (default: isotropic 2, 5 pools in 2D,
            4 in 3D).
        conv_kernels: ``len(pool_kernels) + 1`` odd per-axis kernel lists (default: all 3).
        width: The width ``C`` of every stage (32 in the paper).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int = 2,
        variant: str = "L",
        pool_kernels: Sequence[Sequence[int]] | None = None,
        conv_kernels: Sequence[Sequence[int]] | None = None,
        width: int = 32,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ModelError(f"RKSeg supports spatial_dims 2 or 3, got {spatial_dims!r}.")
        if variant not in VARIANTS:
            raise ModelError(f"RKSeg variant must be one of {VARIANTS}, got {variant!r}.")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ModelError(f"width must be a positive int, got {width!r}.")
        d = spatial_dims
        if pool_kernels is None and conv_kernels is None:
            pool_kernels, conv_kernels = default_kernels(d)
        elif pool_kernels is None:
            pool_kernels = [[2] * d for _ in range(len(conv_kernels) - 1)]
        pools = _check_kernels(pool_kernels, "pool_kernels", d, odd=False)
        if not pools:
            raise ModelError("pool_kernels must hold at least one pooling step.")
        convs = (
            [[3] * d for _ in range(len(pools) + 1)]
            if conv_kernels is None
            else _check_kernels(conv_kernels, "conv_kernels", d, odd=True)
        )
        if len(convs) != len(pools) + 1:
            raise ModelError(
                f"conv_kernels needs len(pool_kernels) + 1 = {len(pools) + 1} entries "
                f"(one per stage incl. the bottleneck), got {len(convs)}."
            )
        n, c = len(pools), width
        self.spatial_dims, self.variant, self.width = d, variant, width
        self.in_channels, self.num_classes = in_channels, num_classes
        self.pool_kernels, self.conv_kernels = pools, convs
        self.pools = nn.ModuleList(max_pool_nd(d)(tuple(p), tuple(p)) for p in pools)
        self.stem = _two_convs(in_channels, c, d, convs[0])
        if variant == "L":
            # stages[k - 1] is RK stage k (k = 1..n) at level k; stages[-1] is the bottleneck.
            self.stages = nn.ModuleList(_two_convs(k * c, c, d, convs[k]) for k in range(1, n + 1))
            self.out_convs = _two_convs(c, c, d, convs[0])
        else:
            self.bottleneck = _two_convs(c, c, d, convs[n])
            # decoder[u] runs at level n-1-u; the last one (full resolution) takes a sum.
            self.decoder = nn.ModuleList(
                _two_convs(c * (u + 2) if u < n - 1 else c, c, d, convs[n - 1 - u])
                for u in range(n)
            )
        self.head = conv_nd(d)(c, num_classes, 1, bias=False)
        self.apply(init_he_)

    @property
    def num_pool(self) -> int:
        """Number of pooling steps ``n``."""
        return len(self.pool_kernels)

    @property
    def input_divisor(self) -> tuple[int, ...]:
        """Per-axis divisor every input spatial size must be a multiple of."""
        return input_divisor(self.pool_kernels)

    def _up(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.interpolate(
            x, size=tuple(size), mode=_MODES[self.spatial_dims], align_corners=False
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"RKSeg({self.spatial_dims}D) expects (B, C, *spatial) with {self.spatial_dims} "
                f"spatial axes, got shape {tuple(x.shape)}."
            )
        if any(s % q for s, q in zip(x.shape[2:], self.input_divisor)):
            raise ValueError(
                f"Input spatial shape {tuple(x.shape[2:])} must be divisible by "
                f"{self.input_divisor} per axis (product of pool_kernels)."
            )

    def _forward_l(self, y0: torch.Tensor) -> torch.Tensor:
        c, size = self.width, y0.shape[2:]
        bank = y0  # outputs of stages 0..k-1 in order, pooled step by step to the current level
        total = y0
        for k, stage in enumerate(self.stages, start=1):
            bank = self.pools[k - 1](bank)
            yk = stage(torch.cat([bank[:, -c:], bank[:, :-c]], dim=1))
            total = total + self._up(yk, size)  # one interpolation by the cumulative pool factor
            if k < len(self.stages):
                bank = torch.cat([bank, yk], dim=1)
        return self.out_convs(total)

    def _forward_r(self, y0: torch.Tensor) -> torch.Tensor:
        c, n = self.width, self.num_pool
        levels = [y0]  # y0 max-pooled 0..n times, no convs in between
        for pool in self.pools:
            levels.append(pool(levels[-1]))
        x = self.bottleneck(levels[n])
        carried = x[:, :0]  # earlier decoder inputs (bottleneck first), at the current level
        for u, block in enumerate(self.decoder):
            level = n - 1 - u
            moved = self._up(torch.cat([x, carried], dim=1), levels[level].shape[2:])  # one step
            up, carried = moved[:, :c], moved[:, c:]
            if u < n - 1:
                x = block(torch.cat([up, levels[level], carried], dim=1))
                carried = torch.cat([carried, up], dim=1)
            else:  # final, full-resolution step: the RK slopes are summed
                parts = carried.reshape(up.shape[0], carried.shape[1] // c, c, *up.shape[2:])
                x = block(up + levels[0] + parts.sum(dim=1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, *spatial)``."""
        self._check_input(x)
        y0 = self.stem(x)
        y = self._forward_l(y0) if self.variant == "L" else self._forward_r(y0)
        return self.head(y)


# --------------------------------------------------------------------------- registered variants
_PAPER = (
    "Zhu, Fu, Wang: Semantic Segmentation of Medical Images Based on Runge-Kutta Methods, "
    "Bioengineering 10(5):506, 2023"
)
_CITATION = "https://doi.org/10.3390/bioengineering10050506"
_TRAINING = {  # nnU-Net's recipe without deep supervision, 150 epochs as in the paper
    "optimizer": "sgd",
    "nesterov": True,
    "momentum": 0.99,
    "lr": 1e-2,
    "lr_schedule": "poly",
    "poly_exponent": 0.9,
    "weight_decay": 3e-5,
    "epochs": 150,
    "iterations_per_epoch": 250,
    "loss": "dice_ce",
    "deep_supervision": False,
    "oversample_foreground": 0.33,
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
    2: ((16, 16), {"pool_kernels": [[2, 2]] * 2, "conv_kernels": [[3, 3]] * 3, "width": 4}),
    3: ((8, 8, 8), {"pool_kernels": [[2, 2, 2]] * 2, "conv_kernels": [[3, 3, 3]] * 3, "width": 4}),
}


def _spec(name: str, description: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="rkseg",
        spatial_dims=(2, 3),
        description=description,
        paper=_PAPER,
        citation=_CITATION,
        divisibility="each spatial axis divisible by the product of pool_kernels along it",
        default_kwargs={},
        training=dict(_TRAINING),
        configurable_by_plan=True,
        min_input=dict(_TINY),
    )


@register_model(spec=_spec("rkseg-l", "RKSeg-L: Runge-Kutta stages in the encoder (one width)"))
def rkseg_l(
    in_channels, num_classes, spatial_dims=2, pool_kernels=None, conv_kernels=None, width=32
) -> RKSeg:
    """RKSeg-L: each encoder stage mixes all earlier stages; the output sums them (RK slopes)."""
    return RKSeg(in_channels, num_classes, spatial_dims, "L", pool_kernels, conv_kernels, width)


@register_model(spec=_spec("rkseg-r", "RKSeg-R: Runge-Kutta stages in the decoder (one width)"))
def rkseg_r(
    in_channels, num_classes, spatial_dims=2, pool_kernels=None, conv_kernels=None, width=32
) -> RKSeg:
    """RKSeg-R: a pooled-only encoder; each decoder step mixes all earlier decoder inputs."""
    return RKSeg(in_channels, num_classes, spatial_dims, "R", pool_kernels, conv_kernels, width)
