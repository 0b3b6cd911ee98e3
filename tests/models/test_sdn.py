"""SDN layers and the SDN U-Net / U-Net++: the vectorised sweep against a per-position loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_medseg.models.registry import ModelError, count_parameters, create_model, get_model_spec
from napari_medseg.models.sdn import SDN, ResSDN, SDNNestedUNet, SDNSweep, SDNUNet, make_block

TINY = {"n_layers": 2, "sdn_n_layers": 1, "state_size": 8, "base_width": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_sweep(states: torch.Tensor, sweep: SDNSweep) -> torch.Tensor:
    """Slow, obviously correct sweep: explicit loops over batch, lines and positions on a line."""
    b_, s, h_, w_ = states.shape
    wih, bih, whh, bhh = sweep.weight_ih, sweep.bias_ih, sweep.weight_hh, sweep.bias_hh
    zero = states.new_zeros(s)
    grid = [[[states[b, :, i, j] for j in range(w_)] for i in range(h_)] for b in range(b_)]

    def cell(x3: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gi, gh = wih @ x3 + bih, whh @ h + bhh
        r = torch.sigmoid(gi[:s] + gh[:s])
        z = torch.sigmoid(gi[s : 2 * s] + gh[s : 2 * s])
        n = torch.tanh(gi[2 * s :] + r * gh[2 * s :])
        return z * n + (1 - z) * h  # new = z*n + (1-z)*h

    columns = sweep.direction in (0, 1)
    n_lines, n_pos = (w_, h_) if columns else (h_, w_)
    lines = range(1, n_lines) if sweep.direction in (0, 2) else range(n_lines - 2, -1, -1)
    step = -1 if sweep.direction in (0, 2) else 1  # the previous line, already updated

    def get(b, line, pos):
        if not 0 <= pos < n_pos:
            return zero
        return grid[b][pos][line] if columns else grid[b][line][pos]

    for b in range(b_):
        for line in lines:
            for pos in range(n_pos):
                x3 = torch.cat([get(b, line + step, pos + d) for d in (-1, 0, 1)])
                new = cell(x3, get(b, line, pos))
                if columns:
                    grid[b][pos][line] = new
                else:
                    grid[b][line][pos] = new
    return torch.stack([torch.stack([torch.stack(row, -1) for row in img], -2) for img in grid])


def reference_sdn(layer: SDN, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(
        nn.functional.conv2d(x, layer.project_in.weight, layer.project_in.bias, padding=1)
    )
    for sweep in layer.sweeps:
        h = reference_sweep(h, sweep)
    return nn.functional.conv2d(h, layer.project_out.weight, layer.project_out.bias)


@pytest.mark.parametrize("direction", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(5, 7), (6, 3)])
def test_sweep_matches_reference_loop_values_and_gradients(direction, shape):
    torch.manual_seed(direction)
    sweep = SDNSweep(6, direction)
    states = torch.randn(2, 6, *shape, requires_grad=True)
    fast, slow = sweep(states), reference_sweep(states, sweep)
    assert fast.shape == states.shape
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    # the first swept line keeps its projection
    first = {0: (..., 0), 1: (..., -1), 2: (..., 0, slice(None)), 3: (..., -1, slice(None))}
    assert torch.equal(fast[first[direction]], states[first[direction]])
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * g).sum(), [states, *sweep.parameters()])
    grads_slow = torch.autograd.grad((slow * g).sum(), [states, *sweep.parameters()])
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("directions", [(0, 2), (3, 1), (1, 2, 0, 3)])
def test_sdn_layer_matches_reference(directions):
    torch.manual_seed(0)
    layer = SDN(3, 2, state_size=5, directions=directions)
    x = torch.randn(2, 3, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_sdn(layer, x), atol=1e-5, rtol=0)


def test_sweep_direction_changes_result_and_reaches_far_positions():
    torch.manual_seed(0)
    states = torch.randn(1, 4, 5, 5)
    outs = [SDNSweep(4, d) for d in range(4)]
    for o in outs[1:]:
        o.load_state_dict(outs[0].state_dict())
    res = [o(states) for o in outs]
    assert all(not torch.allclose(res[0], r) for r in res[1:])
    # left->right: the last column depends on the first column (long-range dependency)
    s = states.clone().requires_grad_(True)
    outs[0](s)[0, :, :, -1].sum().backward()
    assert s.grad[0, :, :, 0].abs().sum() > 0


def test_gating_is_the_reverse_of_grucell():
    torch.manual_seed(0)
    sweep = SDNSweep(3, 0)
    with torch.no_grad():  # z = sigmoid(+big) = 1 -> new = n; GRUCell would keep h instead
        sweep.bias_ih[3:6] = 50.0
    states = torch.randn(1, 3, 2, 2)
    out = sweep(states)
    x3 = torch.cat([torch.zeros(3), states[0, :, 0, 0], states[0, :, 1, 0]])
    gi = sweep.weight_ih @ x3 + sweep.bias_ih
    gh = sweep.weight_hh @ states[0, :, 0, 1] + sweep.bias_hh
    n = torch.tanh(gi[6:] + torch.sigmoid(gi[:3] + gh[:3]) * gh[6:])
    torch.testing.assert_close(out[0, :, 0, 1], n)


@pytest.mark.parametrize(
    "cin, cout, s, dirs", [(1, 1, 150, (0, 2)), (3, 5, 7, (0,)), (16, 16, 12, (0, 1, 2, 3))]
)
def test_sdn_parameter_formula_and_init(cin, cout, s, dirs):
    layer = SDN(cin, cout, s, dirs)
    expected = 9 * cin * s + s + len(dirs) * (12 * s * s + 6 * s) + s * cout + cout
    assert count_parameters(layer) == expected
    bound = 1 / s**0.5
    for sweep in layer.sweeps:
        assert sweep.weight_ih.shape == (3 * s, 3 * s) and sweep.weight_hh.shape == (3 * s, s)
        assert all(p.abs().max() <= bound for p in sweep.parameters())


def test_ressdn_shapes_params_and_gate():
    torch.manual_seed(0)
    layer = ResSDN(3, 4, state_size=6, directions=(0, 2))
    x = torch.randn(2, 3, 5, 7)
    y = layer(x)
    assert y.shape == (2, 4, 5, 7)
    assert layer.sdn.project_out.out_channels == 8
    sdn_params = 9 * 3 * 6 + 6 + 2 * (12 * 36 + 36) + 6 * 8 + 8
    assert count_parameters(layer) == sdn_params + 9 * 3 * 4 + 4
    with torch.no_grad():
        s, g = layer.sdn(x).chunk(2, dim=1)
        expected = torch.sigmoid(g) * layer.conv(x) + (1 - torch.sigmoid(g)) * s
        torch.testing.assert_close(layer(x), expected)


def _kinds(module: nn.Module) -> list[str]:
    """Block kinds of a sequence of make_block() blocks."""
    out = []
    for b in module:
        kind = (
            "vggres_sdn"
            if isinstance(b[3], ResSDN)
            else "vgg_sdn"
            if isinstance(b[3], SDN)
            else "vgg"
        )
        out.append(kind)
    return out


def test_block_kinds():
    assert [type(m) for m in make_block("vgg", 2, 4)] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    assert isinstance(make_block("vgg_sdn", 2, 4, 5)[3], SDN)
    assert isinstance(make_block("vggres_sdn", 2, 4, 5)[3], ResSDN)
    with pytest.raises(ModelError, match="block"):
        make_block("vggres", 2, 4)


def test_unet_sdn_placement():
    net = SDNUNet(1, 2, n_layers=4, sdn_n_layers=1, state_size=4, block="vggres_sdn", base_width=2)
    assert _kinds([net.inc]) == ["vgg"]
    assert _kinds(net.down) == ["vggres_sdn"] * 2 + ["vgg"] * 2  # i <= sdn_n_layers
    assert _kinds(net.up) == ["vggres_sdn"] * 2 + ["vgg"] * 2  # i = 0 is the deepest
    only_dec = SDNUNet(1, 2, n_layers=3, sdn_encoder=False, state_size=4, base_width=2)
    assert _kinds(only_dec.down) == ["vgg"] * 3 and _kinds(only_dec.up) == ["vgg_sdn"] * 3
    assert [b[0].in_channels for b in only_dec.up] == [16, 8, 4]
    assert [b[0].out_channels for b in only_dec.up] == [8, 4, 2]


def test_unetpp_sdn_placement():
    def kinds(net):
        return {k: _kinds([b])[0] for k, b in net.nodes.items()}

    net = SDNNestedUNet(1, 2, n_layers=3, sdn_n_layers=0, state_size=4, base_width=2)
    sdn_nodes = {k for k, v in kinds(net).items() if v != "vgg"}
    assert sdn_nodes == {"x0_0", "x1_0", "x0_1"}
    assert all(v == "vggres_sdn" for k, v in kinds(net).items() if k in sdn_nodes)
    net = SDNNestedUNet(
        1, 2, n_layers=3, sdn_n_layers=2, state_size=4, base_width=2, block="vgg_sdn"
    )
    assert {k for k, v in kinds(net).items() if v != "vgg"} == {
        "x0_0",
        "x1_0",
        "x2_0",
        "x0_1",
        "x0_2",
    }
    assert (
        net.nodes["x0_3"][0].in_channels == 3 * 2 + 4 and net.nodes["x1_1"][0].in_channels == 4 + 8
    )
    plain = SDNNestedUNet(1, 2, n_layers=2, sdn_encoder=False, sdn_decoder=False, base_width=2)
    assert set(kinds(plain).values()) == {"vgg"}


@pytest.mark.parametrize("name", ["sdn-unet", "sdn-unetpp"])
@pytest.mark.parametrize("block", ["vgg", "vgg_sdn", "vggres_sdn"])
def test_models_forward_backward_each_block(name, block):
    torch.manual_seed(0)
    net = create_model(name, 3, 4, block=block, directions=(0, 1, 2, 3), **TINY).train()
    x = torch.randn(2, 3, 8, 12)
    out = net(x)
    assert out.shape == (2, 4, 8, 12)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    has_sdn = any(isinstance(m, SDN) for m in net.modules())
    assert has_sdn == (block != "vgg")
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("name", ["sdn-unet", "sdn-unetpp"])
def test_sizes_not_divisible_are_padded_in_the_decoder(name):
    net = create_model(name, 1, 2, **TINY).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 10, 15)).shape == (1, 2, 10, 15)
    with pytest.raises(ValueError, match="at least"):
        net(torch.randn(1, 1, 3, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.randn(1, 1, 8, 8, 8))


def test_default_parameter_counts_and_validation():
    unet, unetpp = create_model("sdn-unet", 1, 2), create_model("sdn-unetpp", 1, 2)
    assert unet.widths == [32, 64, 128, 256, 512, 1024] and unet.state_size == 150
    assert unetpp.widths == [32, 64, 128, 256, 512] and unet.directions == (0, 2)
    sdn_layers = [m for m in unet.modules() if isinstance(m, SDN)]
    assert len(sdn_layers) == 8 and all(len(m.sweeps) == 2 for m in sdn_layers)
    assert count_parameters(unet) == 29_959_602 and count_parameters(unetpp) == 13_907_988
    for bad in ((0, 4), (), (0.0,)):
        with pytest.raises(ModelError, match="directions"):
            create_model("sdn-unet", 1, 2, directions=bad)
    with pytest.raises(ModelError, match="block"):
        create_model("sdn-unet", 1, 2, block="res")
    with pytest.raises(ModelError, match="n_layers"):
        create_model("sdn-unetpp", 1, 2, n_layers=0)
    with pytest.raises(ModelError, match="spatial_dims"):
        create_model("sdn-unet", 1, 2, spatial_dims=3)


@pytest.mark.parametrize("name", ["sdn-unet", "sdn-unetpp"])
def test_specs(name):
    spec = get_model_spec(name)
    assert spec.family == "sdn" and spec.spatial_dims == (2,) and not spec.configurable_by_plan
    assert "Carvalho" in spec.paper and "2**n_layers" in spec.divisibility
    t = spec.training
    assert (t["optimizer"], t["lr"], t["epochs"], t["early_stopping_patience"]) == (
        "adam",
        1e-4,
        300,
        30,
    )
    assert t["early_stopping_monitor"] == "val_loss" and t["deep_supervision"] is False
