"""Shape and gradient contract of every registered model (DESIGN.md convention 11).

Each model is built from its spec's tiny configuration (``ModelSpec.min_input``) so that the
whole matrix runs in seconds on a CPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from napari_medseg.models import create_model, get_model_spec, list_models

CASES = [(name, dims) for name in list_models() for dims in get_model_spec(name).spatial_dims]


def _build(name, dims, in_channels, num_classes):
    spec = get_model_spec(name)
    missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{name} needs {missing}")
    shape, kwargs = spec.tiny(dims)
    torch.manual_seed(0)
    model = create_model(name, in_channels, num_classes, spatial_dims=dims, **kwargs)
    x = torch.randn(2, spec.network_in_channels(in_channels, num_classes), *shape)
    out_shape = (2, num_classes, *(s * spec.output_scale for s in shape))
    return model, x, out_shape


@pytest.mark.parametrize("in_channels, num_classes", [(1, 2), (2, 3)])
@pytest.mark.parametrize("name, dims", CASES)
def test_forward_backward_and_shapes(name, dims, in_channels, num_classes):
    model, x, out_shape = _build(name, dims, in_channels, num_classes)
    model.train()
    out = model(x)
    outputs = out if isinstance(out, (list, tuple)) else [out]
    assert tuple(outputs[0].shape) == out_shape
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters without gradient: {unused}"
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not bad, f"non-finite gradients: {bad}"

    model.eval()
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert isinstance(y1, torch.Tensor), "eval mode must return a single tensor"
    assert tuple(y1.shape) == out_shape
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2), "eval forward must be deterministic"


@pytest.mark.parametrize("name, dims", CASES)
def test_deep_supervision_when_supported(name, dims):
    spec = get_model_spec(name)
    if not spec.training.get("deep_supervision"):
        pytest.skip("no deep supervision")
    shape, kwargs = spec.tiny(dims)
    model = create_model(name, 1, 2, spatial_dims=dims, deep_supervision=True, **kwargs).train()
    x = torch.randn(1, spec.network_in_channels(1, 2), *shape)
    out = model(x)
    assert isinstance(out, list) and len(out) >= 2
    assert tuple(out[0].shape[2:]) == shape
    sizes = [o.shape[2:].numel() for o in out]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    assert isinstance(model.eval()(x), torch.Tensor)
