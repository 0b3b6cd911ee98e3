"""Spatial recurrence for 2D segmentation: SDN layers in a U-Net and a U-Net++.

Carvalho et al., "Holistic Modeling in Medical Image Segmentation Using Spatial Recurrence",
MIDL 2022 (https://openreview.net/forum?id=avqFDNyt0Dj), with the spatial dependency layers of
Miladinovic et al., "Spatial Dependency Networks: Neural Layers for Improved Generative Image
Modeling", ICLR 2021 (arXiv:2103.08877). Re-implemented from the papers and ARCHITECTURES.md
section 3; registered as ``sdn-unet`` and ``sdn-unetpp``.

Fixes with respect to the authors' code: the left/right sweeps (directions 0 and 1) run over the
width (the original loops over the height, wrong for non-square maps); ``vggres_sdn`` blocks work
in the U-Net (the original looks up ``block + "_sdn"`` and fails); the U-Net++ constructor works and
returns its last column for any depth. The original's "hd95" is the full Hausdorff distance; use
``engine.metrics.hd95`` for the 95th percentile.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_medseg.models.registry import ModelError, ModelSpec, register_model

logger = logging.getLogger(__name__)

BLOCKS = ("vgg", "vgg_sdn", "vggres_sdn")
# 0: columns left->right, 1: columns right->left, 2: rows top->bottom, 3: rows bottom->top
DIRECTIONS = (0, 1, 2, 3)


def sweep_lines(
    lines: torch.Tensor,
    weight_ih: torch.Tensor,
    bias_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_hh: torch.Tensor,
    reverse: bool = False,
) -> torch.Tensor:
    """One in-place directional SDN sweep, vectorised over the batch and along each line.

    Args:
        lines: States ``(L, B, N, S)``: ``L`` lines (columns or rows) in sweep order, each holding
            ``N`` positions of ``S``-dimensional states, for ``B`` batch items.
        weight_ih, bias_ih: ``(3S, 3S)``, ``(3S,)``, applied to the three neighbouring states
            ``[i-1, i, i+1]`` of the previous line (zero outside the line).
        weight_hh, bias_hh: ``(3S, S)``, ``(3S,)``, applied to the current state.
        reverse: Sweep from the last line to the first.

    Returns:
        The updated states ``(L, B, N, S)``; the first swept line keeps its input states.
    """
    n_lines, s = lines.shape[0], lines.shape[-1]
    order = range(n_lines - 1, -1, -1) if reverse else range(n_lines)
    gates_h = F.linear(lines, weight_hh, bias_hh)  # h-terms of every position in one matmul
    first = order[0]
    out = [lines[first]]
    for idx in order[1:]:
        prev = F.pad(out[-1], (0, 0, 1, 1))  # (B, N + 2, S): zero state beyond both borders
        neigh = torch.cat([prev[:, :-2], prev[:, 1:-1], prev[:, 2:]], dim=-1)  # (B, N, 3S)
        gi, gh = F.linear(neigh, weight_ih, bias_ih), gates_h[idx]  # (B, N, 3S): (r, z, n)
        r, z = torch.sigmoid(gi[..., : 2 * s] + gh[..., : 2 * s]).chunk(2, dim=-1)
        n = torch.tanh(gi[..., 2 * s :] + r * gh[..., 2 * s :])
        h = lines[idx]
        out.append(torch.lerp(h, n.to(h.dtype), z.to(h.dtype)))  # z*n + (1-z)*h
    if reverse:
        out.reverse()
    return torch.stack(out, dim=0)


class SDNSweep(nn.Module):
    """One direction of an SDN layer: a gated cell swept over the state map in place.

    The cell follows Miladinovic et al. (2021): with ``x`` the three neighbouring states of the
    previous column/row and ``h`` the current state, ``(r, z, n)`` split ``W_ih x + b_ih`` and
    ``W_hh h + b_hh``; ``r, z = sigmoid``, ``n = tanh(x_n + r * h_n)`` and
    ``new = z * n + (1 - z) * h`` (the reverse of ``torch.nn.GRUCell``'s convention). Weights and
    biases uniform in ``+-1/sqrt(S)``.

    Args:
        state_size: ``S``.
        direction: 0 (columns left->right), 1 (right->left), 2 (rows top->bottom), 3 (bottom->top).
    """

    def __init__(self, state_size: int, direction: int) -> None:
        super().__init__()
        if isinstance(direction, bool) or direction not in DIRECTIONS:
            raise ModelError(f"SDN direction must be one of {DIRECTIONS}, got {direction!r}.")
        s = state_size
        self.state_size, self.direction = s, direction
        self.weight_ih = nn.Parameter(torch.empty(3 * s, 3 * s))
        self.bias_ih = nn.Parameter(torch.empty(3 * s))
        self.weight_hh = nn.Parameter(torch.empty(3 * s, s))
        self.bias_hh = nn.Parameter(torch.empty(3 * s))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.state_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Sweep ``states`` ``(B, S, H, W)``; returns the updated ``(B, S, H, W)``."""
        columns = self.direction in (0, 1)
        # (L, B, N, S): lines in sweep order, positions along each line, state last
        lines = states.permute(3, 0, 2, 1) if columns else states.permute(2, 0, 3, 1)
        out = sweep_lines(
            lines,
            self.weight_ih,
            self.bias_ih,
            self.weight_hh,
            self.bias_hh,
            reverse=self.direction in (1, 3),
        )
        return out.permute(1, 3, 2, 0) if columns else out.permute(1, 3, 0, 2)


class SDN(nn.Module):
    """Spatial dependency layer: 3x3 conv ``in -> S`` + tanh, sweeps, 1x1 conv ``S -> out``.

    Parameters: ``9*in*S + S + len(directions)*(12*S^2 + 6*S) + S*out + out``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        state_size: ``S`` (150 in the paper).
        directions: Sweeps applied in sequence (default ``(0, 2)``: left->right, then top->bottom).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        state_size: int = 150,
        directions: Sequence[int] = (0, 2),
    ) -> None:
        super().__init__()
        self.project_in = nn.Conv2d(in_channels, state_size, 3, padding=1)
        self.sweeps = nn.ModuleList(SDNSweep(state_size, d) for d in directions)
        self.project_out = nn.Conv2d(state_size, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.project_in(x))
        for sweep in self.sweeps:
            h = sweep(h)
        return self.project_out(h)


class ResSDN(nn.Module):
    """Gated mix of an SDN and a 3x3 conv: ``sigmoid(g) * conv(x) + (1 - sigmoid(g)) * s``.

    The SDN produces ``2*out`` channels split into ``(s, g)`` (Carvalho et al., 2022).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        state_size: int = 150,
        directions: Sequence[int] = (0, 2),
    ) -> None:
        super().__init__()
        self.sdn = SDN(in_channels, 2 * out_channels, state_size, directions)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, g = self.sdn(x).chunk(2, dim=1)
        gate = torch.sigmoid(g)
        return gate * self.conv(x) + (1 - gate) * s


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def make_block(
    kind: str, cin: int, cout: int, state_size: int = 150, directions: Sequence[int] = (0, 2)
) -> nn.Sequential:
    """``vgg``: 2 x (conv3x3-BN-ReLU); ``vgg_sdn`` / ``vggres_sdn``: conv3x3-BN-ReLU, then an
    SDN / ResSDN ``cout -> cout``, BN, ReLU."""
    if kind == "vgg":
        return nn.Sequential(*_cbr(cin, cout), *_cbr(cout, cout))
    if kind in ("vgg_sdn", "vggres_sdn"):
        layer = (SDN if kind == "vgg_sdn" else ResSDN)(cout, cout, state_size, directions)
        return nn.Sequential(*_cbr(cin, cout), layer, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    raise ModelError(f"Unknown block {kind!r}; use one of {BLOCKS}.")


def _check_config(n_layers, sdn_n_layers, state_size, block, directions, base_width) -> None:
    for name, value, low in (
        ("n_layers", n_layers, 1),
        ("sdn_n_layers", sdn_n_layers, 0),
        ("state_size", state_size, 1),
        ("base_width", base_width, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ModelError(f"{name} must be an int >= {low}, got {value!r}.")
    if block not in BLOCKS:
        raise ModelError(f"block must be one of {BLOCKS}, got {block!r}.")
    if (
        isinstance(directions, (str, bytes))
        or not isinstance(directions, Sequence)
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and d in DIRECTIONS for d in directions
        )
        or not directions
    ):
        raise ModelError(
            f"directions must be a non-empty list of values in {DIRECTIONS}, got {directions!r}."
        )


class _SDNNet(nn.Module):
    """Shared configuration and input checks of the SDN U-Net family."""

    def __init__(
        self,
        n_layers,
        sdn_n_layers,
        sdn_encoder,
        sdn_decoder,
        state_size,
        block,
        directions,
        base_width,
    ) -> None:
        super().__init__()
        _check_config(n_layers, sdn_n_layers, state_size, block, directions, base_width)
        self.n_layers, self.sdn_n_layers, self.block = n_layers, sdn_n_layers, block
        self.sdn_encoder, self.sdn_decoder = bool(sdn_encoder), bool(sdn_decoder)
        self.state_size, self.directions = state_size, tuple(directions)
        self.widths = [base_width * 2**i for i in range(n_layers + 1)]

    def _block(self, use_sdn: bool, cin: int, cout: int) -> nn.Sequential:
        kind = self.block if use_sdn else "vgg"
        return make_block(kind, cin, cout, self.state_size, self.directions)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects (B, C, H, W), got {tuple(x.shape)}.")
        q = 2**self.n_layers
        if min(x.shape[2:]) < q:
            raise ValueError(
                f"Input spatial shape {tuple(x.shape[2:])} must be at least "
                f"2**n_layers = {q} per axis (and preferably divisible by it)."
            )


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def _pad_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``x`` (centred) to ``ref``'s spatial size, where max-pooling floored odd sizes."""
    dh, dw = ref.shape[2] - x.shape[2], ref.shape[3] - x.shape[3]
    return F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2]) if dh or dw else x


class SDNUNet(_SDNNet):
    """U-Net with SDN blocks (Carvalho et al., MIDL 2022).

    ``n_layers + 1`` levels of widths ``base_width * 2**i``. The input block is ``vgg``; each
    encoder level is max-pool 2 + block, each decoder level bilinear x2 upsampling
    (``align_corners=True``) + 1x1 conv ``c -> c/2``, padding to the skip's size, concatenation
    ``[skip, up]`` and a block ``c -> c/2``; head 1x1 conv with bias. Encoder level ``i``
    (``i = 0`` the first pooled level) uses ``block`` when ``sdn_encoder`` and
    ``i <= sdn_n_layers``, else ``vgg``; decoder level ``i`` (``i = 0`` the deepest) likewise with
    ``sdn_decoder``. ``block="vgg"`` gives the plain U-Net baseline.

    Args:
        in_channels: Input channels.
        num_classes: Output channels (logits).
        n_layers: Number of poolings (5).
        sdn_n_layers: SDN placement bound (3).
        sdn_encoder: SDN blocks in the encoder.
        sdn_decoder: SDN blocks in the decoder.
        state_size: SDN state size ``S`` (150).
        block: ``"vgg"``, ``"vgg_sdn"`` or ``"vggres_sdn"``: the block where SDN is enabled.
        directions: SDN sweep directions (``(0, 2)``).
        base_width: Width of level 0 (32).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        n_layers: int = 5,
        sdn_n_layers: int = 3,
        sdn_encoder: bool = True,
        sdn_decoder: bool = True,
        state_size: int = 150,
        block: str = "vgg_sdn",
        directions: Sequence[int] = (0, 2),
        base_width: int = 32,
    ) -> None:
        super().__init__(
            n_layers,
            sdn_n_layers,
            sdn_encoder,
            sdn_decoder,
            state_size,
            block,
            directions,
            base_width,
        )
        w = self.widths
        self.inc = make_block("vgg", in_channels, w[0])
        self.down = nn.ModuleList(
            self._block(self.sdn_encoder and i <= sdn_n_layers, w[i], w[i + 1])
            for i in range(n_layers)
        )
        self.up_proj = nn.ModuleList(
            nn.Conv2d(w[n_layers - i], w[n_layers - i] // 2, 1) for i in range(n_layers)
        )
        self.up = nn.ModuleList(
            self._block(
                self.sdn_decoder and i <= sdn_n_layers, w[n_layers - i], w[n_layers - i] // 2
            )
            for i in range(n_layers)
        )
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)``."""
        self._check_input(x)
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for proj, block in zip(self.up_proj, self.up):
            skip = skips.pop()
            x = block(torch.cat([skip, _pad_to(proj(_up2(x)), skip)], dim=1))
        return self.head(x)


class SDNNestedUNet(_SDNNet):
    """U-Net++ (nested U-Net, no deep supervision) with SDN blocks (Carvalho et al., MIDL 2022).

    Node ``x{i}_{j}`` (depth ``i``, column ``j``): ``x{i}_0`` = block(max-pool(``x{i-1}_0``)),
    ``x{i}_{j}`` = block(concat[``x{i}_0 .. x{i}_{j-1}``, up(``x{i+1}_{j-1}``)]) with bilinear x2
    upsampling (``align_corners=True``, zero-padded to the node's size where pooling floored an odd
    size), widths ``base_width * 2**i``; 1x1 head on ``x0_{n_layers}``. With SDN, ``x0_0``, ``x1_0``
    (encoder) and ``x0_1`` (decoder) always use ``block``; deeper encoder nodes ``x{i}_0`` when
    ``i <= sdn_n_layers`` and top-row decoder nodes ``x0_{j}`` when ``j <= sdn_n_layers``; other
    nodes are ``vgg``. (The authors' code also turns the whole fourth column into SDN nodes when
    ``sdn_n_layers >= 4``; we keep one rule. Its constructor passes its arguments shifted to the
    base class and, for ``n_layers=5``, returns ``x0_1``; here any ``n_layers >= 1`` builds and
    returns ``x0_{n_layers}``.)

    Args: as :class:`SDNUNet`; ``n_layers`` defaults to 4 (widths 32..512) and ``block`` to
    ``"vggres_sdn"`` (the authors' U-Net++ uses ResSDN).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        n_layers: int = 4,
        sdn_n_layers: int = 3,
        sdn_encoder: bool = True,
        sdn_decoder: bool = True,
        state_size: int = 150,
        block: str = "vggres_sdn",
        directions: Sequence[int] = (0, 2),
        base_width: int = 32,
    ) -> None:
        super().__init__(
            n_layers,
            sdn_n_layers,
            sdn_encoder,
            sdn_decoder,
            state_size,
            block,
            directions,
            base_width,
        )
        w, bound = self.widths, max(1, sdn_n_layers)
        self.nodes = nn.ModuleDict()
        for i in range(n_layers + 1):
            cin = in_channels if i == 0 else w[i - 1]
            self.nodes[f"x{i}_0"] = self._block(self.sdn_encoder and i <= bound, cin, w[i])
        for j in range(1, n_layers + 1):
            for i in range(n_layers + 1 - j):
                sdn = self.sdn_decoder and i == 0 and j <= bound
                self.nodes[f"x{i}_{j}"] = self._block(sdn, w[i] * j + w[i + 1], w[i])
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)``."""
        self._check_input(x)
        grid: list[list[torch.Tensor]] = []
        for i in range(self.n_layers + 1):
            grid.append([self.nodes[f"x{i}_0"](x if i == 0 else F.max_pool2d(grid[-1][0], 2))])
        for j in range(1, self.n_layers + 1):
            for i in range(self.n_layers + 1 - j):
                up = _pad_to(_up2(grid[i + 1][j - 1]), grid[i][0])
                grid[i].append(self.nodes[f"x{i}_{j}"](torch.cat([*grid[i], up], dim=1)))
        return self.head(grid[0][-1])


# --------------------------------------------------------------------------- registered variants
_PAPER = (
    "Carvalho et al.: Holistic Modeling in Medical Image Segmentation Using Spatial Recurrence, "
    "MIDL 2022; SDN layers: Miladinovic et al., Spatial Dependency Networks, ICLR 2021"
)
_CITATION = "https://openreview.net/forum?id=avqFDNyt0Dj"
_TRAINING = {
    "optimizer": "adam",
    "lr": 1e-4,
    "lr_schedule": "constant",
    "weight_decay": 0.0,
    "epochs": 300,
    "early_stopping": True,
    "early_stopping_monitor": "val_loss",
    "early_stopping_patience": 30,
    "amp": True,
    "deep_supervision": False,
    "loss": "soft_dice",  # binary: soft Dice on the foreground probability
    "loss_multiclass": "ce",  # more than one foreground class: cross-entropy
    "input_sizes": {"nuclei": [96, 96], "polyps": [96, 128], "ct": [128, 128]},
}
_TINY = {2: ((16, 24), {"n_layers": 2, "sdn_n_layers": 1, "state_size": 8, "base_width": 4})}


def _check_2d(spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise ModelError(f"The SDN models are 2D only, got spatial_dims={spatial_dims!r}.")


def _spec(name: str, description: str, divisibility: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="sdn",
        spatial_dims=(2,),
        description=description,
        paper=_PAPER,
        citation=_CITATION,
        divisibility=divisibility,
        default_kwargs={},
        training=dict(_TRAINING),
        configurable_by_plan=False,
        min_input=dict(_TINY),
    )


@register_model(
    spec=_spec(
        "sdn-unet",
        "U-Net with spatial-recurrence (SDN) blocks, 2D",
        "H and W divisible by 2**n_layers (other sizes >= 2**n_layers are padded in the decoder)",
    )
)
def sdn_unet(
    in_channels,
    num_classes,
    spatial_dims=2,
    n_layers=5,
    sdn_n_layers=3,
    sdn_encoder=True,
    sdn_decoder=True,
    state_size=150,
    block="vgg_sdn",
    directions=(0, 2),
    base_width=32,
) -> SDNUNet:
    """SDN U-Net: SDN blocks in the first ``sdn_n_layers + 1`` pooled / deepest decoder levels."""
    _check_2d(spatial_dims)
    return SDNUNet(
        in_channels,
        num_classes,
        n_layers,
        sdn_n_layers,
        sdn_encoder,
        sdn_decoder,
        state_size,
        block,
        directions,
        base_width,
    )


@register_model(
    spec=_spec(
        "sdn-unetpp",
        "U-Net++ with spatial-recurrence (ResSDN) blocks, 2D",
        "H and W divisible by 2**n_layers (other sizes >= 2**n_layers are padded in the decoder)",
    )
)
def sdn_unetpp(
    in_channels,
    num_classes,
    spatial_dims=2,
    n_layers=4,
    sdn_n_layers=3,
    sdn_encoder=True,
    sdn_decoder=True,
    state_size=150,
    block="vggres_sdn",
    directions=(0, 2),
    base_width=32,
) -> SDNNestedUNet:
    """SDN U-Net++: ResSDN nodes at x0_0, x1_0, x0_1 and as deep as ``sdn_n_layers`` allows."""
    _check_2d(spatial_dims)
    return SDNNestedUNet(
        in_channels,
        num_classes,
        n_layers,
        sdn_n_layers,
        sdn_encoder,
        sdn_decoder,
        state_size,
        block,
        directions,
        base_width,
    )
