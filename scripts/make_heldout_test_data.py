"""Held-out test data for the shipped brain model: the ICBM152 2009a brain at 2 mm with AAL carried over.

The shipped model was trained on one subject (Colin27). Its test (``tests/engine/test_heldout_brain.py``)
segments another "subject" in the same MNI space, the MNI ICBM152 2009a symmetric T1 average
(nilearn's copy), and scores it against the AAL deep grey structures carried over by world position
(approximate: AAL was drawn on Colin27). To keep the repository small both are stored at 2 mm (the
model predicts at 2 mm anyway): the T1 averaged over 2x2x2 blocks (uint8 after scaling), the labels
by nearest world position. About 0.3 MB together.

    .venv/bin/python scripts/make_heldout_test_data.py    # writes tests/data/icbm152_2mm_*.nii.gz
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import default_model_data as data  # noqa: E402
import heldout_templates  # noqa: E402

OUT = os.path.join(ROOT, "tests", "data")
T1_NAME = "icbm152_2mm_t1.nii.gz"
LABELS_NAME = "icbm152_2mm_deepgm_aal.nii.gz"


def block_mean(volume: np.ndarray, factor: int = 2) -> np.ndarray:
    """Mean over ``factor``-cubed blocks (the volume cropped to a multiple of ``factor``)."""
    shape = [s // factor * factor for s in volume.shape]
    v = volume[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    return v.reshape(shape[0] // factor, factor, shape[1] // factor, factor, shape[2] // factor, factor).mean((1, 3, 5))


def main() -> int:
    import nibabel as nib  # noqa: PLC0415

    mni = nib.load(data.find_mni_template())
    t1 = block_mean(np.asarray(mni.dataobj))
    affine = mni.affine.copy()
    affine[:3, :3] = mni.affine[:3, :3] * 2
    affine[:3, 3] = mni.affine[:3, 3] + mni.affine[:3, :3] @ np.full(3, 0.5)  # centre of the first block
    t1 = np.clip(np.rint(t1 * (255.0 / t1.max())), 0, 255).astype(np.uint8)
    aal_img = nib.load(os.path.join(data.find_templates(), "aal.nii.gz"))
    aal = data.aal_targets(np.asarray(aal_img.dataobj))
    labels = heldout_templates.carry_labels(aal, aal_img.affine, t1.shape, affine).astype(np.uint8)
    os.makedirs(OUT, exist_ok=True)
    for name, arr in ((T1_NAME, t1), (LABELS_NAME, labels)):
        img = nib.Nifti1Image(arr, affine)
        img.set_qform(affine, code=4)  # MNI
        img.set_sform(affine, code=4)
        nib.save(img, os.path.join(OUT, name))
        print(f"{name}: {arr.shape}, {os.path.getsize(os.path.join(OUT, name)) / 1e3:.0f} kB")
    print("voxels per class:", np.bincount(labels.ravel(), minlength=7)[1:].tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
