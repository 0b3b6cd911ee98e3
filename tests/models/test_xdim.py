"""Cross-dimensional transfer models: Omnia-Net, DX-Net (inflation), DS-Net, lazy timm import."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from napari_medseg.models import ModelError, count_parameters, create_model, get_model_spec
from napari_medseg.models._timm import import_timm
from napari_medseg.models.efficientnet3d import (
    EfficientNet3D,
    adapt_input_conv,
    inflate_state_dict,
    inflate_weight,
)
from napari_medseg.models.xdim import DSNet, OmniaNet

if importlib.util.find_spec("timm") is None:  # import_timm, not importorskip: torchvision workaround
    pytest.skip("timm is not installed", allow_module_level=True)
NAMES = ["omnia-net-b0", "omnia-net-b4", "dx-net", "ds-net"]


def _timm_features(name="efficientnet_b0", in_chans=3, seed=0):
    """A randomly initialised timm backbone with random BN statistics, in eval mode."""
    torch.manual_seed(seed)
    net = import_timm().create_model(name, features_only=True, pretrained=False, in_chans=in_chans)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return net.eval()


def _conv(cin, cout, k=3):
    return k * k * cin * cout


def _conv_bn(cin, cout, k=3):  # conv without bias + BN (weight, bias)
    return _conv(cin, cout, k) + 2 * cout


# ------------------------------------------------------------------------------------- registry
def test_specs_cite_the_paper_and_use_lookahead():
    for name in NAMES:
        spec = get_model_spec(name)
        assert spec.family == "xdim" and spec.requires == ("timm",)
        assert "Messaoudi" in spec.paper and "Medical Image Analysis 88:102868" in spec.paper
        assert spec.citation == "https://doi.org/10.1016/j.media.2023.102868"
        assert spec.training["optimizer"] == "lookahead_nadam"
        assert spec.divisibility and "32" in spec.divisibility


def test_importing_the_models_does_not_import_timm():
    code = (
        "import sys\n"
        "import napari_medseg, napari_medseg.models\n"
        "from napari_medseg.models import create_model\n"
        "create_model('unet-2d', 1, 2)\n"
        "bad = [m for m in ('timm', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_timm_gives_a_model_error_naming_the_package(monkeypatch):
    import napari_medseg.models._timm as mod

    def fail(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(mod, "_patch_torchvision", lambda: None)
    monkeypatch.setattr(mod.importlib, "import_module", fail)
    with pytest.raises(ModelError, match="pip install timm"):
        mod.import_timm()


# ----------------------------------------------------------------------------------- Omnia-Net
@pytest.mark.parametrize("name, skips", [("omnia-net-b0", [16, 24, 40, 112, 320]),
                                         ("omnia-net-b4", [24, 32, 56, 160, 448])])
def test_omnia_parameter_count_follows_the_design(name, skips):
    """timm's features_only count (16-channel input) + stem + the U-Net decoder, by hand."""
    in_ch, classes = 1, 2
    model = create_model(name, in_ch, classes)
    backbone = "efficientnet_b0" if name.endswith("b0") else "efficientnet_b4"
    encoder = count_parameters(_timm_features(backbone, in_chans=16))
    stem = _conv_bn(in_ch, 16)
    decoder, cin = 0, skips[-1]
    for skip, width in zip([*skips[-2::-1], 16], (256, 128, 64, 32, 16)):
        decoder += _conv_bn(cin + skip, width) + _conv_bn(width, width)
        cin = width
    last = _conv(16, classes) + classes
    assert count_parameters(model) == encoder + stem + decoder + last
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "classifier" in n or "head" in n], "unused classifier head"
    assert model.encoder.feature_info.channels() == skips
    with torch.no_grad():  # the real backbone runs (the contract tests use a tiny configuration)
        assert model.eval()(torch.randn(1, in_ch, 32, 64)).shape == (1, classes, 32, 64)


def test_omnia_accepts_other_backbones_and_rejects_wrong_strides():
    net = create_model("omnia-net-b0", 2, 3, backbone="resnet18", decoder_widths=[16, 16, 8, 8, 8]).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 2, 64, 32)).shape == (1, 3, 64, 32)
    with pytest.raises(ModelError, match="strides"):
        create_model("omnia-net-b0", 1, 2, backbone="convnext_atto")
    with pytest.raises(ModelError, match="no-such-net"):
        create_model("omnia-net-b0", 1, 2, backbone="no-such-net")
    with pytest.raises(ModelError, match="divisible by 32"):
        net(torch.randn(1, 2, 48, 32))


def test_adapt_input_conv_sums_rgb_for_grey_images():
    torch.manual_seed(0)
    rgb = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    grey = nn.Conv2d(1, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        grey.weight.copy_(adapt_input_conv(rgb.weight, 1))
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)
    assert torch.equal(adapt_input_conv(rgb.weight, 3), rgb.weight)
    assert adapt_input_conv(rgb.weight, 16) is None and adapt_input_conv(rgb.weight, 2) is None


def test_omnia_backbone_weights_loading_adapts_or_reinitialises_the_first_conv():
    source = _timm_features("efficientnet_b0", in_chans=3)
    state = source.state_dict()
    # stem=False, grey input: the backbone sees 1 channel -> summed RGB kernels, same response.
    grey = OmniaNet(1, 2, stem=False, decoder_widths=[8, 8, 8, 8, 8]).eval()
    assert grey.load_backbone_weights(state) == []
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(grey.encoder(x), source(x.expand(-1, 3, -1, -1))):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Omnia-Net proper: the backbone sees the 16-channel stem -> its first conv is re-initialised.
    omnia = OmniaNet(1, 2, decoder_widths=[8, 8, 8, 8, 8])
    fresh = omnia.encoder.conv_stem.weight.detach().clone()
    assert omnia.load_backbone_weights(state) == ["conv_stem.weight"]
    assert torch.equal(omnia.encoder.conv_stem.weight, fresh)
    assert torch.equal(omnia.encoder.blocks[3][1].conv_dw.weight, state["blocks.3.1.conv_dw.weight"])


def test_pretrained_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    t0 = time.perf_counter()
    for name in ("omnia-net-b0", "dx-net"):
        with pytest.raises(ModelError, match="not available offline.*pretrained=False"):
            create_model(name, 1, 2, pretrained=True)
    assert time.perf_counter() - t0 < 20


def test_pretrained_loads_from_the_local_hub_cache(tmp_path, monkeypatch):
    """A file laid out as in the Hugging Face cache is found and loaded without any network."""
    safetensors = pytest.importorskip("safetensors.torch")
    timm = import_timm()
    hub_id = timm.models.get_pretrained_cfg("efficientnet_b0").hf_hub_id
    snap = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--")) / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    torch.manual_seed(3)
    full = timm.create_model("efficientnet_b0", pretrained=False)  # with its classifier, as published
    safetensors.save_file(full.state_dict(), str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    net = create_model("ds-net", 1, 2, pretrained=True, widths=[4, 4, 4, 4], mid_channels=1,
                       decoder_widths=[8, 8, 8, 8, 8])
    # DS-Net's 2D backbone sees the 3 slices as RGB: every tensor, first conv included, is loaded.
    enc = net.net2d.encoder.state_dict()
    for key in ("conv_stem.weight", "blocks.5.2.conv_pwl.weight", "bn1.running_var"):
        assert torch.equal(enc[key], full.state_dict()[key])


# ---------------------------------------------------------------------------- DX-Net inflation
def test_inflate_weight_replicates_along_depth_and_divides_by_k():
    w = torch.randn(4, 2, 5, 5)
    w3 = inflate_weight(w)
    assert w3.shape == (4, 2, 5, 5, 5)
    for d in range(5):
        torch.testing.assert_close(w3[:, :, d] * 5, w)
    torch.testing.assert_close(inflate_weight(torch.randn(3, 2, 1, 1)).shape, torch.Size([3, 2, 1, 1, 1]))
    with pytest.raises(ValueError, match="square"):
        inflate_weight(torch.randn(1, 1, 3, 5))


@pytest.fixture(scope="module")
def inflated_pair():
    source = _timm_features("efficientnet_b0", in_chans=16, seed=1)
    enc3d = EfficientNet3D(16)
    assert enc3d.load_2d_state_dict(source.state_dict()) == []
    return source, enc3d.eval()


def _depth_constant(x2d, depth):
    return x2d.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous()


def test_inflated_stem_gives_the_2d_response_on_interior_slices(inflated_pair):
    source, enc3d = inflated_pair
    x = torch.randn(1, 16, 32, 32)
    with torch.no_grad():
        y2 = source.bn1(source.conv_stem(x))  # timm's BatchNormAct2d applies SiLU
        y3 = enc3d.act(enc3d.bn1(enc3d.conv_stem(_depth_constant(x, 12))))
    assert y3.shape[2] == 6
    for d in range(1, 6):  # slice 0 sees the zero padding before the volume
        torch.testing.assert_close(y3[:, :, d], y2, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y3[:, :, 0], y2, atol=1e-3)  # the border really differs


def _replicate_padding(model):
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)) and max(m.kernel_size) > 1:
            m.padding_mode = "replicate"


def test_inflated_block_and_encoder_match_2d_with_replicated_borders(inflated_pair):
    """With borders replicated (no padding effect along depth) every slice equals the 2D output.

    The squeeze-excitation pools over the whole volume, so with zero padding the border slices
    would leak into every slice; replicate padding isolates the inflation rule itself.
    """
    source, enc3d = inflated_pair
    source, enc3d = copy.deepcopy(source), copy.deepcopy(enc3d)
    _replicate_padding(source)
    _replicate_padding(enc3d)
    x = torch.randn(1, 24, 16, 16)
    with torch.no_grad():
        b2 = source.blocks[2][0](x)  # MBConv6, k5, stride 2, with SE
        b3 = enc3d.blocks[2][0](_depth_constant(x, 8))
        assert b3.shape[2] == 4
        for d in range(4):
            torch.testing.assert_close(b3[:, :, d], b2, atol=1e-4, rtol=1e-4)
        x = torch.randn(1, 16, 64, 64)
        f2, f3 = source(x), enc3d(_depth_constant(x, 64))
    assert [f.shape[1] for f in f3] == [16, 24, 40, 112, 320]
    for a, b in zip(f3, f2):
        for d in range(a.shape[2]):
            torch.testing.assert_close(a[:, :, d], b, atol=1e-4, rtol=1e-4)


def test_dx_net_parameter_count_is_the_inflated_2d_count():
    source = _timm_features("efficientnet_b0", in_chans=16)
    inflated = sum(p.numel() * (p.shape[-1] if p.ndim == 4 else 1) for p in source.parameters())
    net = create_model("dx-net", 1, 2)
    assert count_parameters(net.encoder) == inflated
    skips, decoder, cin = [320, 112, 40, 24, 16, 16], 0, 320
    for skip, width in zip(skips[1:], (256, 128, 64, 32, 16)):
        decoder += 8 * cin * cin + cin  # ConvTranspose3d(cin, cin, 2, 2)
        decoder += 3 * (_conv(cin + skip, width) + _conv(width, width)) + 4 * width  # 3^3 = 3 * 3^2
        cin = width
    stem, last = 3 * _conv(1, 16) + 32, 3 * _conv(16, 2) + 2
    assert count_parameters(net) == inflated + decoder + stem + last


def test_dx_net_initialises_from_a_2d_state_dict_file(tmp_path):
    source = _timm_features("efficientnet_b0", in_chans=3)
    path = tmp_path / "b0.pt"
    torch.save(source.state_dict(), path)
    # 1 input channel; the encoder sees the 16-channel stem: conv_stem is re-initialised.
    net = create_model("dx-net", 1, 2, init_2d=str(path), decoder_widths=[8, 8, 8, 8, 8])
    want = inflate_state_dict(source.state_dict())
    got = net.encoder.state_dict()
    assert torch.equal(got["blocks.4.1.conv_dw.weight"], want["blocks.4.1.conv_dw.weight"])
    assert torch.equal(got["blocks.6.0.se.conv_reduce.bias"], want["blocks.6.0.se.conv_reduce.bias"])
    assert got["conv_stem.weight"].shape == (32, 16, 3, 3, 3)
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="does not fit"):
        create_model("dx-net", 1, 2, init_2d=str(tmp_path / "bad.pt"))


# -------------------------------------------------------------------------------------- DS-Net
TINY_DS = {"widths": [4, 8, 8, 8], "mid_channels": 2, "decoder_widths": [16, 8, 8, 8, 8]}


def test_ds_net_any_batch_and_depth_items_are_independent():
    torch.manual_seed(0)
    net = create_model("ds-net", 2, 3, **TINY_DS).eval()
    x = torch.randn(3, 2, 40, 32, 32)  # 40 = 5 x 8: adaptive pooling into 3 uneven slices
    with torch.no_grad():
        y = net(x)
        y1 = net(x[1:2])
    assert y.shape == (3, 3, 40, 32, 32)
    torch.testing.assert_close(y[1:2], y1, atol=1e-5, rtol=1e-4)  # no mixing across the batch


@pytest.mark.parametrize("shape, match", [((20, 32, 32), "divisible by 8"), ((16, 32, 32), "at least 24"),
                                          ((24, 40, 32), "divisible by 32")])
def test_ds_net_clear_error_for_unsupported_sizes(shape, match):
    net = create_model("ds-net", 1, 2, **TINY_DS)
    with pytest.raises(ModelError, match=match):
        net(torch.randn(1, 1, *shape))
    ok = create_model("ds-net", 1, 2, depth_strides=[1, 1, 2], **TINY_DS).eval()
    with torch.no_grad():
        assert ok(torch.randn(1, 1, 6, 32, 32)).shape == (1, 2, 6, 32, 32)


def test_ds_net_parameter_count_follows_the_design():
    in_ch, classes = 4, 3  # the authors' BraTS configuration
    net = create_model("ds-net", in_ch, classes)
    assert isinstance(net, DSNet)
    w, mid = (16, 32, 48, 96), 4
    enc = 3 * (_conv(in_ch, w[0]) + _conv(w[0], w[1]) + _conv(w[1], w[2]) + _conv(w[2], w[2])
               + _conv(w[2], w[3]) + _conv(w[3], w[3]) + _conv(w[3], mid) + _conv(mid, mid))
    backbone = count_parameters(_timm_features("efficientnet_b0", in_chans=3))
    d2, cin = 0, 320
    for skip, width in zip((112, 40, 24, 16, 0), (256, 128, 64, 32, 16)):
        d2 += 4 * cin * cin + cin + _conv_bn(cin + skip, width) + _conv_bn(width, width)
        cin = width
    d2 += _conv(16, 3) + 3
    dec = 3 * _conv(mid + w[3], w[3])  # nearest upsampling from 3 slices: no parameters
    for cin, cout in ((w[3], w[2]), (w[2], w[1]), (w[1], w[0])):
        dec += 2 * cin * cin + cin + 3 * _conv(cin + cout, cout)
    last = 3 * _conv(w[0], classes) + classes
    assert count_parameters(net) == enc + backbone + d2 + dec + last


def test_batchnorm_single_value_is_explained():
    """Batch 1 of a 32-pixel patch leaves BatchNorm one value per channel: say what to change."""
    from napari_medseg.models import ModelError, create_model

    model = create_model("omnia-net-b0", 1, 2, 2, decoder_widths=[32, 16, 16, 8, 8]).train()
    with pytest.raises(ModelError, match=r"batch 1 of \(32, 32\) gives one\. Use a batch size of at least 2"):
        model(torch.zeros(1, 1, 32, 32))
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2, 32, 32)
    assert model(torch.zeros(1, 1, 64, 32)).shape == (1, 2, 64, 32)
    model.eval()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)  # inference: running statistics
