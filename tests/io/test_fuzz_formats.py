"""Corrupt NRRD, MetaImage, DICOM and DICOM-SEG files give a VolumeError: never another exception, never a
crash. The reads run in a child process, because a malformed MetaImage header once crashed ITK (SIGSEGV)."""

from __future__ import annotations

import os
import subprocess
import sys

import nrrd
import numpy as np
import SimpleITK as sitk

from napari_medseg.io import read_volume, write_volume
from napari_medseg.io._dicom_synth import write_dicom_series

CHILD = """
import sys
from napari_medseg.io import read_volume, VolumeError
bad = []
for path in sys.argv[1:]:
    try:
        read_volume(path)
    except VolumeError:
        pass
    except Exception as exc:
        bad.append(f"{path}: {type(exc).__name__}: {exc}")
print("\\n".join(bad) or "clean")
"""


def _mutations(blob: bytes, rng, count: int) -> list[bytes]:
    out = []
    for case in range(count):
        b = bytearray(blob)
        if case % 3 == 0:
            b = b[: int(rng.integers(1, len(b)))]
        else:
            limit = min(len(b), 600) if case % 3 == 1 else len(b)  # the header, or anywhere
            for _ in range(int(rng.integers(1, 8))):
                b[int(rng.integers(0, limit))] = int(rng.integers(0, 256))
        out.append(bytes(b))
    return out


def _sources(tmp_path) -> dict[str, bytes]:
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    nrrd.write(str(tmp_path / "a.nrrd"), data, {"space": "LPS", "space directions": np.eye(3), "encoding": "gzip"})
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "b.mha"), True)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "c.mha"), False)
    files = write_dicom_series(tmp_path / "dcm", (data * 100).astype(np.int16), np.eye(4))
    seg = write_volume(tmp_path / "seg.dcm", (data > 0).astype(np.uint8), read_volume(tmp_path / "dcm"), is_label=True)
    return {name: open(path, "rb").read() for name, path in
            (("a.nrrd", tmp_path / "a.nrrd"), ("b.mha", tmp_path / "b.mha"), ("c.mha", tmp_path / "c.mha"),
             ("slice.dcm", files[2]), ("seg.dcm", seg))}


def test_corrupt_files_never_escape_or_crash(tmp_path):
    rng = np.random.default_rng(20)
    paths = []
    for name, blob in _sources(tmp_path).items():
        for n, mutated in enumerate(_mutations(blob, rng, 40)):
            path = tmp_path / "fuzz" / f"{n}_{name}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(mutated)
            paths.append(str(path))
    # a MetaImage file that makes ITK itself segfault (SimpleITK.ReadImage, ITK 5.4): two header bytes
    # turned a newline into "9" (merging CompressedData and TransformMatrix) and "}"
    data = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "d.mha"), False)
    crash = bytearray(open(tmp_path / "d.mha", "rb").read())
    for index, value in ((100, 57), (210, 229), (291, 125)):
        crash[index] = value
    (tmp_path / "fuzz" / "itk_crash.mha").write_bytes(bytes(crash))
    paths.append(str(tmp_path / "fuzz" / "itk_crash.mha"))
    env = dict(os.environ, MALLOC_CHECK_="3", GLIBC_TUNABLES="glibc.malloc.check=3")  # heap corruption aborts
    res = subprocess.run([sys.executable, "-c", CHILD, *paths], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "clean", res.stdout
