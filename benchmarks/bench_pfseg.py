"""Benchmark: PFSeg's patch-free inference against the 3D U-Net's sliding window, and its memory.

Run on demand (not a test)::

    python benchmarks/bench_pfseg.py [--sizes 64x96x96 128x192x192] [--repeats 3] [--threads N]
    python benchmarks/bench_pfseg.py --memory [--sizes 64x96x96 96x128x128 128x192x192]

1. Time (default): for each HR volume size, PFSeg at the paper's configuration (width 32, one
   channel, two classes) segments the whole volume downsampled 2x in one forward
   (``engine.patchfree.forward_whole_volume``), and ``unet-3d-fullres`` at the configuration the
   planner makes for that volume (1 mm isotropic, ``plan_experiment``) runs the sliding window
   (``engine.inference.sliding_window``, step 0.5, Gaussian weighting). No mirroring for either.
   Runs are interleaved (pfseg, unet, pfseg, unet, ...) after one warm-up of each; the medians and
   the ratio U-Net time / PFSeg time are printed (the paper claims about 4x).
2. ``--memory``: the peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of one
   eval forward of the paper's PFSeg configuration, each size in a fresh subprocess; fits
   ``bytes = base + per_voxel * hr_voxels`` and prints the largest volume that fits in 24 GB.
   These are the figures behind ``engine.patchfree.MEMORY_BASE_BYTES`` / ``MEMORY_PER_HR_VOXEL``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import numpy as np
import torch


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"sizes look like 64x96x96, got {text!r}")
    return parts


def _drive(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def _child_memory(shape: tuple[int, ...]) -> None:
    import resource

    from napari_medseg.models import create_model

    model = create_model("pfseg", 1, 2).eval()
    hr = torch.randn(1, 1, *shape)
    from napari_medseg.engine.inference.variants.patchfree import downsample, guidance_crop

    lr, guide = downsample(hr), guidance_crop(hr)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = torch.softmax(model(lr, guide), dim=1)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"shape": list(shape), "before": before, "peak": peak, "seconds": seconds,
                      "out": list(out.shape)}))


def memory(sizes, threads: int) -> None:
    rows = []
    for shape in sizes:
        cmd = [sys.executable, __file__, "--child-memory", "x".join(map(str, shape)), "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        vox = math.prod(shape)
        print(f"HR {'x'.join(map(str, shape)):>12} ({vox / 1e6:6.2f} M voxels): peak RSS "
              f"{row['peak'] / 2**30:6.2f} GiB (before forward {row['before'] / 2**30:.2f} GiB), "
              f"forward {row['seconds']:.1f} s")
    x = np.array([math.prod(r["shape"]) for r in rows], float)
    y = np.array([r["peak"] for r in rows], float)
    per_voxel, base = np.polyfit(x, y, 1)
    resid = y - (base + per_voxel * x)
    print(f"fit: peak = {base / 1e9:.3f} GB + {per_voxel:.1f} B/voxel * HR voxels "
          f"(max residual {np.abs(resid).max() / 2**20:.0f} MiB)")
    budget = 24 * 2**30
    n_max = (budget - base) / per_voxel
    side = int(n_max ** (1 / 3))
    k = (n_max / 18) ** (1 / 3)  # BraTS proportions 2:3:3
    print(f"largest HR volume in 24 GiB: {n_max / 1e6:.1f} M voxels, e.g. a {side}^3 cube or "
          f"{int(2 * k)}x{int(3 * k)}x{int(3 * k)} (LR input half of each axis)")


def timing(sizes, repeats: int) -> None:
    from napari_medseg.engine.inference import count_tiles, sliding_window
    from napari_medseg.engine.inference.variants.patchfree import forward_whole_volume
    from napari_medseg.engine.planning import plan_experiment
    from napari_medseg.models import count_parameters, create_model

    torch.manual_seed(0)
    pf = create_model("pfseg", 1, 2).eval()
    print(f"pfseg: {count_parameters(pf) / 1e6:.2f} M parameters; threads {torch.get_num_threads()}")
    for shape in sizes:
        plan = plan_experiment([(1.0, 1.0, 1.0)], [shape], num_channels=1, num_classes=2)["3d_fullres"]
        unet = create_model(
            "unet-3d-fullres", 1, 2, pool_kernels=plan.pool_kernels, conv_kernels=plan.conv_kernels
        ).eval()
        image = torch.randn(1, *shape)
        tiles = count_tiles(shape, plan.patch_size, 0.5, ())

        def run_pf(image=image):
            return _drive(forward_whole_volume(pf, image, ()))

        def run_unet(image=image, unet=unet, patch=tuple(plan.patch_size)):
            with torch.inference_mode():
                return _drive(sliding_window(unet, image, patch, 2, step=0.5, mirror_axes=()))

        assert tuple(run_pf().shape) == (2, *shape)  # warm-up, and both give (K, *shape)
        assert tuple(run_unet().shape) == (2, *shape)
        t_pf, t_unet = [], []
        for _ in range(repeats):
            for fn, acc in ((run_pf, t_pf), (run_unet, t_unet)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        m_pf, m_unet = statistics.median(t_pf), statistics.median(t_unet)
        print(f"{'x'.join(map(str, shape))}: pfseg (LR {'x'.join(str(s // 2) for s in shape)}, one forward) "
              f"{m_pf:.2f} s | unet-3d-fullres (patch {'x'.join(map(str, plan.patch_size))}, {tiles} tiles, "
              f"{count_parameters(unet) / 1e6:.1f} M params) {m_unet:.2f} s | ratio unet/pfseg "
              f"{m_unet / m_pf:.2f}x  (median of {repeats}, interleaved)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=_shape, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory", action="store_true", help="measure peak RSS and fit the memory model")
    ap.add_argument("--child-memory", type=_shape, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        _child_memory(args.child_memory)
    elif args.memory:
        memory(args.sizes or [(64, 96, 96), (96, 128, 128), (128, 192, 192)], torch.get_num_threads())
    else:
        timing(args.sizes or [(64, 96, 96), (128, 192, 192)], args.repeats)


if __name__ == "__main__":
    main()
