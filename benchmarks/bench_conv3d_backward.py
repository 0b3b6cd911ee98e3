"""The CPU 3D-convolution backward pass: ``nn.Conv3d`` vs :class:`napari_medseg.models.fastconv.Conv3d`.

Run on demand (not a test)::

    .venv/bin/python benchmarks/bench_conv3d_backward.py [--threads 2]

Prints, for single layers and for one nnU-Net training step (forward + backward + SGD step, batch 2),
the time with PyTorch's own backward (the baseline, measured in the same run) and with ours, and
their ratio (ours / baseline; below 1 is faster).
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_time
from torch import nn

from napari_medseg.models import blocks, create_model
from napari_medseg.models.fastconv import Conv3d


def layer(cin, cout, shape, fast):
    conv = (Conv3d if fast else nn.Conv3d)(cin, cout, 3, padding=1)
    x = torch.randn(2, cin, *shape, requires_grad=True)

    def step():
        conv.zero_grad()
        conv(x).sum().backward()

    return median_time(step)


def unet_step(fast, patch=(48, 64, 40)):
    old = blocks._CONV[3]
    blocks._CONV[3] = Conv3d if fast else nn.Conv3d
    try:
        torch.manual_seed(0)
        model = create_model("unet-3d-fullres", 1, 7, 3, base_width=12, max_width=96,
                             pool_kernels=[[2, 2, 2]] * 3, conv_kernels=[[3, 3, 3]] * 4, deep_supervision=False)
    finally:
        blocks._CONV[3] = old
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(2, 1, *patch)
    y = torch.randint(0, 7, (2, *patch))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return median_time(step)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    for cin, cout, shape in [(16, 16, (48, 64, 40)), (32, 32, (24, 32, 20)), (96, 96, (6, 8, 5))]:
        base, ours = layer(cin, cout, shape, False), layer(cin, cout, shape, True)
        print(f"conv3d {cin}->{cout} on 2x{'x'.join(map(str, shape))}: forward+backward "
              f"nn.Conv3d {base * 1e3:7.1f} ms, ours {ours * 1e3:7.1f} ms, ratio {ours / base:.2f}")
    base, ours = unet_step(False), unet_step(True)
    print(f"nnU-Net 3D training step (width 12, patch 48x64x40, batch 2): nn.Conv3d {base:.2f} s, "
          f"ours {ours:.2f} s, ratio {ours / base:.2f}")


if __name__ == "__main__":
    main()
