"""Layer factories shared by the architecture families: 2D/3D is an argument, not a copied file.

``conv_nd(3)`` is ``nn.Conv3d`` (with a faster CPU backward), ``norm_nd("instance", 2)`` is ``nn.InstanceNorm2d`` and so on
(the MONAI layer-factory idea), so one class serves both dimensionalities.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from napari_medseg.models.fastconv import Conv3d

# Conv3d is nn.Conv3d with a faster CPU weight gradient (models/fastconv.py); same state dict.
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_DROPOUT = {1: nn.Dropout, 2: nn.Dropout2d, 3: nn.Dropout3d}
_NORMS = {
    "instance": {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "batch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
}
_ACTS = {
    "leakyrelu": nn.LeakyReLU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _pick(table: dict, spatial_dims: int, what: str):
    if spatial_dims not in table:
        raise ValueError(
            f"{what} is available for spatial_dims {sorted(table)}, got {spatial_dims!r}."
        )
    return table[spatial_dims]


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` for ``spatial_dims`` 1/2/3."""
    return _pick(_CONV, spatial_dims, "Convolution")


def conv_transpose_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose{1,2,3}d``."""
    return _pick(_CONV_T, spatial_dims, "Transposed convolution")


def max_pool_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxPool{1,2,3}d``."""
    return _pick(_MAXPOOL, spatial_dims, "Max pooling")


def avg_pool_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.AvgPool{1,2,3}d``."""
    return _pick(_AVGPOOL, spatial_dims, "Average pooling")


def dropout_nd(spatial_dims: int) -> type[nn.Module]:
    """Channel dropout for ``spatial_dims`` (``nn.Dropout2d``/``nn.Dropout3d``)."""
    return _pick(_DROPOUT, spatial_dims, "Dropout")


def norm_nd(kind: str, spatial_dims: int) -> type[nn.Module]:
    """Normalisation class: ``kind`` is ``"instance"`` or ``"batch"``."""
    if kind not in _NORMS:
        raise ValueError(f"Unknown normalisation {kind!r}; use one of {sorted(_NORMS)}.")
    return _pick(_NORMS[kind], spatial_dims, f"{kind} normalisation")


def make_norm(kind: str | None, channels: int, spatial_dims: int, **kwargs) -> nn.Module:
    """A normalisation layer, or ``nn.Identity`` for ``kind=None``.

    Instance norm defaults to ``affine=True, eps=1e-5`` as in nnU-Net; pass kwargs to override.
    """
    if kind is None:
        return nn.Identity()
    if kind == "instance":
        kwargs = {"affine": True, "eps": 1e-5, **kwargs}
    return norm_nd(kind, spatial_dims)(channels, **kwargs)


def make_act(kind: str | None, **kwargs) -> nn.Module:
    """An activation by name (``leakyrelu`` defaults to slope 0.01, in place), or identity."""
    if kind is None:
        return nn.Identity()
    key = kind.lower()
    if key not in _ACTS:
        raise ValueError(f"Unknown activation {kind!r}; use one of {sorted(_ACTS)}.")
    if key == "leakyrelu":
        kwargs = {"negative_slope": 1e-2, "inplace": True, **kwargs}
    elif key in ("relu", "silu"):
        kwargs = {"inplace": True, **kwargs}
    return _ACTS[key](**kwargs)


def as_tuple(value: int | Sequence[int], n: int, name: str = "value") -> tuple[int, ...]:
    """Broadcast an int to ``n`` entries, or check that a sequence has ``n`` entries."""
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{name} needs {n} entries (one per spatial axis), got {list(value)}.")
    return out


def same_padding(kernel: Sequence[int]) -> tuple[int, ...]:
    """Per-axis padding ``k // 2`` that keeps the size for odd kernels at stride 1."""
    return tuple(int(k) // 2 for k in kernel)


class ConvNormAct(nn.Sequential):
    """conv -> norm -> activation, for any ``spatial_dims`` (nnU-Net's ``ConvDropoutNormNonlin``).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        spatial_dims: 1, 2 or 3.
        kernel_size: Int or per-axis kernel; padding is ``k // 2`` per axis.
        stride: Int or per-axis stride.
        norm: ``"instance"``, ``"batch"`` or ``None``.
        act: Activation name (see :func:`make_act`) or ``None``.
        bias: Whether the convolution has a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        norm: str | None = "instance",
        act: str | None = "leakyrelu",
        bias: bool = True,
    ) -> None:
        kernel = as_tuple(kernel_size, spatial_dims, "kernel_size")
        strides = as_tuple(stride, spatial_dims, "stride")
        super().__init__(
            conv_nd(spatial_dims)(
                in_channels, out_channels, kernel, strides, padding=same_padding(kernel), bias=bias
            ),
            make_norm(norm, out_channels, spatial_dims),
            make_act(act),
        )


def init_he_(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """He normal init (``a = neg_slope``) on (transposed) convolutions, zero bias (nnU-Net's
    ``InitWeights_He(1e-2)``). Use as ``model.apply(init_he_)``."""
    if isinstance(module, (*_CONV.values(), *_CONV_T.values())):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
