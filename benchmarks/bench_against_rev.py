"""Run one benchmark script on the working tree and on the package as committed at REV, alternating,
and print its RATIO lines side by side plus the ratio of the two trees' ratios.

A refactor shows "no slowdown beyond noise" when each tree's ratio against the same in-run baseline
(nnU-Net's predictor or trainer, measured in the same process) agrees::

    python benchmarks/bench_against_rev.py --rev bb5d4b0 --rounds 2 -- \
        benchmarks/bench_inference.py --size 80 --patch 48 --repeats 2 --threads 2 --skip monai
    python benchmarks/bench_against_rev.py --rev bb5d4b0 --rounds 2 -- \
        benchmarks/bench_train_step.py --patch 64 --batch 2 --repeats 2 --threads 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = re.compile(r"^RATIO (.+?) = ([0-9.]+)$", re.M)


def package_at(rev: str, into: str) -> str:
    """Extract ``napari_medseg`` and ``benchmarks`` as committed at ``rev`` into ``into`` (the old
    benchmark runs against the old package); return that folder."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "napari_medseg", "benchmarks"], check=True,
                             capture_output=True).stdout
    path = os.path.join(into, "archive.tar")
    with open(path, "wb") as fh:
        fh.write(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
    return into


def run(script: list[str], root: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, *script], env=env, cwd=root, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout + out.stderr)
    return {k: float(v) for k, v in RATIO.findall(out.stdout)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="the git revision to compare with")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per tree")
    p.add_argument("script", nargs=argparse.REMAINDER, help="-- then the benchmark and its arguments")
    args = p.parse_args()
    script = [a for a in args.script if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        old = package_at(args.rev, tmp)
        results: dict[str, dict[str, list[float]]] = {"tree": {}, f"@{args.rev}": {}}
        for r in range(args.rounds):
            for name, path in ((f"@{args.rev}", old), ("tree", ROOT)):
                for k, v in run(script, path).items():
                    results[name].setdefault(k, []).append(v)
                    print(f"round {r + 1} {name:10s} RATIO {k} = {v:.3f}", flush=True)
    for k, values in results["tree"].items():
        base = statistics.median(results[f"@{args.rev}"][k])
        mine = statistics.median(values)
        print(f"{k}: tree {mine:.3f} vs @{args.rev} {base:.3f}")
        print(f"RATIO ({k}) tree / @{args.rev} = {mine / base:.3f}")


if __name__ == "__main__":
    main()
