"""The channels-last CPU inference forward of NNUNet against the stock nn.Module forward.

Run on demand (not a test)::

    .venv/bin/python benchmarks/bench_cpu_forward.py --threads 2

Two measurements, each alternating the two forwards in one process (``MEDSEG_CPU_FAST_PATH=1`` /
``0``; see ``napari_medseg/models/cpu_inference.py``), medians and ratios printed:

1. one forward of the 3d_fullres U-Net (widths 32..320, 5 pools, random weights) on a ``--patch``^3
   tile (default 128);
2. ``engine.predict`` on the shipped sample (Colin27, 72x86x98) with the shipped checkpoint and
   mirroring, the work the Segment widget does; the labels of both forwards are compared.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from _timing import interleaved, median, report
from bench_inference import build_ours, unet_config


def with_fast_path(on: bool, fn):
    def call():
        os.environ["MEDSEG_CPU_FAST_PATH"] = "1" if on else "0"
        return fn()

    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    patch = (args.patch,) * 3
    model = build_ours(1, 3, 3, unet_config(patch), 32, 320)
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.inference_mode():
            return model(x)

    fast, stock = with_fast_path(True, forward)(), with_fast_path(False, forward)()
    scale = stock.abs().max().item()
    agree = (fast.argmax(1) == stock.argmax(1)).float().mean().item()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one forward on {args.patch}^3, "
          f"max |fast - stock| / max |stock| {(fast - stock).abs().max().item() / scale:.1e}, "
          f"argmax equal on {agree * 100:.4f}% of voxels")
    times = interleaved({"channels-last": with_fast_path(True, forward), "stock": with_fast_path(False, forward)},
                        args.repeats, warmup=0)
    report(times, "stock")
    print(f"RATIO forward channels-last / stock = {median(times['channels-last']) / median(times['stock']):.3f}")

    from importlib import resources

    from napari_medseg._sample_data import colin27_deepgm
    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.engine.inference import predict
    from napari_medseg.engine.jobs import collect

    image, meta, _ = colin27_deepgm()[0]
    ckpt = load_checkpoint(str(resources.files("napari_medseg").joinpath("checkpoints", "colin27_deepgm_unet3d.pt")))

    def segment():
        return collect(predict(image, meta["scale"], ckpt, device="cpu", mirror=True))[1].labels

    labels = {on: with_fast_path(on, segment)() for on in (True, False)}
    print(f"predict on the sample {image.shape} with the shipped checkpoint and mirroring: "
          f"labels identical: {np.array_equal(labels[True], labels[False])}")
    times = interleaved({"channels-last": with_fast_path(True, segment), "stock": with_fast_path(False, segment)},
                        args.repeats, warmup=0)
    report(times, "stock")
    print(f"RATIO predict channels-last / stock = {median(times['channels-last']) / median(times['stock']):.3f}")
    os.environ.pop("MEDSEG_CPU_FAST_PATH", None)


if __name__ == "__main__":
    main()
