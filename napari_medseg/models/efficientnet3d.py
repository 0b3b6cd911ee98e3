"""EfficientNet-B0 in 3D and the inflation of 2D EfficientNet weights to it (DX-Net's encoder).

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019
(arXiv:1905.11946), made volumetric for DX-Net (Messaoudi et al., Medical Image Analysis 88:102868,
2023): ``k x k x k`` depthwise kernels, ``BatchNorm3d``, squeeze-excitation pooled over the three
spatial axes, MBConv blocks with B0's stage table. The module and parameter names are those of
``timm``'s ``efficientnet_b0`` built with ``features_only=True`` (``conv_stem``, ``bn1``,
``blocks.{stage}.{block}.conv_pw`` ...), so that a 2D state dict maps onto it key by key.

Inflation (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017, "I3D"): each 2D
``k x k`` kernel is repeated ``k`` times along depth and divided by ``k``; 1 x 1 kernels become
1 x 1 x 1; batch-norm statistics and affine parameters, biases and the squeeze-excitation 1 x 1
convolutions are copied. On a depth-constant input the inflated network then reproduces the 2D
network's response on every slice whose depth receptive field stays inside the volume (exactly
everywhere when the depth borders are replicate-padded, since the squeeze-excitation pools over the
whole volume).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from napari_medseg.models.fastconv import Conv3d

logger = logging.getLogger(__name__)

#: EfficientNet-B0 stages: (expansion, kernel, stride, out channels, repeats).
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
#: Stages whose output is a feature tap (strides 2, 4, 8, 16, 32), as timm's ``features_only``.
B0_FEATURE_STAGES = (0, 1, 2, 4, 6)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample with probability ``p``."""
    if p <= 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class SqueezeExcite3d(nn.Module):
    """Squeeze-excitation pooled over depth, height and width (timm's ``SqueezeExcite`` in 3D)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv3d(channels, reduced, 1)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv3d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3, 4), keepdim=True)
        return x * torch.sigmoid(self.conv_expand(self.act1(self.conv_reduce(s))))


class DepthwiseSeparable3d(nn.Module):
    """B0's first stage: depthwise k^3 conv, BN, SiLU, SE, pointwise conv, BN (no expansion)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, se_ratio: float, drop_path: float):
        super().__init__()
        self.conv_dw = nn.Conv3d(cin, cin, kernel, stride, kernel // 2, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm3d(cin)
        self.se = SqueezeExcite3d(cin, max(1, int(cin * se_ratio)))
        self.conv_pw = Conv3d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.act = nn.SiLU(inplace=True)
        self.has_skip = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.act(self.bn1(self.conv_dw(x))))
        y = self.bn2(self.conv_pw(y))
        return x + _drop_path(y, self.drop_path, self.training) if self.has_skip else y


class InvertedResidual3d(nn.Module):
    """MBConv: pointwise expansion, depthwise k^3 conv, SE, pointwise projection (+ residual)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, expand: int, se_ratio: float, drop_path: float
    ):
        super().__init__()
        mid = cin * expand
        self.conv_pw = Conv3d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv_dw = nn.Conv3d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.se = SqueezeExcite3d(mid, max(1, int(cin * se_ratio)))  # reduced from the block input
        self.conv_pwl = Conv3d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(cout)
        self.act = nn.SiLU(inplace=True)
        self.has_skip = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv_pw(x)))
        y = self.se(self.act(self.bn2(self.conv_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return x + _drop_path(y, self.drop_path, self.training) if self.has_skip else y


class EfficientNet3D(nn.Module):
    """EfficientNet encoder in 3D returning the features at strides 2, 4, 8, 16 and 32.

    Args:
        in_channels: Input channels.
        stages: Stage table ``(expansion, kernel, stride, channels, repeats)``; B0 by default.
        feature_stages: Stages whose outputs are returned.
        stem_channels: Output channels of the stride-2 3 x 3 x 3 stem convolution.
        se_ratio: Squeeze-excitation width as a fraction of each block's input channels.
        drop_path_rate: Stochastic depth, increasing linearly over the blocks up to this value.
    """

    def __init__(
        self,
        in_channels: int,
        stages: Sequence[Sequence[int]] = B0_STAGES,
        feature_stages: Sequence[int] = B0_FEATURE_STAGES,
        stem_channels: int = 32,
        se_ratio: float = 0.25,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.conv_stem = Conv3d(in_channels, stem_channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(stem_channels)
        self.act = nn.SiLU(inplace=True)
        total = sum(s[4] for s in stages)
        blocks, cin, index = [], stem_channels, 0
        for expand, kernel, stride, cout, repeats in stages:
            stage = []
            for r in range(repeats):
                dp = drop_path_rate * index / max(total - 1, 1)
                s = stride if r == 0 else 1
                if expand == 1:
                    stage.append(DepthwiseSeparable3d(cin, cout, kernel, s, se_ratio, dp))
                else:
                    stage.append(InvertedResidual3d(cin, cout, kernel, s, expand, se_ratio, dp))
                cin, index = cout, index + 1
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)
        self.feature_stages = tuple(feature_stages)
        self.channels = [stages[i][3] for i in self.feature_stages]
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self.bn1(self.conv_stem(x)))
        features = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self.feature_stages:
                features.append(x)
        return features

    def load_2d_state_dict(self, state2d: Mapping[str, torch.Tensor]) -> list[str]:
        """Initialise from a 2D EfficientNet state dict (timm names) by inflation.

        The stem is adapted to ``in_channels`` by :func:`adapt_input_conv`: kept when the channel
        counts match, RGB kernels summed for a 1-channel input, otherwise left at its fresh
        initialisation.

        Returns:
            Names of entries left at their initialisation (at most ``["conv_stem.weight"]``).

        Raises:
            ValueError: the state dict does not describe this architecture.
        """
        state3d = inflate_state_dict(state2d)
        stem_w = state3d.get("conv_stem.weight")
        kept = []
        if stem_w is None or stem_w.ndim != 5:
            pass  # reported below as missing / wrong shape
        elif (stem := adapt_input_conv(stem_w, self.in_channels)) is None:
            state3d.pop("conv_stem.weight", None)
            kept.append("conv_stem.weight")
            logger.info("EfficientNet3D: the stem sees %d channels; it keeps a fresh initialisation.", self.in_channels)
        else:
            state3d["conv_stem.weight"] = stem
        mine = self.state_dict()
        missing = [k for k in mine if k not in state3d and k not in kept]
        unexpected = [k for k in state3d if k not in mine]
        wrong = [k for k in state3d if k in mine and state3d[k].shape != mine[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                "The 2D state dict does not fit this EfficientNet3D: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}."
            )
        self.load_state_dict(state3d, strict=False)
        return kept


def inflate_weight(weight: torch.Tensor) -> torch.Tensor:
    """Inflate a 2D conv kernel ``(O, I, k, k)`` to ``(O, I, k, k, k)``, replicated along depth / k."""
    if weight.ndim != 4:
        raise ValueError(f"Expected a 2D convolution kernel (O, I, k, k), got shape {tuple(weight.shape)}.")
    kh, kw = weight.shape[-2:]
    if kh != kw:
        raise ValueError(f"Only square kernels can be inflated to k x k x k, got {kh} x {kw}.")
    return weight.unsqueeze(2).repeat(1, 1, kh, 1, 1) / kh


def inflate_state_dict(state2d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inflate a 2D state dict to 3D (I3D): 4D kernels via :func:`inflate_weight`, the rest copied.

    Args:
        state2d: A 2D network's ``state_dict()`` (e.g. timm ``efficientnet_b0``,
            ``features_only=True``); classifier entries (``conv_head``, ``bn2``, ``classifier``)
            of a full model are dropped.

    Returns:
        A new state dict whose convolution kernels are 5D; other tensors are cloned.
    """
    out = {}
    for key, value in state2d.items():
        if key.split(".")[0] in ("conv_head", "bn2", "classifier", "global_pool"):
            continue
        out[key] = inflate_weight(value) if value.ndim == 4 else value.clone()
    return out


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor | None:
    """Adapt pretrained first-convolution kernels ``(O, I, *k)`` to ``in_channels`` inputs.

    The rule of the cross-dimensional transfer paper: kept when ``I == in_channels``; summed over
    the RGB kernels when ``I == 3`` and the input has 1 channel (a grey image replicated to RGB then
    gives the same response); otherwise ``None``: the convolution is re-initialised.
    """
    if weight.shape[1] == in_channels:
        return weight.clone()
    if weight.shape[1] == 3 and in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    return None
