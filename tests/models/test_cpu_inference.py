"""The channels-last CPU inference forward of NNUNet (models/cpu_inference.py) against the stock one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_medseg.models import cpu_inference, create_model
from napari_medseg.models.unet import NNUNet

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)


def _model(dims: int, in_ch: int = 1, classes: int = 3, pools=None, kernels=None, seed: int = 0) -> NNUNet:
    torch.manual_seed(seed)
    pools = pools or [[2] * dims] * 3
    kernels = kernels or [[3] * dims] * (len(pools) + 1)
    model = NNUNet(in_ch, classes, dims, pool_kernels=pools, conv_kernels=kernels, base_width=8, max_width=32)
    with torch.no_grad():  # non-trivial affines and biases, so a dropped term shows
        for m in model.modules():
            if isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _both(model: NNUNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(stock output, fast output, number of fast-path calls) under inference_mode."""
    calls = []
    real = cpu_inference.forward

    def spy(m, t):
        calls.append(t.shape)
        return real(m, t)

    with torch.inference_mode():
        model.cpu_fast_path = False
        stock = model(x)
        model.cpu_fast_path = True
        cpu_inference.forward = spy
        try:
            fast = model(x)
        finally:
            cpu_inference.forward = real
    return stock, fast, len(calls)


@pytest.mark.parametrize(
    "dims, batch, in_ch, shape, pools, kernels",
    [
        (3, 1, 1, (16, 24, 32), None, None),
        (3, 2, 2, (16, 16, 16), None, None),  # batch 2, 2 input channels
        (3, 1, 1, (8, 32, 32), [[1, 2, 2], [2, 2, 2], [1, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3], [1, 3, 3]]),
        (2, 1, 1, (32, 48), None, None),
        (2, 3, 1, (32, 32), None, None),  # 2D slices batched as tiles
    ],
)
def test_fast_forward_equals_stock_forward(dims, batch, in_ch, shape, pools, kernels, one_thread):
    model = _model(dims, in_ch, pools=pools, kernels=kernels)
    x = torch.randn(batch, in_ch, *shape) * 3 + 1
    stock, fast, calls = _both(model, x)
    assert calls == 1, "the fast path was not taken"
    assert fast.shape == stock.shape and fast.is_contiguous()
    scale = stock.abs().max().item()
    assert torch.allclose(fast, stock, atol=1e-5 * max(scale, 1.0), rtol=1e-4), (fast - stock).abs().max()
    # each batch item is normalised on its own (instance norm), as in the stock forward
    if batch > 1:
        with torch.inference_mode():
            alone = model(x[1:2])
        assert torch.allclose(alone, fast[1:2], atol=1e-5 * max(scale, 1.0), rtol=1e-4)


def test_instance_norm_leaky_relu_in_place_matches_torch():
    torch.manual_seed(1)
    norm = nn.InstanceNorm3d(5, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(-2, 2)
        norm.bias.uniform_(-1, 1)
    x = (torch.randn(2, 5, 6, 7, 8) * 10 + 50).contiguous(memory_format=torch.channels_last_3d)
    expected = torch.nn.functional.leaky_relu(norm(x.contiguous()), 0.01)
    ptr = x.data_ptr()
    with torch.inference_mode():
        out = cpu_inference.instance_norm_leaky_relu_(x, norm, 0.01)
    assert out.data_ptr() == ptr  # in place
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_not_taken_when_autograd_or_training_needs_the_graph():
    model = _model(3)
    x = torch.randn(1, 1, 16, 16, 16)
    assert not cpu_inference.applicable(model, x)  # gradients enabled
    with torch.no_grad():
        assert cpu_inference.applicable(model, x)
        assert not cpu_inference.applicable(model, x.double())
        model.train()
        assert not cpu_inference.applicable(model, x)
        model.eval()
        model.cpu_fast_path = False
        assert not cpu_inference.applicable(model, x)


def test_environment_switch(monkeypatch):
    model = _model(3)
    x = torch.randn(1, 1, 16, 16, 16)
    monkeypatch.setenv("MEDSEG_CPU_FAST_PATH", "0")
    with torch.no_grad():
        assert not cpu_inference.applicable(model, x)
        monkeypatch.setenv("MEDSEG_CPU_FAST_PATH", "1")
        assert cpu_inference.applicable(model, x)


def test_unsupported_block_falls_back_to_stock_forward():
    model = _model(3)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert cpu_inference.applicable(model, x)
        model.encoder[0][1][2] = nn.ReLU()  # not a LeakyReLU: the fast forward must not be used
        assert not cpu_inference.applicable(model, x)


def test_weight_cache_follows_new_weights():
    """Loading other weights (in-place copy_) or training a step invalidates the channels-last copies."""
    model = _model(3, seed=0)
    other = _model(3, seed=5)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        before = model(x)
    model.load_state_dict(other.state_dict())
    stock, fast, calls = _both(model, x)
    assert calls == 1
    assert torch.allclose(fast, stock, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fast, before, atol=1e-3)


def test_registry_unet_uses_it_in_the_sliding_window(one_thread):
    """The sliding window with the fast path gives the stock labels (the predict path users run)."""
    from napari_medseg.engine.inference import sliding_window
    from napari_medseg.engine.jobs import collect

    torch.manual_seed(0)
    model = create_model("unet-3d-fullres", 1, 3, 3, pool_kernels=[[2, 2, 2]] * 3, base_width=8, max_width=32)
    model.eval()
    image = torch.randn(1, 40, 36, 44)
    out = {}
    for fast in (False, True):
        model.cpu_fast_path = fast
        out[fast] = collect(sliding_window(model, image, (32, 32, 32), 3, mirror_axes=(0, 2)))[1]
    assert torch.allclose(out[True], out[False], atol=1e-4, rtol=1e-4)
    assert torch.equal(out[True].argmax(0), out[False].argmax(0))
