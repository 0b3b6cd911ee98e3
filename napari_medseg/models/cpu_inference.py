"""A faster CPU inference forward for the nnU-Net U-Net: channels-last, in place, same numbers.

Why: profiled on this project's CPU (torch 2.13, oneDNN, AVX2), one forward of the 3d_fullres
U-Net on a 128^3 tile spent only 75 % of its time in convolutions. The rest went to work that the
stock ``nn.Module`` graph does not need:

* every convolution on a channels-first (NCDHW) tensor makes oneDNN reorder its input and output
  to and from a blocked layout, into fresh allocations (page faults on hundreds of MB per layer);
* InstanceNorm writes a new tensor; LeakyReLU then runs over it again;
* PyTorch routes a few convolutions to its slow reference kernels: the 1-channel input layer and
  small deep layers (its oneDNN heuristic looks at batch x channels x size) and the stride-2
  transposed convolutions on channels-first input (0.79 s for one 64 -> 32 upsampling at 64^3,
  against 0.17 s channels-last);
* the 1x1 head on a channels-first tensor (0.57 s at 128^3, against 0.02 s as a matrix product).

This forward keeps every activation channels-last (``channels_last_3d`` / ``channels_last``), calls
oneDNN directly for every convolution and transposed convolution (so it never falls to the slow
kernels and never reorders activations), normalises in place (two-pass statistics: the channel sums,
then the centred sums of squares as the diagonal of a Gram matrix, both in float32 matrix kernels),
applies the affine and LeakyReLU in place, and computes the head as one matrix product. It is the
same function as the stock forward: same weights, same operations in the same order; the outputs
differ by float32 rounding only (the tests compare them). On a 128^3 tile it takes 0.73 of the stock
forward's time (``benchmarks/bench_inference.py --levers``).

It is used by :class:`~napari_medseg.models.unet.NNUNet` automatically when nothing needs autograd:
eval mode, gradients off (``torch.inference_mode`` / ``no_grad``), a float32 CPU tensor, and oneDNN
available. Set ``model.cpu_fast_path = False`` or ``MEDSEG_CPU_FAST_PATH=0`` to use the stock
forward. GPUs never take it (cuDNN chooses its own layouts; AMP applies there).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_ENV = "MEDSEG_CPU_FAST_PATH"


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def env_enabled() -> bool:
    """False when ``MEDSEG_CPU_FAST_PATH`` is set to 0/false/no/off."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def supports(model: nn.Module) -> bool:
    """Whether every block of ``model`` (an NNUNet) is conv -> affine InstanceNorm -> LeakyReLU with
    plain (groups 1, zero padding, no dilation) convolutions: what :func:`forward` implements."""
    if model.spatial_dims not in (2, 3):
        return False
    norms = (nn.InstanceNorm2d, nn.InstanceNorm3d)
    convs = (nn.Conv2d, nn.Conv3d)
    for stage in (*model.encoder, *model.decoder):
        for block in stage:
            if len(block) != 3:
                return False
            conv, norm, act = block
            if not (
                isinstance(conv, convs)
                and conv.groups == 1
                and conv.padding_mode == "zeros"
                and all(d == 1 for d in conv.dilation)
                and not isinstance(conv.padding, str)
            ):
                return False
            if not (isinstance(norm, norms) and norm.affine and not norm.track_running_stats):
                return False
            if type(act) is not nn.LeakyReLU:
                return False
    ups = all(
        isinstance(up, (nn.ConvTranspose2d, nn.ConvTranspose3d))
        and up.groups == 1
        and all(d == 1 for d in up.dilation)
        and all(p == 0 for p in up.padding)
        and all(p == 0 for p in up.output_padding)
        for up in model.upsamples
    )
    return ups and isinstance(model.head, convs) and all(k == 1 for k in model.head.kernel_size)


def applicable(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`forward` may replace the stock forward for input ``x`` now."""
    if model.training or torch.is_grad_enabled():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if not getattr(model, "cpu_fast_path", True) or not env_enabled():
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return supports(model)  # a walk over a few dozen modules: microseconds against a forward


class _WeightCache:
    """Channels-last copies of the weights, rebuilt when a weight changes (storage or version)."""

    def __init__(self) -> None:
        self._store: dict[int, tuple[int, int, torch.Tensor]] = {}

    def get(self, weight: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version)
        hit = self._store.get(id(weight))
        if hit is not None and hit[:2] == key:
            return hit[2]
        converted = weight.detach().contiguous(memory_format=memory_format)
        self._store[id(weight)] = (*key, converted)
        return converted

    def clear(self) -> None:
        self._store.clear()


def weight_cache(model: nn.Module) -> _WeightCache:
    """The model's channels-last weight cache (not part of its state dict)."""
    cache = model.__dict__.get("_cpu_fast_weights")
    if cache is None:
        cache = model.__dict__["_cpu_fast_weights"] = _WeightCache()
    return cache


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last ``(B, C, *spatial)`` tensor as a ``(B * voxels, C)`` view (never a copy)."""
    return x.movedim(1, -1).view(-1, x.shape[1])


def instance_norm_leaky_relu_(x: torch.Tensor, norm: nn.Module, negative_slope: float) -> torch.Tensor:
    """Affine InstanceNorm then LeakyReLU, in place on a channels-last ``x``; returns ``x``.

    Statistics are two-pass, as PyTorch's own: the mean from the channel sums, then the biased
    variance from the centred values (the diagonal of their Gram matrix, a float32 GEMM).
    """
    for b in range(x.shape[0]):
        v = _rows(x[b : b + 1])
        n = v.shape[0]
        mean = v.sum(0).div_(n)
        v.sub_(mean)
        var = torch.mm(v.t(), v).diagonal().div(n)
        scale = torch.rsqrt(var.add_(norm.eps)).mul_(norm.weight)
        torch.addcmul(norm.bias, v, scale, out=v)
    return F.leaky_relu_(x, negative_slope)


def _conv(x: torch.Tensor, conv: nn.Module, cache: _WeightCache, fmt) -> torch.Tensor:
    weight = cache.get(conv.weight, fmt)
    return torch.ops.aten.mkldnn_convolution(
        x.contiguous(memory_format=fmt), weight, conv.bias,
        list(conv.padding), list(conv.stride), list(conv.dilation), 1,
    )


def _upsample(x: torch.Tensor, up: nn.Module, fmt) -> torch.Tensor:
    d = len(up.stride)
    op = getattr(torch.ops.mkldnn, "_convolution_transpose_pointwise", None)
    if op is not None:
        return op(x, up.weight, up.bias, [0] * d, [0] * d, list(up.stride), [1] * d, 1, "none", [], "")
    conv_t = F.conv_transpose3d if d == 3 else F.conv_transpose2d
    return conv_t(x, up.weight, up.bias, up.stride).contiguous(memory_format=fmt)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The NNUNet inference forward (no deep supervision), channels-last and in place.

    Returns logits ``(B, num_classes, *spatial)``, contiguous (channels-first) like the stock
    forward. Callers check :func:`applicable` first.
    """
    fmt = _memory_format(model.spatial_dims)
    cache = weight_cache(model)

    def block(stage, h):
        for conv, norm, act in stage:
            h = instance_norm_leaky_relu_(_conv(h, conv, cache, fmt), norm, act.negative_slope)
        return h

    x = x.contiguous(memory_format=fmt)
    skips = []
    for stage in model.encoder[:-1]:
        x = block(stage, x)
        skips.append(x)
    x = block(model.encoder[-1], x)
    for up, stage in zip(model.upsamples, model.decoder):
        skip = skips.pop()
        x = torch.cat([_upsample(x, up, fmt), skip], dim=1)
        del skip
        x = block(stage, x)
    head = model.head
    k = head.out_channels
    w = head.weight.reshape(k, -1)
    rows = _rows(x)
    y = torch.mm(rows, w.t()) if head.bias is None else torch.addmm(head.bias, rows, w.t())
    return y.view(x.shape[0], *x.shape[2:], k).movedim(-1, 1).contiguous()
