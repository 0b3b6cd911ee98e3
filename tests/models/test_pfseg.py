"""PFSeg (Wang et al., MICCAI 2021): shapes at 2x, guidance, gradients, parameter counts per spec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_medseg.models import ModelError, count_parameters, create_model, get_model_spec
from napari_medseg.models.pfseg import DoubleConv, PFSeg

pytestmark = pytest.mark.usefixtures("one_thread")


def _dc(i: int, o: int) -> int:
    """DoubleConv from the spec: conv3 (bias) + IN (no affine), twice, plus a 1x1 shortcut without bias."""
    return 27 * i * o + o + 27 * o * o + o + i * o


def _up(i: int, o: int) -> int:
    """ConvTranspose3d(k 4) with bias."""
    return 64 * i * o + o


def _expected_params(in_ch: int, k: int, c: int = 32) -> int:
    """PFSeg's parameter count derived from ARCHITECTURES.md section 4 (widths C, C, 2C, 4C, 8C)."""
    enc = _dc(in_ch, c) + _dc(c, c) + _dc(c, 2 * c) + _dc(2 * c, 4 * c) + _dc(4 * c, 8 * c)
    sgm = _dc(in_ch, c // 2) + _dc(c // 2, c) + _dc(c, 2 * c) + _dc(2 * c, 2 * c)

    def decoder(out: int) -> int:
        return (
            _up(10 * c, 4 * c) + _dc(8 * c, 4 * c)
            + _up(4 * c, 2 * c) + _dc(4 * c, 2 * c)
            + _up(2 * c, c) + _dc(2 * c, c)
            + _up(c, c) + _dc(2 * c, c)
            + _up(c, c) + _dc(c, c // 2)
            + (c // 2) * out + out  # 1x1 head with bias
        )

    return enc + sgm + decoder(k) + decoder(in_ch)


def test_hand_count_of_the_formula():
    # DoubleConv(1 -> 2): 27*1*2 + 2 + 27*2*2 + 2 + 1*2 = 54 + 2 + 108 + 2 + 2 = 168
    assert _dc(1, 2) == 168
    assert count_parameters(DoubleConv(1, 2)) == 168


def test_parameter_count_of_the_original_configuration():
    # The paper's network: one input channel, one (sigmoid) segmentation channel, width 32.
    net = create_model("pfseg", 1, 1)
    assert count_parameters(net) == _expected_params(1, 1) == 14_655_042
    # Each extra class costs one 16-wide 1x1 filter plus its bias; a channel more costs both ends.
    assert count_parameters(create_model("pfseg", 1, 4)) == _expected_params(1, 4) == 14_655_042 + 3 * 17
    assert count_parameters(create_model("pfseg", 2, 3, width=8)) == _expected_params(2, 3, c=8)


def test_double_conv_structure():
    block = DoubleConv(3, 8)
    norms = [m for m in block.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert len(norms) == 3 and not any(n.affine for n in norms)
    assert block.shortcut[0].bias is None and block.body[0].bias is not None
    # The shortcut really adds: zeroing the body's convs leaves LeakyReLU(IN(1x1 conv(x))).
    with torch.no_grad():
        for m in (block.body[0], block.body[3]):
            m.weight.zero_()
            m.bias.zero_()
        x = torch.randn(1, 3, 4, 4, 4)
        expected = F.leaky_relu(F.instance_norm(block.shortcut[0](x)), 0.01)
        assert torch.allclose(block(x), expected, atol=1e-5)


@pytest.mark.parametrize(("in_ch", "k"), [(1, 1), (1, 2), (2, 4)])
def test_outputs_are_twice_the_input_and_gradients_reach_every_parameter(in_ch, k):
    torch.manual_seed(0)
    net = create_model("pfseg", in_ch, k, width=4).train()
    x = torch.randn(1, in_ch, 16, 16, 32)
    seg, sr = net(x)
    assert seg.shape == (1, k, 32, 32, 64)
    assert sr.shape == (1, in_ch, 32, 32, 64)
    assert (sr >= 0).all()  # ReLU head
    (seg.square().mean() + sr.mean()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, k, 32, 32, 64)


def test_guidance_default_and_effect():
    torch.manual_seed(1)
    net = create_model("pfseg", 1, 2, width=4).eval()
    x = torch.randn(1, 1, 16, 16, 32)
    up = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)  # (32, 32, 64)
    crop = up[:, :, 12:20, 12:20, 24:40]  # central quarter of each HR axis
    with torch.no_grad():
        assert torch.equal(net(x), net(x, crop))
        other = net(x, torch.randn_like(crop))
    assert not torch.allclose(net(x, crop), other)  # the SGM branch is used


def test_bad_inputs_are_explained():
    net = create_model("pfseg", 1, 2, width=4).eval()
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 1, 16, 24, 32))
    with pytest.raises(ValueError, match="guidance"):
        net(torch.randn(1, 1, 16, 32, 32), torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ModelError, match="spatial_dims"):
        create_model("pfseg", 1, 2, spatial_dims=2)
    with pytest.raises(ModelError, match="width"):
        PFSeg(1, 2, width=3)


def test_spec():
    spec = get_model_spec("pfseg")
    assert spec.output_scale == 2 and spec.spatial_dims == (3,)
    assert spec.citation == "https://doi.org/10.1007/978-3-030-87193-2_13"
    assert "Wang" in spec.paper and "MICCAI 2021" in spec.paper
    assert spec.training["optimizer"] == "adam" and spec.training["lr"] == 1e-4
    assert spec.training["plateau_patience"] == 20
    shape, kwargs = spec.tiny(3)
    assert all(s % 16 == 0 for s in shape) and kwargs == {"width": 4}
