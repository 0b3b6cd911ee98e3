"""Fine-tuning on a few painted slices against *fill between slices*, on a real CT (issue 14).

Run on demand (minutes to an hour; never in tests)::

    .venv/bin/python benchmarks/bench_finetune.py                       # K = 2, 5, 10; 1, 3, 5 min
    .venv/bin/python benchmarks/bench_finetune.py --k 5 --minutes 5 --starts scratch

Data: TotalSegmentator's example abdominal CT (``tests/reference_files/example_ct.nii.gz`` of the
``totalsegmentator==2.18.0`` source tarball, Apache-2.0; data CC-BY, TotalSegmentator dataset),
122x101x112 at 3 mm, with its reference labels (TotalSegmentator's own output). Fetched with
``pip download --no-deps --no-binary :all: totalsegmentator==2.18.0`` into ``_work/tsd`` when
missing (a package registry; no other network).

Protocol: a simulated user paints ``K`` evenly spaced axial slices inside the organs' extent with
the reference labels of liver, spleen and the two kidneys (everything else on those slices is
background; every other voxel is unpainted = the ignore label). Then, measured in the same run:

* **fill between slices**: ``napari_medseg.fill_between_slices`` of the painted slices (the
  baseline every user has without a model);
* **fine-tuning** for a time budget (``TrainConfig.minutes``, its defaults: Adam 1e-3, on the CPU a
  patch of at most 64^3 voxels) from scratch (a 2D U-Net, widths 16-128, batch 4) and from the
  shipped checkpoint (re-planned for the CT; ``--starts scratch3d``: from scratch with the 3D
  full-res U-Net and the planner's settings, the widget's architecture default), then segmenting the whole volume; each also with
  the largest component of each organ kept (every organ here is one piece).

Printed: Dice per organ on the *unpainted* slices, the mean, and the wall time; the fine-tunes'
ratio to fill's mean Dice (above 1: the model beats filling). The machine's cores and torch's
threads are printed with it; budgets are wall time on this machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "_work", "tsd")
ORGANS = {1: ("liver", 5), 2: ("spleen", 1), 3: ("kidney_left", 3), 4: ("kidney_right", 2)}  # ours: (name, TS value)
IGNORE = 5


def load_example_ct() -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """``(image (z, y, x) HU, labels (z, y, x) with ORGANS' values, spacing)`` (napari order)."""
    from napari_medseg.io import read_volume

    found = glob.glob(os.path.join(WORK, "totalsegmentator-*", "tests", "reference_files", "example_ct.nii.gz"))
    if not found:
        os.makedirs(WORK, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "totalsegmentator==2.18.0", "-d", WORK], check=True)
        with tarfile.open(glob.glob(os.path.join(WORK, "totalsegmentator-*.tar.gz"))[0]) as tar:
            members = [m for m in tar.getmembers() if "/tests/reference_files/example_" in m.name
                       and m.name.endswith(".nii.gz")]
            tar.extractall(WORK, members=members)
        found = glob.glob(os.path.join(WORK, "totalsegmentator-*", "tests", "reference_files", "example_ct.nii.gz"))
    ref_dir = os.path.dirname(found[0])
    image = read_volume(found[0])
    seg = read_volume(os.path.join(ref_dir, "example_seg_fast_force_split.nii.gz"))
    labels = np.zeros(seg.data.shape, np.int16)
    for ours, (_, ts) in ORGANS.items():
        labels[seg.data == ts] = ours
    return image.data.astype(np.float32), labels, tuple(image.spacing)


def painted_slices(labels: np.ndarray, k: int) -> list[int]:
    """``k`` evenly spaced axial slices (axis 0) strictly inside the organs' extent."""
    z = np.flatnonzero(labels.any(axis=(1, 2)))
    return [int(round(v)) for v in np.linspace(z[0], z[-1], k + 2)[1:-1]]


def paint(labels: np.ndarray, slices: list[int]) -> np.ndarray:
    out = np.full(labels.shape, IGNORE, np.int16)
    out[slices] = labels[slices]
    return out


def dice_unpainted(pred: np.ndarray, ref: np.ndarray, slices: list[int]) -> dict[str, float]:
    keep = np.ones(ref.shape[0], bool)
    keep[slices] = False
    out = {}
    for value, (name, _) in ORGANS.items():
        p, r = pred[keep] == value, ref[keep] == value
        denom = p.sum() + r.sum()
        out[name] = float(2 * (p & r).sum() / denom) if denom else float("nan")
    return out


def fine_tune(image, painted, spacing, start: str, minutes: float, device: str, out_dir: str) -> np.ndarray:
    import napari_medseg as medseg

    names = {0: "background", **{v: n for v, (n, _) in ORGANS.items()}}
    config = medseg.TrainConfig(
        output_dir=out_dir, minutes=minutes, epochs=10**6, iterations_per_epoch=10, val_batches=2,
        device=device, ignore_label=IGNORE, label_names=names, seed=0,
    )
    if start == "scratch":  # painted axial slices: a 2D U-Net sees only labelled voxels; small for a CPU
        config.model, config.configuration = "unet-2d", "2d"
        config.model_kwargs, config.batch_size = {"base_width": 16, "max_width": 128}, 4
    elif start == "scratch3d":  # what a plain "from scratch" gives: the 3D full-res U-Net, planner's settings
        config.model = "unet-3d-fullres"
    else:
        config.init_checkpoint = medseg.resolve_checkpoint(start)
    path = medseg.train(config, [(image, painted, spacing)])
    chosen = bool(medseg.load_checkpoint(path).extra.get("largest_component"))
    print(f"    ({start}: the run {'chose' if chosen else 'did not choose'} the largest-component step "
          "on its held-out slices)", flush=True)
    return medseg.predict(image, spacing, path, device=device, largest_component=False).labels


def main() -> int:
    from napari_medseg import fill_between_slices
    from napari_medseg.engine.inference import keep_largest_component

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--minutes", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--starts", nargs="+", default=["scratch", "colin27_deepgm_unet3d"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    image, ref, spacing = load_example_ct()
    print(f"CT {image.shape} at {spacing} mm; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    names = [n for n, _ in ORGANS.values()]
    print(f"{'K':>3s} {'method':34s} " + " ".join(f"{n[:12]:>12s}" for n in names) + "    mean  vs fill   time")
    for k in args.k:
        slices = painted_slices(ref, k)
        painted = paint(ref, slices)
        t0 = time.perf_counter()
        filled = fill_between_slices(np.where(painted == IGNORE, 0, painted), axis=0, slices=slices)
        rows = [("fill between slices", dice_unpainted(filled, ref, slices), time.perf_counter() - t0)]
        for start in args.starts:
            for minutes in args.minutes:
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    pred = fine_tune(image, painted, spacing, start, minutes, args.device, os.path.join(tmp, "run"))
                    seconds = time.perf_counter() - t0
                    rows.append((f"{start[:20]} {minutes:g} min", dice_unpainted(pred, ref, slices), seconds))
                    # every organ is one piece: what the Segment widget's "Keep the largest component" gives
                    rows.append(("  + largest component", dice_unpainted(keep_largest_component(pred), ref, slices),
                                 seconds))
        fill_mean = np.nanmean(list(rows[0][1].values()))
        for method, dice, seconds in rows:
            mean = np.nanmean(list(dice.values()))
            print(f"{k:3d} {method:34s} " + " ".join(f"{dice[n]:12.3f}" for n in names)
                  + f"  {mean:6.3f}  {mean / fill_mean:6.2f}  {seconds:5.0f} s", flush=True)
        print(f"    painted slices: {slices}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
