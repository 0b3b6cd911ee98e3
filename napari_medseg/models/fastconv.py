"""A ``Conv3d`` whose CPU backward pass computes the weight gradient as one forward convolution.

On the CPU, PyTorch (2.13, oneDNN) computes the weight gradient of a 3D convolution with a kernel
that degrades badly when the cores are shared: on this project's 2-core machine, busy with other
work, it took 1.55 s for a 2 x 16 x 48 x 64 x 40 input against 0.15 s for the formulation below. On
a quiet machine the difference is smaller: forward + backward of one layer 0.69-0.91x, one nnU-Net
training step 0.88x the stock time (``benchmarks/bench_conv3d_backward.py``). The weight gradient is
itself a correlation of the input with the output gradient,

    dW[o, i, a] = sum_{b, d} g[b, o, d] * x_pad[b, i, s * d + delta * a],

so it equals a forward ``conv3d`` with batch and channels swapped (input ``x_pad`` as ``(I, B, ...)``,
"kernel" ``g`` as ``(O, B, ...)``, ``dilation = stride``, ``stride = dilation``), which oneDNN runs
faster. :class:`Conv3d` is a drop-in ``nn.Conv3d`` (same parameters, same state dict) that
uses this on CPU tensors during training; everywhere else (GPU, inference, groups, non-zero
padding modes) it is exactly ``nn.Conv3d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Conv3dCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, bias is not None)
        return F.conv3d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conf
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(stride), list(padding), list(dilation), False,
                [0, 0, 0], 1, [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            pad = []
            for p in reversed(padding):
                pad += [p, p]
            xp = F.pad(x, pad).transpose(0, 1)  # (I, B, *spatial)
            full = F.conv3d(xp, grad_out.transpose(0, 1), stride=dilation, dilation=stride)  # (I, O, *)
            k = weight.shape[2:]
            grad_w = full[:, :, : k[0], : k[1], : k[2]].transpose(0, 1).contiguous()
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None, None, None


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` with a faster CPU weight gradient (see the module docstring)."""

    def _conv_forward(self, input, weight, bias):  # noqa: A002 - torch's own signature
        if (
            input.device.type == "cpu"
            and torch.is_grad_enabled()
            and weight.requires_grad
            and self.groups == 1
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and input.dtype == torch.float32
        ):
            return _Conv3dCPU.apply(input, weight, bias, self.stride, self.padding, self.dilation)
        return super()._conv_forward(input, weight, bias)
