"""Fuzz the NIfTI reader: mutated ``.nii``/``.nii.gz`` bytes must give a volume, a clear
:class:`~napari_medseg.io.NiftiError`, or ``None`` from the napari hook; never a crash or a hang.

A seeded mutation loop over small valid files made here (float32, scaled int16, uint8 labels,
4D channels, 2D, NIfTI-2): bit flips, byte overwrites with boundary values, header-field
overwrites (dim, pixdim, vox_offset, datatype, bitpix, scl_slope/inter, qform/sform codes and
parameters, sizeof_hdr, magic), truncation, appended garbage, and for ``.nii.gz`` either mutating
the payload before gzip or corrupting the compressed stream. Each case goes through
``napari_get_reader(path)`` and, when that returns a reader, the reader function (which calls
``read_nifti`` and the label rule), under a per-case time limit (``SIGALRM``).

Usage::

    python fuzz/fuzz_nifti_reader.py --cases 10000 --seed 0

Prints the count of each outcome and every crash (exception type other than ``NiftiError``),
slow case or hang; exits 1 if there was any.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter

import nibabel as nib
import numpy as np

from napari_medseg._reader import napari_get_reader
from napari_medseg.io import NiftiError

# (offset, struct format, count) of NIfTI-1 header fields worth attacking
FIELDS = {
    "sizeof_hdr": (0, "<i", 1),
    "dim": (40, "<h", 8),
    "intent_code": (68, "<h", 1),
    "datatype": (70, "<h", 1),
    "bitpix": (72, "<h", 1),
    "pixdim": (76, "<f", 8),
    "vox_offset": (108, "<f", 1),
    "scl_slope": (112, "<f", 1),
    "scl_inter": (116, "<f", 1),
    "qform_code": (252, "<h", 1),
    "sform_code": (254, "<h", 1),
    "quatern": (256, "<f", 6),
    "srow": (280, "<f", 12),
    "magic": (344, "4s", 1),
}
INT_BOUNDARIES = [0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 255, 256, 32767, -32768, 2**31 - 1, -(2**31), 348, 352, 540]
FLOAT_BOUNDARIES = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 1e-30,
                    3.4e38, 352.0, 351.0, 1e9, 0.5]
DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 9999]
BYTE_BOUNDARIES = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE]


def seed_images() -> list[tuple[str, bytes]]:
    """Small valid files: (extension, uncompressed .nii bytes)."""
    rng = np.random.default_rng(0)
    aff = np.array([[0.8, 0.1, 0, -10], [0, 1.2, 0, 5], [0, 0, 2.5, 3], [0, 0, 0, 1]], np.float64)
    imgs = []
    imgs.append(nib.Nifti1Image(rng.normal(size=(6, 5, 4)).astype(np.float32), aff))
    scaled = nib.Nifti1Image(rng.integers(-100, 100, (7, 6, 3)).astype(np.int16), np.diag([1, 1, 3, 1.0]))
    scaled.header.set_slope_inter(0.5, 10.0)
    imgs.append(scaled)
    lab = nib.Nifti1Image(rng.integers(0, 3, (5, 5, 5)).astype(np.uint8), np.eye(4))
    lab.header["intent_code"] = 1002
    imgs.append(lab)
    imgs.append(nib.Nifti1Image(rng.normal(size=(4, 4, 3, 2)).astype(np.float32), aff))
    imgs.append(nib.Nifti1Image(rng.integers(0, 50, (9, 8)).astype(np.uint16), np.eye(4)))
    imgs.append(nib.Nifti2Image(rng.normal(size=(4, 3, 5)).astype(np.float64), aff))
    out = []
    for img in imgs:
        buf = io.BytesIO()
        img.header.set_data_dtype(img.get_data_dtype())
        fmap = img.make_file_map({"image": buf, "header": buf})
        img.to_file_map(fmap)
        out.append(buf.getvalue())
    return [(ext, blob) for blob in out for ext in (".nii", ".nii.gz")]


def _pack(fmt: str, value) -> bytes:
    try:
        return struct.pack(fmt, value)
    except (struct.error, OverflowError):
        return struct.pack(fmt, 0)


def mutate_raw(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One or more mutations of uncompressed NIfTI bytes; returns (bytes, description)."""
    data = bytearray(blob)
    kinds = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choice(["flip", "byte", "field", "field", "field", "truncate", "append", "header_zero"])
        kinds.append(kind)
        if not data:
            break
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            i = rng.randrange(min(len(data), 352) if rng.random() < 0.7 else len(data))
            data[i] = rng.choice(BYTE_BOUNDARIES)
        elif kind == "field" and len(data) >= 348:
            name = rng.choice(list(FIELDS))
            offset, fmt, count = FIELDS[name]
            kinds[-1] = f"field:{name}"
            k = rng.randrange(count)
            size = struct.calcsize(fmt)
            if name == "magic":
                value = rng.choice([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"xxxx"])
            elif name == "datatype":
                value = rng.choice(DATATYPES)
            elif fmt.endswith("f"):
                value = rng.choice(FLOAT_BOUNDARIES)
            else:
                value = rng.choice(INT_BOUNDARIES)
            data[offset + k * size: offset + (k + 1) * size] = _pack(fmt, value)
        elif kind == "truncate":
            del data[rng.randrange(len(data)):]
        elif kind == "append":
            data += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif kind == "header_zero":
            i = rng.randrange(min(len(data), 348))
            data[i: i + rng.randint(1, 16)] = bytes(len(data[i: i + 16]))[: rng.randint(1, 16)]
    return bytes(data), "+".join(kinds)


def make_case(seeds, rng: random.Random) -> tuple[str, bytes, str]:
    ext, blob = rng.choice(seeds)
    if rng.random() < 0.02:  # a valid file under a name the hook must decline
        return rng.choice([".nii.bak", ".dat", ".nii.gz~", ".NII.zip"]), blob, "other-name"
    mutated, what = mutate_raw(blob, rng)
    if ext == ".nii.gz":
        if rng.random() < 0.25:  # corrupt the compressed stream itself
            packed = bytearray(gzip.compress(blob, mtime=0))
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(packed))
                packed[i] = rng.getrandbits(8)
            if rng.random() < 0.3:
                del packed[rng.randrange(len(packed)):]
            return ext, bytes(packed), "gzip-stream"
        return ext, gzip.compress(mutated, mtime=0), "gz:" + what
    return ext, mutated, what


class _Timeout(BaseException):
    pass


def _alarm(_signum, _frame):
    raise _Timeout()


def run_case(path: str, limit_s: float) -> tuple[str, str]:
    """Return (outcome, detail); outcome in volume / NiftiError / None / crash / hang."""
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        reader = napari_get_reader(path)
        if reader is None:
            return "None", ""
        layers = reader(path)
        for data, meta, kind in layers:
            assert kind in ("image", "labels"), kind
            assert np.asarray(data).size > 0
            assert "medseg_geometry" in (meta["metadata"][0] if isinstance(meta["metadata"], list) else meta["metadata"])
        return "volume", ""
    except NiftiError as err:
        return "NiftiError", str(err)
    except _Timeout:
        return "hang", f"over {limit_s} s"
    except Exception as err:  # noqa: BLE001 - this is what the fuzzer looks for
        return "crash", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}"
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def fuzz(cases: int, seed: int = 0, limit_s: float = 5.0, folder: str | None = None,
         keep_failures: str | None = None) -> tuple[Counter, list[tuple[str, str, str]]]:
    """Run ``cases`` mutated files; return outcome counts and the failures (kind, description, detail)."""
    rng = random.Random(seed)
    seeds = seed_images()
    counts: Counter = Counter()
    failures = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for n in range(cases):
            ext, blob, what = make_case(seeds, rng)
            path = os.path.join(tmp, f"case{ext}")
            with open(path, "wb") as fh:
                fh.write(blob)
            t0 = time.perf_counter()
            outcome, detail = run_case(path, limit_s)
            if outcome == "volume" and time.perf_counter() - t0 > limit_s / 2:
                outcome, detail = "slow", f"{time.perf_counter() - t0:.2f} s"
            counts[outcome] += 1
            if outcome in ("crash", "hang", "slow"):
                failures.append((outcome, f"case {n} ({what})", detail))
                if keep_failures:
                    os.makedirs(keep_failures, exist_ok=True)
                    with open(os.path.join(keep_failures, f"case{n}{ext}"), "wb") as fh:
                        fh.write(blob)
    return counts, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=float, default=5.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--keep-failures", help="folder to copy crashing inputs to")
    args = parser.parse_args(argv)
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)  # its header fix-up chatter
    warnings.simplefilter("ignore", RuntimeWarning)  # overflow in float64 -> float32 casts
    t0 = time.perf_counter()
    counts, failures = fuzz(args.cases, args.seed, args.limit, keep_failures=args.keep_failures)
    took = time.perf_counter() - t0
    print(f"{args.cases} cases (seed {args.seed}) in {took:.1f} s")
    for outcome in ("volume", "NiftiError", "None", "crash", "hang", "slow"):
        print(f"  {outcome:<11} {counts.get(outcome, 0)}")
    kinds = Counter(d.split("\n")[0].split(":")[0] for _o, _w, d in failures)
    for (outcome, where, detail) in failures[:30]:
        print(f"{outcome}: {where}: {detail.splitlines()[0] if detail else ''}")
    if kinds:
        print("failure types:", dict(kinds))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
