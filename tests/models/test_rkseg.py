"""RKSeg-L / RKSeg-R: parameter formula, shapes, gradients and the exact stage wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_medseg.models.registry import ModelError, count_parameters, create_model, get_model_spec
from napari_medseg.models.rkseg import RKSeg

NAMES = ["rkseg-l", "rkseg-r"]


pytestmark = pytest.mark.usefixtures("one_thread")


def spec_formula(cin: int, c: int, k: int, n: int, classes: int) -> int:
    """ARCHITECTURES.md section 2 (one kernel volume ``k`` in every stage)."""
    return (
        cin * c * k + c * c * k * (n * (n - 1) // 2 + 2 * n + 3) + 3 * c * (2 * n + 4) + c * classes
    )


def per_conv_count(variant: str, cin: int, c: int, convs: list[list[int]], classes: int) -> int:
    """The same count summed conv by conv, with the kernel of the level each conv runs at."""
    n, vol = len(convs) - 1, [math.prod(k) for k in convs]

    def two(a: int, level: int) -> int:  # 2 convs a -> C -> C, each with bias + IN(affine)
        return a * c * vol[level] + c * c * vol[level] + 2 * 3 * c

    total = two(cin, 0) + c * classes
    if variant == "L":
        total += sum(two(k * c, k) for k in range(1, n + 1)) + two(c, 0)
    else:
        total += two(c, n) + sum(two(c * (u + 2) if u < n - 1 else c, n - 1 - u) for u in range(n))
    return total


# (spatial_dims, pool_kernels, conv_kernels, kernel volume) where every stage has the same volume
UNIFORM_PLANS = [
    (2, [[2, 2]] * 3, [[3, 3]] * 4, 9),  # MSD Hippocampus 2D
    (2, [[2, 2]] * 5, [[3, 3]] * 6, 9),
    (2, [[2, 1], [2, 2], [1, 2], [2, 2]], [[3, 3]] * 5, 9),  # anisotropic pooling
    (3, [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, 27),  # MSD Hippocampus 3D
    (3, [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 5, 27),
    (3, [[1, 2, 2]] * 4, [[1, 3, 3]] * 5, 9),  # anisotropic kernels, same volume everywhere
    (3, [[1, 2, 2], [2, 1, 2], [2, 2, 1]], [[1, 3, 3], [3, 1, 3], [3, 3, 1], [1, 3, 3]], 9),
    (3, [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, 27),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dims, pools, convs, k", UNIFORM_PLANS)
@pytest.mark.parametrize("cin, classes", [(1, 2), (4, 5)])
def test_parameter_count_equals_the_spec_formula(name, dims, pools, convs, k, cin, classes):
    net = create_model(name, cin, classes, dims, pool_kernels=pools, conv_kernels=convs)
    n = len(pools)
    assert count_parameters(net) == spec_formula(cin, 32, k, n, classes)
    assert count_parameters(net) == per_conv_count(name[-1].upper(), cin, 32, convs, classes)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_other_width_and_mixed_kernel_volumes(name):
    net = create_model(
        name, 2, 3, 2, pool_kernels=[[2, 2]] * 4, conv_kernels=[[3, 3]] * 5, width=16
    )
    assert count_parameters(net) == spec_formula(2, 16, 9, 4, 3)
    # A real nnU-Net 3D plan mixes kernel volumes (9 and 27): the spec's single-k formula does not
    # apply, the conv-by-conv count (kernel of the level each conv runs at) does.
    pools = [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    convs = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    net = create_model(name, 1, 4, 3, pool_kernels=pools, conv_kernels=convs)
    assert count_parameters(net) == per_conv_count(name[-1].upper(), 1, 32, convs, 4)


def test_default_configurations():
    assert count_parameters(create_model("rkseg-l", 1, 2, 2)) == spec_formula(1, 32, 9, 5, 2)
    assert count_parameters(create_model("rkseg-r", 1, 2, 3)) == spec_formula(1, 32, 27, 4, 2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "dims, pools, shape",
    [
        (2, [[2, 2], [2, 1], [1, 2]], (12, 8)),
        (3, [[1, 2, 2], [2, 2, 2]], (4, 8, 12)),
    ],
)
def test_shapes_and_gradients(name, dims, pools, shape):
    convs = [[3] * dims for _ in range(len(pools) + 1)]
    net = create_model(name, 3, 4, dims, pool_kernels=pools, conv_kernels=convs, width=4).train()
    out = net(torch.randn(2, 3, *shape))
    assert out.shape == (2, 4, *shape)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(torch.ones(1, 3, *shape)), net(torch.ones(1, 3, *shape)))


@pytest.mark.parametrize("variant", ["L", "R"])
def test_layers_init_and_no_learned_resampling(variant):
    net = RKSeg(1, 3, 3, variant, [[2, 2, 2]] * 2, width=8)
    kinds = {type(m) for m in net.modules()}
    assert not kinds & {nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Upsample, nn.Dropout3d}
    assert net.head.bias is None and net.head.kernel_size == (1, 1, 1)
    assert all(
        m.affine and m.eps == 1e-5 for m in net.modules() if isinstance(m, nn.InstanceNorm3d)
    )
    assert all(m.negative_slope == 0.01 for m in net.modules() if isinstance(m, nn.LeakyReLU))
    assert all(isinstance(p, nn.MaxPool3d) for p in net.pools)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m is not net.head]
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)
    assert len(convs) == 2 * 2 + 4  # 2n + 4 convs with bias


def _capture(modules):
    """Forward hooks recording each module's (input, output)."""
    seen = {}
    for key, m in modules.items():
        m.register_forward_hook(
            lambda mod, args, out, key=key: seen.__setitem__(key, (args[0], out))
        )
    return seen


def test_rkseg_l_concatenation_order_and_sum():
    pools = [[2, 2], [2, 1], [1, 2]]
    c = 4
    net = RKSeg(2, 3, 2, "L", pools, width=c).eval()
    assert [s[0][0].in_channels for s in net.stages] == [c, 2 * c, 3 * c]
    seen = _capture(
        {
            "stem": net.stem,
            "out": net.out_convs,
            **{f"s{k + 1}": s for k, s in enumerate(net.stages)},
        }
    )
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        net(x)
    outs = [seen["stem"][1]] + [seen[f"s{k}"][1] for k in range(1, 4)]

    def pooled(t, start, stop):  # step by step from level `start` to level `stop`
        for lvl in range(start, stop):
            t = F.max_pool2d(t, pools[lvl], pools[lvl])
        return t

    for k in range(1, 4):
        expected = [pooled(outs[k - 1], k - 1, k)] + [pooled(outs[j], j, k) for j in range(k - 1)]
        assert torch.equal(seen[f"s{k}"][0], torch.cat(expected, dim=1)), k
    total = outs[0] + sum(
        F.interpolate(outs[k], size=(16, 16), mode="bilinear", align_corners=False)
        for k in range(1, 4)
    )
    torch.testing.assert_close(seen["out"][0], total)


def test_rkseg_r_structure_step_by_step_upsampling_and_final_sum():
    pools = [[2, 2], [2, 1], [1, 2]]
    c, n = 4, 3
    net = RKSeg(1, 2, 2, "R", pools, width=c).eval()
    assert [d[0][0].in_channels for d in net.decoder] == [2 * c, 3 * c, c]
    assert net.bottleneck[0][0].in_channels == c
    seen = _capture(
        {
            "stem": net.stem,
            "bottleneck": net.bottleneck,
            **{f"d{u}": d for u, d in enumerate(net.decoder)},
        }
    )
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        net(x)
    levels = [seen["stem"][1]]
    for p in pools:  # y0 max-pooled n times with no convs in between
        levels.append(F.max_pool2d(levels[-1], p, p))
    assert torch.equal(seen["bottleneck"][0], levels[n])

    def up(t, level):
        return F.interpolate(t, size=levels[level].shape[2:], mode="bilinear", align_corners=False)

    prev, carried = seen["bottleneck"][1], []
    for u in range(n):
        level = n - 1 - u
        carried = [up(t, level) for t in carried]  # re-upsampled one level at a time
        cur = up(prev, level)
        if u < n - 1:
            expected = torch.cat([cur, levels[level], *carried], dim=1)
        else:
            expected = cur + levels[0] + sum(carried)
        torch.testing.assert_close(seen[f"d{u}"][0], expected)
        carried.append(cur)
        prev = seen[f"d{u}"][1]
    # one jump from the bottleneck to full resolution differs: the test is sensitive to it
    jump = F.interpolate(seen["bottleneck"][1], size=(16, 16), mode="bilinear", align_corners=False)
    assert not torch.allclose(jump, carried[0], atol=1e-4)


def test_input_and_config_validation():
    net = RKSeg(1, 2, 2, "L", [[2, 2]] * 2, width=4)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 10, 12))
    with pytest.raises(ValueError, match="spatial"):
        net(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ModelError, match="variant"):
        RKSeg(1, 2, 2, "X")
    with pytest.raises(ModelError, match="conv_kernels"):
        RKSeg(1, 2, 2, "R", [[2, 2]] * 2, [[3, 3]] * 2)
    with pytest.raises(ModelError, match="width"):
        create_model("rkseg-l", 1, 2, 2, width=0)


@pytest.mark.parametrize("name", NAMES)
def test_specs(name):
    spec = get_model_spec(name)
    assert spec.family == "rkseg" and set(spec.spatial_dims) == {2, 3}
    assert (
        spec.configurable_by_plan
        and "Zhu" in spec.paper
        and spec.citation.startswith("https://doi")
    )
    assert spec.training["epochs"] == 150 and spec.training["deep_supervision"] is False
    assert spec.training["optimizer"] == "sgd" and spec.training["lr"] == 1e-2
    assert spec.training["loss"] == "dice_ce"
