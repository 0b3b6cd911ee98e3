"""nnU-Net (v1) U-Net specifics: deep supervision, init, anisotropic kernels, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from napari_medseg.models import ModelError, NNUNet, create_model, input_divisor

ANISO_POOL = [[1, 2, 2], [2, 2, 2]]
ANISO_CONV = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]


def test_deep_supervision_outputs_full_res_first_in_train_mode():
    net = NNUNet(1, 3, 3, [[2, 2, 2]] * 3, deep_supervision=True, base_width=4).train()
    out = net(torch.randn(2, 1, 16, 16, 16))
    assert isinstance(out, list)
    assert [tuple(o.shape) for o in out] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8), (2, 3, 4, 4, 4)]
    assert net.deep_supervision_scales == [(1.0,) * 3, (0.5,) * 3, (0.25,) * 3]
    net.eval()
    y = net(torch.randn(2, 1, 16, 16, 16))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 16, 16, 16)


def test_deep_supervision_can_be_switched_off_but_not_on_without_heads():
    net = NNUNet(1, 2, 2, [[2, 2]] * 2, deep_supervision=True, base_width=4).train()
    net.deep_supervision = False
    assert isinstance(net(torch.randn(1, 1, 8, 8)), torch.Tensor)
    plain = NNUNet(1, 2, 2, [[2, 2]] * 2, base_width=4).train()
    assert isinstance(plain(torch.randn(1, 1, 8, 8)), torch.Tensor)
    with pytest.raises(ModelError, match="deep_supervision"):
        plain.deep_supervision = True


def test_he_init_statistics():
    torch.manual_seed(0)
    net = NNUNet(1, 2, 2, [[2, 2]] * 3, base_width=32)
    gain = math.sqrt(2.0 / (1 + 0.01**2))
    checked = 0
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() >= 10_000:
            fan_in = m.weight.shape[1] * math.prod(m.weight.shape[2:])
            assert m.weight.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.05)
            assert abs(m.weight.mean().item()) < 0.05 * gain / math.sqrt(fan_in) * 10
            checked += 1
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, nn.InstanceNorm2d):
            assert m.affine and m.eps == 1e-5
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert checked >= 5
    assert all(
        isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01
        for m in net.modules()
        if isinstance(m, (nn.LeakyReLU, nn.ReLU))
    )


def test_anisotropic_kernels():
    net = NNUNet(1, 2, 3, ANISO_POOL, ANISO_CONV, deep_supervision=True, base_width=4).train()
    assert net.input_divisor == (2, 4, 4)
    first = net.encoder[0][0][0]
    assert first.kernel_size == (1, 3, 3) and first.padding == (0, 1, 1)
    assert net.encoder[1][0][0].stride == (1, 2, 2)
    assert net.encoder[2][0][0].stride == (2, 2, 2)
    assert net.upsamples[-1].kernel_size == (1, 2, 2) and net.upsamples[-1].bias is None
    assert net.decoder[-1][0][0].kernel_size == (1, 3, 3)  # mirrored stage 0
    out = net(torch.randn(2, 1, 4, 12, 8))
    assert [tuple(o.shape[2:]) for o in out] == [(4, 12, 8), (4, 6, 4)]
    assert net.deep_supervision_scales == [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5)]


def test_widths_and_defaults():
    net3 = create_model("unet-3d-fullres", 1, 2)
    assert net3.widths == [32, 64, 128, 256, 320] and len(net3.pool_kernels) == 4
    net2 = create_model("unet-2d", 1, 2)
    assert net2.widths == [32, 64, 128, 256, 480, 480] and len(net2.pool_kernels) == 5
    assert NNUNet(1, 2, 2, [[2, 2]] * 3, base_width=8, max_width=16).widths == [8, 16, 16, 16]
    assert input_divisor([[1, 2, 2], [2, 2, 2], [2, 2, 1]]) == (4, 8, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pool_kernels": [[2, 2, 2]], "conv_kernels": [[3, 3, 3]]}, "len\\(pool_kernels\\) \\+ 1"),
        ({"pool_kernels": [[2, 2]]}, "3 entries"),
        ({"pool_kernels": [[2, 2, 2]], "conv_kernels": [[3, 3, 3], [2, 2, 2]]}, "odd"),
        ({"pool_kernels": [[0, 2, 2]]}, "positive"),
        ({"pool_kernels": []}, "at least one"),
        ({"base_width": 0}, "base_width"),
        ({"base_width": 64, "max_width": 32}, "max_width"),
    ],
)
def test_invalid_kwargs(kwargs, match):
    with pytest.raises(ModelError, match=match):
        create_model("unet-3d-fullres", 1, 2, **kwargs)


def test_input_shape_errors():
    net = NNUNet(1, 2, 2, [[2, 2]] * 2, base_width=4)
    with pytest.raises(ValueError, match="divisible by \\(4, 4\\)"):
        net(torch.randn(1, 1, 10, 8))
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(1, 1, 8, 8, 8))


def test_plan_kwargs_build_a_model():
    from napari_medseg.engine.planning import plan_experiment

    plans = plan_experiment([(1.0, 1.0, 1.0)] * 4, [(20, 24, 28)] * 4, 1, 2)
    plan = plans["3d_fullres"]
    net = create_model(plan.model_name, 1, 2, base_width=2, **plan.model_kwargs())
    y = net.eval()(torch.randn(1, 1, *plan.patch_size))
    assert y.shape == (1, 2, *plan.patch_size)
