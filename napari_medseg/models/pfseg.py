"""PFSeg: patch-free 3D segmentation driven by super-resolution and self-supervised guidance.

Wang et al., "Patch-Free 3D Medical Image Segmentation Driven by Super-Resolution Technique and
Self-Supervised Guidance", MICCAI 2021 (https://doi.org/10.1007/978-3-030-87193-2_13).
Re-implemented from the paper and ARCHITECTURES.md section 4; registered as ``pfseg``.

The network takes the whole volume downsampled 2x per axis (the low-resolution, LR, input) and an
HR *guidance patch* (the central crop, a quarter of the HR size per axis, of the high-resolution
image), and returns a segmentation and a super-resolved image at 2x the input size. Differences
from the authors' code: the segmentation head returns logits for any ``num_classes`` (the original
has one sigmoid channel), and any ``in_channels`` works (the SR head reconstructs every channel).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from napari_medseg.models.blocks import conv_nd
from napari_medseg.models.registry import ModelError, ModelSpec, register_model

logger = logging.getLogger(__name__)

#: Each axis of the LR input must be a multiple of this (4 poolings, and the guidance crop of a
#: quarter of the HR size pooled 3 times must meet the bottleneck).
LR_DIVISOR = 16
#: The guidance patch is ``HR size // GUIDANCE_FRACTION`` per axis, taken from the centre.
GUIDANCE_FRACTION = 4


class DoubleConv(nn.Module):
    """PFSeg's residual double convolution.

    ``[conv3 -> IN -> LeakyReLU(0.01) -> conv3 -> IN] + [1x1 conv (no bias) -> IN]``, then
    LeakyReLU(0.01). InstanceNorm has no affine parameters; the 3x3x3 convs have biases, so a
    block has ``27*cin*cout + 27*cout*cout + 2*cout + cin*cout`` parameters.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv = conv_nd(3)
        self.body = nn.Sequential(
            conv(in_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            conv(out_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels),
        )
        self.shortcut = nn.Sequential(
            conv(in_channels, out_channels, 1, bias=False), nn.InstanceNorm3d(out_channels)
        )
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    """ConvTranspose3d(k 4, s 2, p 1) + LeakyReLU(0.01): exactly doubles each axis."""
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, out_channels, 4, stride=2, padding=1),
        nn.LeakyReLU(0.01, inplace=True),
    )


class _Decoder(nn.Module):
    """One PFSeg decoder (segmentation or SR): four up + skip levels, then an extra up to HR."""

    def __init__(self, widths: tuple[int, ...], guide_width: int, out_channels: int) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        self.up4, self.conv4 = _up(w5 + guide_width, w4), DoubleConv(2 * w4, w4)
        self.up3, self.conv3 = _up(w4, w3), DoubleConv(2 * w3, w3)
        self.up2, self.conv2 = _up(w3, w2), DoubleConv(2 * w2, w2)
        self.up1, self.conv1 = _up(w2, w1), DoubleConv(2 * w1, w1)
        self.up_hr, self.conv_hr = _up(w1, w1), DoubleConv(w1, w1 // 2)
        self.head = conv_nd(3)(w1 // 2, out_channels, 1)

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        s1, s2, s3, s4 = skips
        x = self.conv4(torch.cat([self.up4(bottleneck), s4], dim=1))
        x = self.conv3(torch.cat([self.up3(x), s3], dim=1))
        x = self.conv2(torch.cat([self.up2(x), s2], dim=1))
        x = self.conv1(torch.cat([self.up1(x), s1], dim=1))
        return self.head(self.conv_hr(self.up_hr(x)))


def central_crop_slices(shape: tuple[int, ...], fraction: int = GUIDANCE_FRACTION) -> tuple[slice, ...]:
    """Slices of the central ``size // fraction`` crop of each axis of ``shape``."""
    out = []
    for s in shape:
        g = s // fraction
        start = (s - g) // 2
        out.append(slice(start, start + g))
    return tuple(out)


class PFSeg(nn.Module):
    """PFSeg (Wang et al., MICCAI 2021) with base width ``C`` (32 in the paper).

    * Encoder on the LR input: :class:`DoubleConv` widths ``C, C, 2C, 4C, 8C`` with max-pool 2
      between (four poolings: each LR axis must be a multiple of 16).
    * SGM (self-supervised guidance module, shared by both decoders): the HR guidance patch
      (``in_channels`` channels, a quarter of the HR size per axis, i.e. half the LR size) goes
      through DoubleConv ``in -> C/2``, pool, ``C/2 -> C``, pool, ``C -> 2C``, pool, ``2C -> 2C``,
      which lands on the bottleneck's grid; it is concatenated to the bottleneck (``8C + 2C``).
    * Two decoders with the same structure and separate weights: up (ConvTranspose k4 s2 p1 +
      LeakyReLU) ``10C -> 4C``, concat skip, DoubleConv ``8C -> 4C``; ``4C -> 2C``, DoubleConv
      ``4C -> 2C``; ``2C -> C``, DoubleConv ``2C -> C``; ``C -> C``, DoubleConv ``2C -> C``; an
      extra up ``C -> C`` to HR, DoubleConv ``C -> C/2`` and a 1x1 conv ``C/2 -> out``.
    * Heads: segmentation logits (``num_classes``); super-resolution ``ReLU(1x1 conv)`` with
      ``in_channels`` channels.

    ``forward(x, guidance=None)``: in training mode returns ``(seg_logits, sr)``; in eval mode only
    the segmentation logits (the SR decoder is skipped, as inference uses only the segmentation).
    Without ``guidance`` the central crop of the trilinearly 2x-upsampled input stands in for the
    HR crop (the best guess when no HR image exists); the engine passes the real HR crop.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32) -> None:
        super().__init__()
        if width < 2 or width % 2:
            raise ModelError(f"PFSeg width must be an even integer >= 2, got {width!r}.")
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        widths = (width, width, 2 * width, 4 * width, 8 * width)
        self.encoder = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.encoder.append(DoubleConv(prev, w))
            prev = w
        guide = (width // 2, width, 2 * width, 2 * width)
        self.sgm = nn.ModuleList([DoubleConv(in_channels, guide[0])])
        for a, b in zip(guide[:-1], guide[1:]):
            self.sgm.append(DoubleConv(a, b))
        self.pool = nn.MaxPool3d(2)
        self.seg_decoder = _Decoder(widths, guide[-1], num_classes)
        self.sr_decoder = _Decoder(widths, guide[-1], in_channels)

    @staticmethod
    def guidance_slices(hr_shape: tuple[int, ...]) -> tuple[slice, ...]:
        """Where the guidance patch lies in an HR volume of spatial shape ``hr_shape``."""
        return central_crop_slices(tuple(hr_shape))

    def default_guidance(self, x: torch.Tensor) -> torch.Tensor:
        """Central HR-sized crop of the trilinearly (``align_corners=False``) upsampled input."""
        up = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        return up[(slice(None), slice(None), *self.guidance_slices(tuple(up.shape[2:])))]

    def _check(self, x: torch.Tensor, guidance: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"PFSeg takes (B, C, z, y, x) inputs, got shape {tuple(x.shape)}.")
        bad = [s for s in x.shape[2:] if s % LR_DIVISOR]
        if bad:
            raise ValueError(
                f"PFSeg needs each axis of the LR input divisible by {LR_DIVISOR} (HR by "
                f"{2 * LR_DIVISOR}); got {tuple(x.shape[2:])}."
            )
        want = tuple(2 * s // GUIDANCE_FRACTION for s in x.shape[2:])
        if tuple(guidance.shape[2:]) != want or guidance.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"The guidance patch must be (B, C, *{want}) (the central quarter of the HR "
                f"volume) for an LR input {tuple(x.shape)}; got {tuple(guidance.shape)}."
            )

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None = None):
        if guidance is None:
            guidance = self.default_guidance(x)
        self._check(x, guidance)
        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            if i:
                h = self.pool(h)
            h = block(h)
            skips.append(h)
        bottleneck = skips.pop()
        g = guidance
        for i, block in enumerate(self.sgm):
            if i:
                g = self.pool(g)
            g = block(g)
        bottleneck = torch.cat([bottleneck, g], dim=1)
        seg = self.seg_decoder(bottleneck, skips)
        if not self.training:
            return seg
        sr = F.relu(self.sr_decoder(bottleneck, skips))
        return seg, sr


_TRAINING = {
    "optimizer": "adam",
    "lr": 1e-4,
    "weight_decay": 0.0,
    "lr_schedule": "plateau",
    "plateau_patience": 20,
    "batch_size": 1,
    "epochs": 100,
    "loss": "pfseg",
    "deep_supervision": False,
    "mirror_tta": False,
    "whole_volume": True,
}


@register_model(
    spec=ModelSpec(
        name="pfseg",
        family="pfseg",
        spatial_dims=(3,),
        description="PFSeg: patch-free whole-volume segmentation at 2x the input resolution",
        paper=(
            "Wang, Pan, Song, Dai, Ma, Ren, Zhang, Lin: Patch-Free 3D Medical Image Segmentation "
            "Driven by Super-Resolution Technique and Self-Supervised Guidance, MICCAI 2021"
        ),
        citation="https://doi.org/10.1007/978-3-030-87193-2_13",
        divisibility="each axis of the LR input divisible by 16 (of the HR volume by 32)",
        default_kwargs={},
        training=dict(_TRAINING),
        configurable_by_plan=False,
        min_input={3: ((16, 16, 32), {"width": 4})},
        configuration="3d_fullres",
        output_scale=2,
    )
)
def pfseg(in_channels, num_classes, spatial_dims=3, width=32) -> PFSeg:
    """PFSeg with base width ``width`` (32 in the paper); 3D only."""
    if spatial_dims != 3:
        raise ModelError(f"PFSeg is 3D only, got spatial_dims={spatial_dims!r}.")
    return PFSeg(in_channels, num_classes, width)
