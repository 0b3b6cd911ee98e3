"""The fast CPU Conv3d gives the same gradients as nn.Conv3d."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_medseg.models.fastconv import Conv3d


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "padding", "bias", "shape"),
    [
        (3, 5, 3, 1, 1, True, (7, 9, 8)),
        (4, 6, (1, 3, 3), (1, 2, 2), (0, 1, 1), False, (5, 10, 9)),
        (2, 3, 3, 2, 1, True, (9, 8, 11)),
        (4, 2, (2, 2, 1), (2, 2, 1), 0, False, (6, 8, 5)),
        (3, 4, 1, 1, 0, True, (4, 5, 6)),
    ],
)
def test_gradients_match_nn_conv3d(cin, cout, kernel, stride, padding, bias, shape):
    torch.manual_seed(0)
    ref = nn.Conv3d(cin, cout, kernel, stride, padding, bias=bias).double()
    fast = Conv3d(cin, cout, kernel, stride, padding, bias=bias).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, cin, *shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    # float64 takes nn.Conv3d's path inside Conv3d too; check the custom Function directly as well.
    y_ref = ref(x)
    y_ref.pow(2).sum().backward()
    from napari_medseg.models.fastconv import _Conv3dCPU

    w = fast.weight
    b = fast.bias
    y = _Conv3dCPU.apply(x2, w, b, fast.stride, fast.padding, fast.dilation)
    y.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(w.grad, ref.weight.grad)
    if bias:
        torch.testing.assert_close(b.grad, ref.bias.grad)


def test_float32_module_uses_fast_path_and_matches():
    torch.manual_seed(1)
    ref = nn.Conv3d(4, 4, 3, padding=1)
    fast = Conv3d(4, 4, 3, padding=1)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8, 8)
    ref(x).sum().backward()
    out = fast(x)
    assert out.grad_fn is not None and "_Conv3dCPU" in type(out.grad_fn).__name__
    out.sum().backward()
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
    assert set(fast.state_dict()) == set(ref.state_dict())
    with torch.no_grad():  # inference is plain nn.Conv3d
        assert fast(x).grad_fn is None
