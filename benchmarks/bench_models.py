"""CPU forward time and parameter count of every registered model at its default configuration.

Run on demand (not a test)::

    .venv/bin/python benchmarks/bench_models.py [--threads 2] [--repeats 3] [--markdown]

Each model is timed on one typical input (its family's usual patch), batch 1, eval mode, no grad.
The baseline measured in the same run is one 3x3x3 conv (32 -> 32 channels) on a 64^3 volume, so the
ratio column stays comparable between machines: "x baseline" = model time / baseline time.
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_time

from napari_medseg.models import count_parameters, create_model, get_model_spec, list_models

# A typical patch per model: nnU-Net plans for the U-Nets and RKSeg (MSD Hippocampus 3D 40x56x40,
# 2D 56x40 padded to the default 5-pool divisor), the paper's inputs for SDN (128x128 CT).
TYPICAL = {
    2: (64, 64),
    3: (64, 64, 64),
}
# PFSeg takes the 2x-downsampled whole volume: 32x48x48 is a 64x96x96 scan (output at 2x).
OVERRIDE = {"sdn-unet": (128, 128), "sdn-unetpp": (128, 128), "pfseg": (32, 48, 48)}


def _time(fn, repeats: int) -> float:
    return median_time(fn, repeats)  # one warm-up call, then the median of ``repeats``


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true", help="print a README table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    conv = torch.nn.Conv3d(32, 32, 3, padding=1).eval()
    x = torch.randn(1, 32, 64, 64, 64)
    with torch.inference_mode():
        base = _time(lambda: conv(x), args.repeats)
    print(f"torch {torch.__version__}, {args.threads} thread(s); baseline conv3d 32->32 on 64^3: {base * 1e3:.1f} ms")
    rows = []
    for name in list_models():
        spec = get_model_spec(name)
        dims = spec.spatial_dims[-1] if name.startswith("rkseg") else spec.spatial_dims[0]
        shape = OVERRIDE.get(name, TYPICAL[dims])
        model = create_model(name, 1, 2, dims).eval()
        inp = torch.randn(1, spec.network_in_channels(1, 2), *shape)
        with torch.inference_mode():
            t = _time(lambda m=model, i=inp: m(i), args.repeats)
        rows.append((name, spec.family, f"{dims}D", count_parameters(model), "x".join(map(str, shape)), t))
    if args.markdown:
        print("| model | family | dims | parameters | input | CPU forward | x baseline |")
        print("|---|---|---|---|---|---|---|")
    for name, fam, dims, params, shape, t in rows:
        if args.markdown:
            print(f"| `{name}` | {fam} | {dims} | {params / 1e6:.2f} M | {shape} | {t * 1e3:.0f} ms | {t / base:.1f} |")
        else:
            print(f"{name:16s} {fam:10s} {dims}  {params / 1e6:7.2f} M params  input {shape:10s} "
                  f"{t * 1e3:8.1f} ms   ratio to baseline {t / base:6.1f}")


if __name__ == "__main__":
    main()
