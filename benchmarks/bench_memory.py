"""Peak memory of predicting a CT-sized volume (512 x 512 x 300 by default) with ``engine.predict``.

Run on demand (not a test)::

    .venv/bin/python benchmarks/bench_memory.py
    .venv/bin/python benchmarks/bench_memory.py --baseline-rev 2507391   # also measure an older tree

Each measurement runs in a fresh subprocess and reads its peak resident set size
(``resource.getrusage(...).ru_maxrss``). The checkpoint is a small nnU-Net (random weights, saved with
``engine.checkpoint.save_checkpoint``) whose plan spacing equals the volume's, so nothing is
resampled and the memory is the pipeline's own: preprocessing copies, the logit accumulator, the
softmax, the restore to source geometry and the argmax. The target: the process's peak, minus
the interpreter with torch and the model loaded, at most 4 x the float32 volume (the input volume
included), plus the model.

With ``--baseline-rev REV`` the package as committed at ``REV`` (``git archive``, read-only) is
measured in the same run, on the same volume and checkpoint, and the ratio printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def rss_now_mb() -> float:
    """Current resident set size (Linux ``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    """Measure one prediction in this (fresh) process and print one JSON line."""
    import numpy as np
    import torch
    from _timing import peak_rss_mb, timed

    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.engine.inference import predict

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    model_mb = sum(t.numel() * t.element_size() for t in ckpt.state_dict.values()) / 2**20 if hasattr(
        ckpt, "state_dict") else 0.0
    base_mb = rss_now_mb()  # interpreter + torch + the loaded checkpoint
    rng = np.random.default_rng(0)
    volume = rng.standard_normal(tuple(args.shape), dtype=np.float32)  # float32 directly: no float64 copy
    volume *= 300.0
    volume += 40.0
    vol_mb = volume.nbytes / 2**20
    before_mb = rss_now_mb()

    def run():
        gen = predict(volume, tuple(args.spacing), ckpt, device="cpu", mirror=False, step=args.step,
                      batch_size=1, return_probabilities=args.probabilities)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    seconds, result = timed(run)
    peak = peak_rss_mb()
    print(json.dumps({
        "base_mb": base_mb, "before_mb": before_mb, "peak_mb": peak, "volume_mb": vol_mb, "model_mb": model_mb,
        "seconds": seconds, "labels_sum": int(result.labels.sum(dtype=np.int64)),
        "labels_dtype": str(result.labels.dtype),
    }))


def make_checkpoint(path: str, args) -> None:
    import torch

    from napari_medseg.engine.checkpoints import save_checkpoint
    from napari_medseg.engine.planning import Plan
    from napari_medseg.models import create_model

    kw = {"pool_kernels": [[2, 2, 2]] * 3, "conv_kernels": [[3, 3, 3]] * 4, "base_width": args.width}
    torch.manual_seed(0)
    model = create_model("unet-3d-fullres", 1, args.classes, 3, **kw)
    plan = Plan(configuration="3d_fullres", spacing=tuple(args.spacing), patch_size=tuple(args.patch),
                batch_size=2, pool_kernels=kw["pool_kernels"], conv_kernels=kw["conv_kernels"],
                normalization=["ct"], num_channels=1, num_classes=args.classes, use_mask_for_norm=[False],
                intensity_stats=[{"mean": 40.0, "std": 300.0, "percentile_00_5": -1000.0,
                                  "percentile_99_5": 1000.0}])
    save_checkpoint(path, model, model_name="unet-3d-fullres", model_kwargs=kw, in_channels=1,
                    num_classes=args.classes, spatial_dims=3, plan=plan,
                    label_names={i: f"class_{i}" for i in range(args.classes)})


def measure(args, ckpt: str, package_root: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, HERE]))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--checkpoint", ckpt,
           "--threads", str(args.threads), "--step", str(args.step),
           "--shape", *map(str, args.shape), "--spacing", *map(str, args.spacing)]
    if args.probabilities:
        cmd.append("--probabilities")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=package_root)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def describe(name: str, r: dict) -> float:
    vol = r["volume_mb"]
    added = r["peak_mb"] - r["before_mb"]
    total = r["peak_mb"] - r["base_mb"]  # includes the input volume
    print(f"  {name:9s} peak RSS {r['peak_mb']:8.0f} MiB; interpreter+torch+model {r['base_mb']:6.0f} MiB; "
          f"predict added {added:7.0f} MiB = {added / vol:.2f} x volume; with the input volume "
          f"{total:7.0f} MiB = {total / vol:.2f} x volume (target <= 4.00); {r['seconds']:.0f} s")
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="z y x (default 300 512 512)")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.8, 0.8])
    p.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128])
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--width", type=int, default=4, help="base width of the small random-weight network")
    p.add_argument("--step", type=float, default=1.0, help="tile step (1.0: no overlap; memory does not depend on it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--probabilities", action="store_true", help="also return the probabilities")
    p.add_argument("--baseline-rev", default=None, help="also measure the package at this git revision")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="medseg_mem_") as tmp:
        ckpt = os.path.join(tmp, "small.pt")
        make_checkpoint(ckpt, args)
        print(f"volume {'x'.join(map(str, args.shape))} float32 = "
              f"{4 * args.shape[0] * args.shape[1] * args.shape[2] / 2**20:.0f} MiB, spacing {args.spacing} "
              f"(= the plan's: no resampling), {args.classes} classes, patch {'x'.join(map(str, args.patch))}, "
              f"step {args.step}, no mirroring, {'labels + probabilities' if args.probabilities else 'labels only'}, "
              f"{args.threads} threads; each in a fresh process")
        results = {"ours": measure(args, ckpt, ROOT)}
        if args.baseline_rev:
            old = os.path.join(tmp, "baseline")
            os.makedirs(old)
            archive = subprocess.run(["git", "-C", ROOT, "archive", args.baseline_rev, "napari_medseg"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
            results[f"@{args.baseline_rev}"] = measure(args, ckpt, old)
        totals = {name: describe(name, r) for name, r in results.items()}
        sums = {r["labels_sum"] for r in results.values()}
        print(f"  labels identical across trees: {len(sums) == 1} (sum of labels {sorted(sums)})")
        if args.baseline_rev:
            print(f"RATIO peak memory ours / @{args.baseline_rev} (incl. input volume) = "
                  f"{totals['ours'] / totals[f'@{args.baseline_rev}']:.3f}")


if __name__ == "__main__":
    main()
