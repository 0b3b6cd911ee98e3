"""Make the shipped Colin27 deep-grey-matter sample from Debian's ``mricron-data`` package.

Needs ``apt-get install mricron-data`` (files in ``/usr/share/mricron/templates``). Writes into
``napari_medseg/data/``:

- ``colin27_t1_deepgm.nii.gz``: the Colin27 T1 (``ch2.nii.gz``, 1 mm, uint8) cropped to a box
  around the deep grey matter of both hemispheres (8 mm margin);
- ``colin27_deepgm_labels.nii.gz``: the AAL atlas on the same crop, remapped to 6 classes
  (left and right merged): 1 hippocampus, 2 amygdala, 3 caudate, 4 putamen, 5 pallidum,
  6 thalamus; every other AAL region becomes background;
- ``labels.json`` (class names and the AAL indices behind them) and ``ATTRIBUTION.md``.

Why ``ch2.nii.gz`` and not ``ch2better.nii.gz``: ``ch2better`` looks cleaner (0.5 mm, skull
stripped, more contrast) but it is not on the AAL grid: resampled to 1 mm, its best correlation
with ``ch2`` needs a shift of about 0.5 mm in x and y, so the hand-drawn AAL outlines would sit
half a voxel off. ``ch2`` is the scan the AAL was drawn on, on exactly the same 1 mm grid, so no
resampling at all is needed. The script still checks the grids and, if a future package changed
them, resamples the labels onto the T1 grid by nearest neighbour (and says so).

Usage: ``python scripts/make_sample_data.py [--templates DIR] [--out DIR] [--margin MM]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re

import nibabel as nib
import numpy as np

from napari_medseg.io import write_nifti

log = logging.getLogger("make_sample_data")

CLASSES = {1: "hippocampus", 2: "amygdala", 3: "caudate", 4: "putamen", 5: "pallidum", 6: "thalamus"}
# AAL names per class, as written in aal.nii.txt ("<index> <Name>_<L|R> <code>").
AAL_NAMES = {1: "Hippocampus", 2: "Amygdala", 3: "Caudate", 4: "Putamen", 5: "Pallidum", 6: "Thalamus"}
EXPECTED_INDICES = {1: [37, 38], 2: [41, 42], 3: [71, 72], 4: [73, 74], 5: [75, 76], 6: [77, 78]}
# Rough MNI centroids (mm, left hemisphere; right = mirrored x) to check the mapping on the data.
MNI_CENTROIDS_L = {
    1: (-26, -21, -10), 2: (-23, -1, -17), 3: (-13, 11, 9),
    4: (-25, 3, 1), 5: (-19, -1, 0), 6: (-12, -18, 8),
}
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, os.pardir, "napari_medseg", "data"))


def aal_indices(txt_path: str) -> dict[int, list[int]]:
    """Parse ``aal.nii.txt`` and return ``{class: [left_index, right_index]}``."""
    table: dict[str, int] = {}
    with open(txt_path) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                table[parts[1]] = int(parts[0])
    out = {}
    for cls, name in AAL_NAMES.items():
        left, right = table.get(f"{name}_L"), table.get(f"{name}_R")
        if left is None or right is None:
            raise SystemExit(f"{txt_path}: no {name}_L/{name}_R entries")
        out[cls] = [left, right]
    if out != EXPECTED_INDICES:
        log.warning("AAL indices differ from the documented ones: %s", out)
    return out


def check_mapping(aal: np.ndarray, affine: np.ndarray, mapping: dict[int, list[int]]) -> None:
    """Check each mapped AAL region lies near its known MNI centroid and on the right side."""
    for cls, (left, right) in mapping.items():
        for idx, sign in ((left, 1), (right, -1)):
            vox = np.argwhere(aal == idx)
            if vox.size == 0:
                raise SystemExit(f"AAL index {idx} ({AAL_NAMES[cls]}) is empty")
            world = affine[:3, :3] @ vox.mean(0) + affine[:3, 3]
            expect = np.array(MNI_CENTROIDS_L[cls], float) * np.array([sign, 1, 1])
            dist = float(np.linalg.norm(world - expect))
            side = "L" if world[0] < 0 else "R"
            log.info("%-12s AAL %3d: centroid %s mm (%s), %.1f mm from the expected", AAL_NAMES[cls], idx,
                     np.round(world, 1).tolist(), side, dist)
            if dist > 10 or (side == "L") != (sign == 1):
                raise SystemExit(f"AAL index {idx} does not look like {AAL_NAMES[cls]} ({side}, {dist:.1f} mm off)")


def labels_on_t1_grid(aal_img: nib.Nifti1Image, t1_img: nib.Nifti1Image) -> np.ndarray:
    """AAL indices on the T1 grid (as is when the grids match, else nearest-neighbour resampled)."""
    if aal_img.shape == t1_img.shape and np.allclose(aal_img.affine, t1_img.affine, atol=1e-4):
        log.info("AAL and T1 share the grid %s; no resampling", t1_img.shape)
        return np.asarray(aal_img.dataobj).astype(np.int32)
    from nibabel.processing import resample_from_to

    log.warning("AAL grid %s differs from the T1 grid %s: resampling labels (nearest neighbour)",
                aal_img.shape, t1_img.shape)
    return np.asarray(resample_from_to(aal_img, t1_img, order=0).dataobj).astype(np.int32)


def attribution(templates: str, box: list[list[int]], shape: tuple[int, ...]) -> str:
    copyright_path = "/usr/share/doc/mricron-data/copyright"
    licence = ""
    if os.path.exists(copyright_path):
        text = open(copyright_path).read()
        blocks = re.findall(r"^License: BSD-3-clause\n((?:  .*\n?)+)", text, re.M)
        full = [b for b in blocks if "Redistribution" in b]
        lines = full[-1].splitlines() if full else []
        licence = "\n".join("" if line.strip() == "." else line[2:] for line in lines)
    return f"""# Sample data attribution

`colin27_t1_deepgm.nii.gz` and `colin27_deepgm_labels.nii.gz` are crops of two files from the
MRIcron templates as packaged by Debian (`mricron-data`, files in `{templates}`):

- `ch2.nii.gz`: "Colin27", a single-subject T1-weighted MRI (27 averaged scans) in MNI space, 1 mm.
  C.J. Holmes et al., "Enhancement of MR images using registration for signal averaging",
  J Comput Assist Tomogr 22(2):324-333, 1998.
- `aal.nii.gz` + `aal.nii.txt`: the Automated Anatomical Labeling atlas, drawn on Colin27.
  N. Tzourio-Mazoyer et al., "Automated anatomical labeling of activations in SPM using a
  macroscopic anatomical parcellation of the MNI MRI single-subject brain", NeuroImage
  15(1):273-289, 2002.

Processing (`scripts/make_sample_data.py`): both files share the same 1 mm grid; crop to voxels
`[i, j, k]` = `{box}` (shape {shape}, NIfTI order), i.e. a box around hippocampus, amygdala,
caudate, putamen, pallidum and thalamus of both hemispheres with an 8 mm margin; the affine's
origin is moved by the crop offset. AAL regions are remapped (left and right merged):
1 hippocampus (AAL 37, 38), 2 amygdala (41, 42), 3 caudate (71, 72), 4 putamen (73, 74),
5 pallidum (75, 76), 6 thalamus (77, 78); all other regions become 0.

Debian's copyright file for MRIcron (`/usr/share/doc/mricron-data/copyright`) states
"Copyright 2006-2010, Chris Rorden" under the BSD-3-clause licence for its files, reproduced
below. The AAL atlas and Colin27 scan come from their authors (citations above); please cite
them when you use this data.

## BSD-3-clause licence (from the Debian copyright file)

{licence}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--templates", default="/usr/share/mricron/templates")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--margin", type=int, default=8, help="margin around the structures, mm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    nib.openers.Opener.default_compresslevel = 9  # smaller shipped files

    t1_img = nib.load(os.path.join(args.templates, "ch2.nii.gz"))
    aal_img = nib.load(os.path.join(args.templates, "aal.nii.gz"))
    mapping = aal_indices(os.path.join(args.templates, "aal.nii.txt"))
    aal = labels_on_t1_grid(aal_img, t1_img)
    check_mapping(aal, t1_img.affine, mapping)

    remap = np.zeros(int(aal.max()) + 1, np.uint8)
    for cls, indices in mapping.items():
        remap[indices] = cls
    labels = remap[aal]
    fg = np.argwhere(labels > 0)
    margin = int(round(args.margin / min(t1_img.header.get_zooms()[:3])))
    lo = np.maximum(fg.min(0) - margin, 0)
    hi = np.minimum(fg.max(0) + 1 + margin, labels.shape)
    box = [[int(a), int(b)] for a, b in zip(lo, hi)]
    crop = tuple(slice(a, b) for a, b in box)
    affine = t1_img.affine.copy()
    affine[:3, 3] = t1_img.affine[:3, :3] @ lo + t1_img.affine[:3, 3]
    t1 = np.asarray(t1_img.dataobj)[crop]
    lab = labels[crop]
    log.info("crop box %s -> shape %s, origin %s", box, t1.shape, affine[:3, 3].tolist())
    for cls, name in CLASSES.items():
        log.info("class %d %-12s %6d voxels", cls, name, int((lab == cls).sum()))

    os.makedirs(args.out, exist_ok=True)
    code = int(t1_img.header["sform_code"]) or 1  # 4 = MNI152
    geom = {"affine": affine.tolist(), "spacing": [1.0, 1.0, 1.0], "qform_code": code,
            "sform_code": code, "xyzt_units": 2}
    # write_nifti takes napari order (k, j, i): transpose the NIfTI-order crops.
    t1_path = write_nifti(os.path.join(args.out, "colin27_t1_deepgm.nii.gz"), t1.T, geom)
    lab_path = write_nifti(os.path.join(args.out, "colin27_deepgm_labels.nii.gz"), lab.T, geom, is_label=True)
    meta = {
        "labels": {"0": "background", **{str(k): v for k, v in CLASSES.items()}},
        "aal_indices": {str(k): v for k, v in mapping.items()},
        "source": "MRIcron templates ch2.nii.gz + aal.nii.gz (Debian mricron-data); see ATTRIBUTION.md",
        "crop_box_ijk": box,
    }
    with open(os.path.join(args.out, "labels.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(args.out, "ATTRIBUTION.md"), "w") as fh:
        fh.write(attribution(args.templates, box, t1.shape))
    for p in (t1_path, lab_path):
        log.info("%s: %.0f kB", p, os.path.getsize(p) / 1024)


if __name__ == "__main__":
    main()
