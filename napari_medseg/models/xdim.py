"""Cross-dimensional transfer: Omnia-Net (2D), DX-Net (3D) and DS-Net (3D -> 2D -> 3D).

Messaoudi et al., "Cross-dimensional transfer learning in medical image segmentation with deep
learning", Medical Image Analysis 88:102868, 2023 (https://doi.org/10.1016/j.media.2023.102868).
Re-implemented from the paper and ARCHITECTURES.md section 5; registered as ``omnia-net-b0``,
``omnia-net-b4``, ``dx-net`` and ``ds-net``.

- **Omnia-Net**: a 3 x 3 stem (in -> 16, BN, ReLU) at full resolution, whose output is both the
  last skip and the input of a 2D classification backbone from ``timm`` (``features_only``, any
  backbone with features at strides 2, 4, 8, 16, 32), and a U-Net decoder of five blocks
  [nearest x2 -> concat skip -> 2 x (3 x 3 conv, BN, ReLU)] of widths 256, 128, 64, 32, 16, then a
  3 x 3 conv 16 -> classes. The decoder widths do not depend on the backbone: the authors' B4
  model uses the same 256/128/64/32/16 as their B0 model (only the skip widths change: B4's timm
  taps are 24/32/56/160/448).
- **Pretrained stem adaptation** (:func:`adapt_input_conv`) applies to the *backbone's* first
  convolution, given the channels that convolution receives. In Omnia-Net that is the
  16-channel stem output, so the pretrained RGB kernels of timm's first conv cannot be used and
  that one convolution is re-initialised (every other backbone layer keeps its pretrained
  weights). In DS-Net's 2D network the backbone receives the three depth slices as RGB, so the
  pretrained first conv is used as is. With ``stem=False`` and a 1-channel image the RGB kernels
  are summed.
- **DX-Net**: the same U-Net in 3D: a 3 x 3 x 3 stem (in -> 16, BN3d, SiLU), the EfficientNet-B0
  encoder in 3D (:mod:`.efficientnet3d`), initialised by inflating 2D weights, and five decoder
  blocks [ConvTranspose3d(k2, s2) -> concat skip -> 2 x (3^3 conv, BN3d, SiLU)]. Any
  ``in_channels`` (the original hard-wires 1).
- **DS-Net**: a 3D encoder (InstanceNorm, SiLU) whose convolutions stride along depth only,
  an average pooling of depth into 3 slices, an Omnia-Net-like 2D network (no stem, transposed
  convolutions, SiLU, as the authors' DS-Net) applied to every channel of the squeezed volume with
  the 3 slices as RGB, and a 3D decoder restoring depth with skips from the 3D encoder. The
  original needs batch 1 and depth 128; here any batch and any depth ``D`` with
  ``D % prod(depth_strides) == 0`` and ``D / prod(depth_strides) >= 3`` (H and W divisible by 32).

``timm`` is imported only when a model is built (:func:`napari_medseg.models._timm.import_timm`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_medseg.models._timm import import_timm, load_pretrained_state_dict
from napari_medseg.models.efficientnet3d import EfficientNet3D, adapt_input_conv
from napari_medseg.models.fastconv import Conv3d
from napari_medseg.models.registry import ModelError, ModelSpec, register_model

logger = logging.getLogger(__name__)

DECODER_WIDTHS = (256, 128, 64, 32, 16)
STRIDES = (2, 4, 8, 16, 32)
_ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}


def _check_divisible(x: torch.Tensor, axes: Sequence[int], divisor: int, model: str) -> None:
    bad = [x.shape[a] for a in axes if x.shape[a] % divisor]
    if bad:
        raise ModelError(
            f"{model} needs spatial sizes divisible by {divisor}; got {tuple(x.shape[2:])}."
        )


def _check_batchnorm(module: nn.Module, x: torch.Tensor, model: str) -> None:
    """BatchNorm in training needs more than one value per channel at the stride-32 level."""
    if not module.training:
        return
    deepest = x.shape[0] * math.prod(max(s // 32, 1) for s in x.shape[2:])
    if deepest < 2:
        raise ModelError(
            f"{model} uses BatchNorm, which in training needs more than one value per channel at its "
            f"deepest level (stride 32); batch {x.shape[0]} of {tuple(x.shape[2:])} gives one. Use a batch "
            "size of at least 2, or a patch of at least 64 along one axis."
        )


class _ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, dims: int, act: str):
        conv = nn.Conv2d if dims == 2 else Conv3d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        super().__init__(conv(cin, cout, 3, padding=1, bias=False), bn(cout), _ACTS[act](inplace=True))


class UpBlock(nn.Module):
    """Upsample x2 (nearest or transposed conv k2 s2), concat the skip, two conv-BN-act layers."""

    def __init__(self, cin: int, skip: int, cout: int, dims: int, upsample: str, act: str):
        super().__init__()
        if upsample == "transpose":
            tconv = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
            self.up = tconv(cin, cin, 2, stride=2)
        elif upsample == "nearest":
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
        else:
            raise ModelError(f"upsample must be 'nearest' or 'transpose', got {upsample!r}.")
        self.conv1 = _ConvBNAct(cin + skip, cout, dims, act)
        self.conv2 = _ConvBNAct(cout, cout, dims, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


def _make_decoder(
    bottom: int, skips: Sequence[int], widths: Sequence[int], dims: int, upsample: str, act: str
) -> nn.ModuleList:
    if len(widths) != len(skips):
        raise ModelError(f"decoder_widths needs {len(skips)} entries, got {list(widths)}.")
    blocks, cin = [], bottom
    for skip, width in zip(skips, widths):
        blocks.append(UpBlock(cin, skip, int(width), dims, upsample, act))
        cin = int(width)
    return nn.ModuleList(blocks)


class OmniaNet(nn.Module):
    """Omnia-Net: a timm 2D classification backbone as the encoder of a U-Net (see module doc).

    Args:
        in_channels: Image channels.
        num_classes: Output channels.
        backbone: Any timm model name that supports ``features_only`` with features at strides
            2, 4, 8, 16 and 32 (EfficientNets, ResNets, RegNets, ...).
        pretrained: Load the backbone's pretrained weights from the local timm/Hugging Face cache
            (never downloads; :class:`ModelError` when they are not there).
        decoder_widths: Widths of the five decoder blocks, deepest first.
        stem: Put the full-resolution 3 x 3 stem (in -> ``stem_channels``) before the backbone and
            use it as the last skip (Omnia-Net); ``False`` feeds the image to the backbone and the
            last decoder block has no skip (DS-Net's 2D network).
        stem_channels: Width of the stem.
        upsample: ``"nearest"`` (Omnia-Net) or ``"transpose"`` (DS-Net's 2D network).
        act: ``"relu"`` (Omnia-Net) or ``"silu"`` in the decoder and stem.
        drop_path_rate: Stochastic depth of the backbone (passed to timm when positive).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        backbone: str = "efficientnet_b0",
        pretrained: bool = False,
        decoder_widths: Sequence[int] = DECODER_WIDTHS,
        stem: bool = True,
        stem_channels: int = 16,
        upsample: str = "nearest",
        act: str = "relu",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if act not in _ACTS:
            raise ModelError(f"act must be one of {sorted(_ACTS)}, got {act!r}.")
        timm = import_timm()
        encoder_in = stem_channels if stem else in_channels
        extra = {"drop_path_rate": float(drop_path_rate)} if drop_path_rate else {}
        try:
            self.encoder = timm.create_model(
                backbone, features_only=True, pretrained=False, in_chans=encoder_in, **extra
            )
        except Exception as err:  # unknown name, no features_only support, bad kwargs
            raise ModelError(f"timm cannot build the backbone {backbone!r} with features_only: {err}") from err
        reductions = list(self.encoder.feature_info.reduction())
        if reductions != list(STRIDES):
            raise ModelError(
                f"Backbone {backbone!r} gives features at strides {reductions}; Omnia-Net needs {list(STRIDES)}."
            )
        self.backbone_name = backbone
        self.encoder_in = encoder_in
        self.reinitialised: list[str] = []  # backbone entries not taken from pretrained weights
        if pretrained:
            self.reinitialised = self.load_backbone_weights(load_pretrained_state_dict(backbone))
        self.stem = (
            nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem_channels),
                _ACTS[act](inplace=True),
            )
            if stem
            else None
        )
        chans = list(self.encoder.feature_info.channels())
        skips = chans[-2::-1] + [stem_channels if stem else 0]
        self.decoder = _make_decoder(chans[-1], skips, decoder_widths, 2, upsample, act)
        self.last = nn.Conv2d(int(decoder_widths[-1]), num_classes, 3, padding=1)

    def load_backbone_weights(self, state: dict) -> list[str]:
        """Load a 3-channel (RGB) backbone state dict, adapting the first conv (:func:`adapt_input_conv`).

        Returns:
            Names of the backbone entries that keep their fresh initialisation.
        """
        mine = self.encoder.state_dict()
        first = self.encoder.pretrained_cfg.get("first_conv") if hasattr(self.encoder, "pretrained_cfg") else None
        key = f"{first}.weight" if isinstance(first, str) else None
        if key not in mine:  # no usable hint: the first 4D kernel of the model
            key = next(k for k, v in mine.items() if v.ndim == 4)
        state = dict(state)
        kept = []
        if key in state:
            adapted = adapt_input_conv(state[key], self.encoder_in)
            if adapted is None:
                del state[key]
                kept.append(key)
                logger.info("Omnia-Net: the backbone's first conv %s sees %d channels; re-initialised.",
                            key, self.encoder_in)
            else:
                state[key] = adapted
        missing = [k for k in mine if k not in state and k not in kept]
        wrong = [k for k in state if k in mine and state[k].shape != mine[k].shape]
        if missing or wrong:
            raise ModelError(f"Pretrained weights do not fit {self.backbone_name!r}: missing {missing[:5]}, "
                             f"wrong shapes {wrong[:5]}.")
        self.encoder.load_state_dict({k: v for k, v in state.items() if k in mine}, strict=False)
        return kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_divisible(x, (2, 3), 32, "Omnia-Net")
        _check_batchnorm(self, x, "Omnia-Net")
        n = self.stem(x) if self.stem is not None else None
        feats = self.encoder(n if n is not None else x)
        skips = feats[-2::-1] + [n]
        y = feats[-1]
        for block, skip in zip(self.decoder, skips):
            y = block(y, skip)
        return self.last(y)


class DXNet(nn.Module):
    """DX-Net: Omnia-Net fully in 3D with an inflated EfficientNet3D-B0 encoder (see module doc).

    Args:
        in_channels: Image channels (any; the original hard-wires 1).
        num_classes: Output channels.
        decoder_widths: Widths of the five decoder blocks, deepest first.
        stem_channels: Width of the full-resolution stem (the encoder's input and last skip).
        drop_path_rate: Stochastic depth of the encoder.
        pretrained: Inflate timm's pretrained ``efficientnet_b0`` weights (local cache only).
        init_2d: Path of a file holding a 2D ``efficientnet_b0`` state dict (timm names;
            ``torch.save`` or safetensors) to inflate; wins over ``pretrained``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        decoder_widths: Sequence[int] = DECODER_WIDTHS,
        stem_channels: int = 16,
        drop_path_rate: float = 0.0,
        pretrained: bool = False,
        init_2d: str | None = None,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            Conv3d(in_channels, stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(stem_channels),
            nn.SiLU(inplace=True),
        )
        self.encoder = EfficientNet3D(stem_channels, drop_path_rate=drop_path_rate)
        chans = self.encoder.channels
        self.decoder = _make_decoder(chans[-1], chans[-2::-1] + [stem_channels], decoder_widths, 3, "transpose", "silu")
        self.last = Conv3d(int(decoder_widths[-1]), num_classes, 3, padding=1)
        if init_2d is not None:
            self.load_2d_weights(_read_state_dict(init_2d))
        elif pretrained:
            self.load_2d_weights(load_pretrained_state_dict("efficientnet_b0"))

    def load_2d_weights(self, state2d: dict) -> list[str]:
        """Initialise the encoder by inflating a 2D ``efficientnet_b0`` state dict (timm names)."""
        try:
            return self.encoder.load_2d_state_dict(state2d)
        except ValueError as err:
            raise ModelError(str(err)) from err

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_divisible(x, (2, 3, 4), 32, "DX-Net")
        _check_batchnorm(self, x, "DX-Net")
        n = self.stem(x)
        feats = self.encoder(n)
        y = feats[-1]
        for block, skip in zip(self.decoder, feats[-2::-1] + [n]):
            y = block(y, skip)
        return self.last(y)


def _read_state_dict(path: str) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ModelError(f"Cannot read a 2D state dict from {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict.")
    return state


class _DSBlock(nn.Module):
    """Conv3d k3 (stride along depth only) -> InstanceNorm -> SiLU, ``n_convs`` times."""

    def __init__(self, cin: int, cout: int, depth_stride: int = 1, n_convs: int = 2):
        super().__init__()
        layers = []
        for i in range(n_convs):
            stride = (depth_stride, 1, 1) if i == n_convs - 1 else 1
            layers += [
                Conv3d(cin if i == 0 else cout, cout, 3, stride=stride, padding=1, bias=False),
                nn.InstanceNorm3d(cout),
                nn.SiLU(inplace=True),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _DSUp(nn.Module):
    """Restore depth (transposed conv along depth, or nearest to a size), concat skip, conv-IN-SiLU."""

    def __init__(self, cin: int, skip: int, cout: int, depth_stride: int | None):
        super().__init__()
        s = depth_stride
        self.up = nn.ConvTranspose3d(cin, cin, (s, 1, 1), stride=(s, 1, 1)) if s else None
        self.conv = _DSBlock(cin + skip, cout, 1, n_convs=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            x = self.up(x)
        else:
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.conv(torch.cat([x, skip], dim=1))


class DSNet(nn.Module):
    """DS-Net: 3D encoder -> 3 slices -> Omnia-Net-like 2D network per channel -> 3D decoder.

    Args:
        in_channels: Image channels.
        num_classes: Output channels.
        widths: Widths of the four 3D encoder levels (the decoder mirrors them).
        depth_strides: Depth strides of encoder levels 2, 3 and 4; the input depth must be
            divisible by their product and leave at least 3 slices.
        mid_channels: Channels of the squeezed 3-slice volume; each goes through the 2D network.
        backbone: timm backbone of the 2D network.
        pretrained: Pretrained 2D backbone (its first conv sees the 3 slices as RGB, as is).
        decoder_widths: Decoder widths of the 2D network.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 48, 96),
        depth_strides: Sequence[int] = (2, 2, 2),
        mid_channels: int = 4,
        backbone: str = "efficientnet_b0",
        pretrained: bool = False,
        decoder_widths: Sequence[int] = DECODER_WIDTHS,
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        self.depth_strides = tuple(int(s) for s in depth_strides)
        if len(widths) != 4 or len(self.depth_strides) != 3 or min(self.depth_strides) < 1:
            raise ModelError(f"DS-Net needs 4 widths and 3 depth strides >= 1, got {widths}, {depth_strides}.")
        self.enc = nn.ModuleList([_DSBlock(in_channels, widths[0], 1, n_convs=1)])
        for i, s in enumerate(self.depth_strides):
            self.enc.append(_DSBlock(widths[i], widths[i + 1], s, n_convs=1 if i == 0 else 2))
        self.squeeze = _DSBlock(widths[3], mid_channels, 1)
        self.net2d = OmniaNet(
            3, 3, backbone=backbone, pretrained=pretrained, decoder_widths=decoder_widths, stem=False,
            upsample="transpose", act="silu",
        )
        ups = [None, *reversed(self.depth_strides)]
        chans = [mid_channels, *reversed(widths)]
        self.dec = nn.ModuleList(
            _DSUp(chans[i], widths[3 - i], widths[3 - i], ups[i]) for i in range(4)
        )
        self.last = Conv3d(widths[0], num_classes, 3, padding=1)

    @property
    def depth_divisor(self) -> int:
        return math.prod(self.depth_strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ModelError(f"DS-Net takes (B, C, D, H, W) tensors, got shape {tuple(x.shape)}.")
        depth, div = x.shape[2], self.depth_divisor
        if depth % div or depth // div < 3:
            raise ModelError(
                f"DS-Net needs a depth divisible by {div} (the product of depth_strides "
                f"{list(self.depth_strides)}) and at least {3 * div}; got depth {depth}."
            )
        _check_divisible(x, (3, 4), 32, "DS-Net (height and width)")
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
        x = self.squeeze(F.adaptive_avg_pool3d(x, (3, *x.shape[3:])))  # (B, M, 3, H, W)
        b, m, _, h, w = x.shape
        y = self.net2d(x.reshape(b * m, 3, h, w)).reshape(b, m, 3, h, w)
        for block, skip in zip(self.dec, reversed(skips)):
            y = block(y, skip)
        return self.last(y)


# ----------------------------------------------------------------------------- registration
_PAPER = (
    "Messaoudi et al.: Cross-dimensional transfer learning in medical image segmentation with deep "
    "learning, Medical Image Analysis 88:102868, 2023"
)
_CITATION = "https://doi.org/10.1016/j.media.2023.102868"
_TRAINING = {
    "optimizer": "lookahead_nadam",  # Lookahead(k=5, alpha=0.5) around NAdam, as the paper
    "lr": 1e-3,
    "weight_decay": 0.0,
    "lr_schedule": "poly",
    "loss": "dice_ce",  # the paper's code does not publish its losses
    "epochs": 200,
    "deep_supervision": False,
    "amp": True,
}
_TINY_2D = {"decoder_widths": [32, 16, 16, 8, 8]}


def _spec(name: str, dims: int, description: str, divisibility: str, tiny: dict) -> ModelSpec:
    return ModelSpec(
        name=name, family="xdim", spatial_dims=(dims,), description=description, paper=_PAPER,
        citation=_CITATION, divisibility=divisibility, training=dict(_TRAINING), min_input=tiny,
        requires=("timm",),
    )


def _only(spatial_dims: int, dims: int, name: str) -> None:
    if spatial_dims != dims:
        raise ModelError(f"{name} is {dims}D only, got spatial_dims={spatial_dims!r}.")


@register_model(
    spec=_spec(
        "omnia-net-b0", 2, "Omnia-Net: timm EfficientNet-B0 (any backbone) encoder in a 2D U-Net",
        "height and width divisible by 32", {2: ((32, 32), _TINY_2D)},
    )
)
def omnia_net_b0(
    in_channels: int, num_classes: int, spatial_dims: int = 2, backbone: str = "efficientnet_b0",
    pretrained: bool = False, decoder_widths: Sequence[int] = DECODER_WIDTHS, drop_path_rate: float = 0.0,
) -> OmniaNet:
    _only(spatial_dims, 2, "omnia-net-b0")
    return OmniaNet(in_channels, num_classes, backbone, pretrained, decoder_widths, drop_path_rate=drop_path_rate)


@register_model(
    spec=_spec(
        "omnia-net-b4", 2, "Omnia-Net: timm EfficientNet-B4 (any backbone) encoder in a 2D U-Net",
        "height and width divisible by 32",
        # the contract matrix swaps in B0's backbone (same class): B4's first calls take seconds
        {2: ((32, 32), {**_TINY_2D, "backbone": "efficientnet_b0"})},
    )
)
def omnia_net_b4(
    in_channels: int, num_classes: int, spatial_dims: int = 2, backbone: str = "efficientnet_b4",
    pretrained: bool = False, decoder_widths: Sequence[int] = DECODER_WIDTHS, drop_path_rate: float = 0.0,
) -> OmniaNet:
    _only(spatial_dims, 2, "omnia-net-b4")
    return OmniaNet(in_channels, num_classes, backbone, pretrained, decoder_widths, drop_path_rate=drop_path_rate)


@register_model(
    spec=_spec(
        "dx-net", 3, "DX-Net: 3D U-Net on an EfficientNet3D-B0 inflated from 2D weights",
        "each axis divisible by 32", {3: ((32, 32, 32), {"decoder_widths": [16, 16, 8, 8, 8]})},
    )
)
def dx_net(
    in_channels: int, num_classes: int, spatial_dims: int = 3, decoder_widths: Sequence[int] = DECODER_WIDTHS,
    drop_path_rate: float = 0.0, pretrained: bool = False, init_2d: str | None = None,
) -> DXNet:
    _only(spatial_dims, 3, "dx-net")
    return DXNet(in_channels, num_classes, decoder_widths, drop_path_rate=drop_path_rate, pretrained=pretrained,
                 init_2d=init_2d)


@register_model(
    spec=_spec(
        "ds-net", 3, "DS-Net: 3D encoder -> 2D EfficientNet U-Net on 3 slices -> 3D decoder",
        "depth divisible by prod(depth_strides) (8 by default) and at least 3x that; height and width "
        "divisible by 32",
        {3: ((24, 32, 32), {"widths": [4, 8, 8, 8], "mid_channels": 2, "decoder_widths": [16, 16, 8, 8, 8]})},
    )
)
def ds_net(
    in_channels: int, num_classes: int, spatial_dims: int = 3, widths: Sequence[int] = (16, 32, 48, 96),
    depth_strides: Sequence[int] = (2, 2, 2), mid_channels: int = 4, backbone: str = "efficientnet_b0",
    pretrained: bool = False, decoder_widths: Sequence[int] = DECODER_WIDTHS,
) -> DSNet:
    _only(spatial_dims, 3, "ds-net")
    return DSNet(in_channels, num_classes, widths, depth_strides, mid_channels, backbone, pretrained, decoder_widths)
