"""Registry behaviour: names, errors, specs, parameter counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

from napari_medseg.models import (
    ModelError,
    ModelSpec,
    count_parameters,
    create_model,
    get_model_spec,
    list_models,
    register_model,
)
from napari_medseg.models import registry as registry_module

UNETS = ["unet-2d", "unet-3d-cascade", "unet-3d-fullres", "unet-3d-lowres"]


def test_list_models_contains_the_nnunet_family_sorted():
    names = list_models()
    assert set(UNETS) <= set(names)
    assert names == sorted(names)
    assert list_models(family="nnunet") == UNETS
    assert "unet-2d" in list_models(spatial_dims=2)
    assert "unet-2d" not in list_models(spatial_dims=3)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelError, match="unet-3d-fullres"):
        create_model("unet-3d-fulres", 1, 2)
    with pytest.raises(ModelError, match="Unknown model"):
        get_model_spec("no-such-model")


def test_unknown_kwarg_is_named_with_the_accepted_ones():
    with pytest.raises(ModelError) as err:
        create_model("unet-2d", 1, 2, pool_kernel=[[2, 2]])
    msg = str(err.value)
    assert "pool_kernel" in msg and "pool_kernels" in msg and "conv_kernels" in msg


def test_unsupported_spatial_dims():
    with pytest.raises(ModelError, match="spatial_dims"):
        create_model("unet-2d", 1, 2, spatial_dims=3)
    with pytest.raises(ModelError, match="spatial_dims"):
        create_model("unet-3d-fullres", 1, 2, spatial_dims=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_channel_counts(bad):
    with pytest.raises(ModelError):
        create_model("unet-2d", bad, 2)
    with pytest.raises(ModelError):
        create_model("unet-2d", 1, bad)


@pytest.mark.parametrize("name", UNETS)
def test_specs_are_complete(name):
    spec = get_model_spec(name)
    assert spec.name == name and spec.family == "nnunet"
    assert spec.spatial_dims and all(d in (2, 3) for d in spec.spatial_dims)
    assert spec.description and "\n" not in spec.description
    assert "Isensee" in spec.paper and spec.citation.startswith("https://doi.org/")
    assert spec.configurable_by_plan and spec.divisibility
    assert spec.training["deep_supervision"] is True and spec.training["lr"] == 1e-2
    for dims in spec.spatial_dims:
        shape, kwargs = spec.tiny(dims)
        assert len(shape) == dims
    assert hash(spec) == hash(get_model_spec(name))


def test_cascade_spec_and_channels():
    spec = get_model_spec("unet-3d-cascade")
    assert spec.cascade_from == "3d_lowres" and spec.configuration == "3d_cascade_fullres"
    assert spec.network_in_channels(2, 4) == 5
    assert get_model_spec("unet-3d-fullres").network_in_channels(2, 4) == 2
    net = create_model("unet-3d-cascade", 2, 4, base_width=4, pool_kernels=[[2, 2, 2]])
    assert net.encoder[0][0][0].in_channels == 5


def _expected_unet_params(in_ch, k, dims, n_pool, base, cap, aux=False):
    """Parameter count of the nnU-Net U-Net from its description (3x3(x3) kernels, pools of 2)."""
    kv, pv = 3**dims, 2**dims
    w = [min(base * 2**s, cap) for s in range(n_pool + 1)]
    total, prev = 0, in_ch
    for s in range(n_pool + 1):  # encoder: conv(+bias) + IN affine, twice
        total += kv * prev * w[s] + 3 * w[s] + kv * w[s] * w[s] + 3 * w[s]
        prev = w[s]
    for s in range(n_pool - 1, -1, -1):  # decoder: transposed conv (no bias) + 2 convs
        total += (
            w[s + 1] * w[s] * pv + kv * 2 * w[s] * w[s] + 3 * w[s] + kv * w[s] * w[s] + 3 * w[s]
        )
    total += w[0] * k  # 1x1 head, no bias
    if aux:
        total += sum(w[s] * k for s in range(1, n_pool))
    return total


@pytest.mark.parametrize(
    "name, dims, n_pool, cap",
    [("unet-2d", 2, 5, 480), ("unet-3d-fullres", 3, 4, 320), ("unet-3d-lowres", 3, 4, 320)],
)
def test_default_parameter_count_is_stable(name, dims, n_pool, cap):
    net = create_model(name, 1, 3)
    expected = _expected_unet_params(1, 3, dims, n_pool, 32, cap)
    assert count_parameters(net) == expected > 0
    ds = create_model(name, 1, 3, deep_supervision=True)
    assert count_parameters(ds) == _expected_unet_params(1, 3, dims, n_pool, 32, cap, aux=True)
    cascade = create_model("unet-3d-cascade", 1, 3)
    assert count_parameters(cascade) == _expected_unet_params(3, 3, 3, 4, 32, 320)


def test_count_parameters_trainable_only():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=False) == 3 * 4 + 4 + 4 * 2 + 2
    assert count_parameters(net) == 4 + 4 * 2 + 2


def _dummy_spec(name, **kw):
    return ModelSpec(
        name=name, family="test", spatial_dims=(2,), description="d", paper="p", citation="c", **kw
    )


def test_register_model_validates_factories_and_applies_defaults():
    name = "test-dummy-registry"
    try:

        @register_model(spec=_dummy_spec(name, default_kwargs={"width": 5}))
        def dummy(in_channels, num_classes, spatial_dims, width=3):
            return nn.Conv2d(in_channels, width * num_classes, 1)

        assert name in list_models()
        assert create_model(name, 2, 3).out_channels == 15  # default_kwargs applied
        assert create_model(name, 2, 3, width=1).out_channels == 3  # caller overrides
        with pytest.raises(ModelError, match="width"):
            create_model(name, 2, 3, depth=2)
    finally:
        registry_module._REGISTRY.pop(name, None)

    with pytest.raises(TypeError, match="kwargs"):

        @register_model(spec=_dummy_spec("test-bad-1"))
        def bad(in_channels, num_classes, spatial_dims, **kw):
            return nn.Identity()

    with pytest.raises(TypeError, match="unknown"):

        @register_model(spec=_dummy_spec("test-bad-2", default_kwargs={"nope": 1}))
        def bad2(in_channels, num_classes, spatial_dims):
            return nn.Identity()

    with pytest.raises(ValueError, match="differs"):
        register_model("other-name", spec=_dummy_spec("test-bad-3"))
    assert not [n for n in list_models() if n.startswith("test-")]


def test_duplicate_name_from_another_factory_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_model(spec=_dummy_spec("unet-2d"))
        def unet_2d_clash(in_channels, num_classes, spatial_dims):
            return nn.Identity()


def test_models_and_planning_import_headless():
    code = (
        "import sys, napari_medseg.models, napari_medseg.engine.planning.planner; "
        "bad = [m for m in ('qtpy', 'napari', 'PyQt5') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_expected_count_formula_matches_a_hand_count():
    # 2D, 1 pool, base 2: enc0 9*1*2+6 + 9*2*2+6 = 66; enc1 9*2*4+12 + 9*4*4+12 = 240;
    # dec: 4*2*4 + 9*4*2+6 + 9*2*2+6 = 32+78+42 = 152; head 2*2 = 4  -> 462
    assert _expected_unet_params(1, 2, 2, 1, 2, 480) == 462
    assert (
        count_parameters(create_model("unet-2d", 1, 2, pool_kernels=[[2, 2]], base_width=2)) == 462
    )
