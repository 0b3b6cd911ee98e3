"""2D slice-by-slice inference of a volume: ours vs nnU-Net v2's predictor vs MONAI, same weights.

Run on demand (not a test; needs the ``bench`` extra)::

    .venv/bin/python benchmarks/bench_inference_2d.py                      # 64 slices of 512x512
    .venv/bin/python benchmarks/bench_inference_2d.py --slices 8 --size 256 --repeats 3

The network is nnU-Net v2's 2d U-Net for the patch (widths 32, 64, ... capped at 512, 3x3 convs,
stride-2 pooling down to 4 pixels). A 2D patch on a 3D volume makes each contender predict slice by
slice along axis 0: ours with ``sliding_window`` (slices batched as tiles), nnU-Net's predictor with
its own 2D-on-3D slicer, MONAI's ``sliding_window_inference`` with a ``(1, p, p)`` window around the
2D network. Same weights (checked equal), step 0.5, Gaussian, tiles per call and mirroring for all
three; interleaved, medians, ratios ours / baseline (below 1 = faster).
"""

from __future__ import annotations

import argparse
import os

import torch
from _timing import interleaved, median, report
from bench_inference import (
    assert_same,
    build_ours,
    build_plain,
    nnunet_predictor,
    run_monai,
    run_nnunet,
    run_ours,
    unet_config,
    warm_up_and_compare,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=512, help="in-plane size (default 512)")
    p.add_argument("--patch", type=int, default=None, help="2D tile edge (default: the in-plane size)")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--max-width", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1, help="slices (tiles) per network call, all contenders")
    p.add_argument("--mirror", action="store_true", help="mirroring TTA over both in-plane axes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip", nargs="*", default=[], choices=["nnunet", "monai"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    patch = (args.patch or args.size,) * 2
    args.mirror_axes = (0, 1) if args.mirror else ()
    pools = unet_config(patch, max_pools=7)

    ours = build_ours(1, args.classes, 2, pools, args.base_width, args.max_width)
    plain = build_plain(ours)
    diff = assert_same(ours, plain, patch, 1)
    ours, plain = ours.to(device), plain.to(device)
    image = torch.randn(1, args.slices, args.size, args.size, generator=torch.Generator().manual_seed(2)).to(device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"volume {args.slices}x{args.size}x{args.size}, 2D patch {patch[0]}x{patch[1]} slice by slice, step 0.5, "
          f"Gaussian, {'mirroring' if args.mirror else 'no mirroring'}, {args.batch_size} slice(s) per call; "
          f"2d U-Net widths {ours.widths}, {args.classes} classes; ours vs PlainConvUNet max |diff| {diff:.1e}")

    contenders = {"ours": run_ours(ours, image, patch, args.classes, args, device)}
    if "nnunet" not in args.skip:
        contenders["nnunet"] = run_nnunet(nnunet_predictor(plain, patch, args.classes, args, device), image, device)
    if "monai" not in args.skip:
        contenders["monai"] = run_monai(plain, image, patch, args, device, slicewise=True)
    warm_up_and_compare(contenders)
    cpu: dict[str, list[float]] = {}
    times = interleaved(contenders, args.repeats, warmup=0,
                        on_repeat=lambda r, n, dt: print(f"  repeat {r + 1} {n:12s} {dt:8.2f} s", flush=True), cpu_times=cpu)
    baseline = "nnunet" if "nnunet" in times else "ours"
    print(f"results (median of {args.repeats}):")
    report(times, baseline)
    print("process CPU time (all threads; less sensitive to other processes' load):")
    report(cpu, baseline)
    for name in times:
        if name != "ours":
            print(f"RATIO 2D ours / {name} = {median(times['ours']) / median(times[name]):.3f}")


if __name__ == "__main__":
    main()
