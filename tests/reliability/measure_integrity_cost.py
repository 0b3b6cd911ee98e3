"""Cost of the integrity checks (issue 15, class 7): the gzip CRC of a 30 MB ``.nii.gz`` and the zip
CRCs of a 34 MB checkpoint. Run: ``python tests/reliability/measure_integrity_cost.py`` (not a test)."""

from __future__ import annotations

import gzip
import os
import tempfile
import time
import zipfile

import nibabel as nib
import numpy as np
import torch

from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint
from napari_medseg.io import read_nifti


def best(func, n: int = 5) -> tuple[float, float]:
    """``(minimum, median)`` seconds of ``n`` calls."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def main() -> None:
    folder = tempfile.mkdtemp()
    data = (np.random.default_rng(0).normal(size=(512, 512, 76)) * 200).astype(np.int16)
    scan = os.path.join(folder, "ct.nii.gz")
    nib.save(nib.Nifti1Image(data, np.eye(4)), scan)
    print(f"nii.gz: {os.path.getsize(scan) / 1e6:.1f} MB compressed, {data.nbytes / 1e6:.1f} MB of voxels")

    def nibabel_and_second_pass():
        np.asanyarray(nib.load(scan, mmap=False).dataobj)
        with gzip.open(scan) as stream:
            while stream.read(1 << 20):
                pass

    for what, func in (("read_nifti (one gzip stream, CRC checked)", lambda: read_nifti(scan)),
                       ("nibabel alone (no CRC)", lambda: np.asanyarray(nib.load(scan, mmap=False).dataobj)),
                       ("nibabel + a second full pass for the CRC", nibabel_and_second_pass)):
        low, mid = best(func)
        print(f"{what:45s} min {low:.3f}s median {mid:.3f}s")

    weights = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}
    ckpt = os.path.join(folder, "m.pt")
    save_checkpoint(ckpt, weights, model_name="x", model_kwargs={}, in_channels=1, num_classes=2, spatial_dims=3,
                    plan={}, label_names={})
    print(f"checkpoint: {os.path.getsize(ckpt) / 1e6:.1f} MB")

    def crcs():
        with zipfile.ZipFile(ckpt) as zf:
            zf.testzip()

    for what, func in (("zip CRC check (testzip)", crcs),
                       ("load_checkpoint (CRCs + torch.load + checks)", lambda: load_checkpoint(ckpt)),
                       ("torch.load alone", lambda: torch.load(ckpt, weights_only=True))):
        low, mid = best(func)
        print(f"{what:45s} min {low:.3f}s median {mid:.3f}s")


if __name__ == "__main__":
    main()
