"""How approximate is the held-out reference? AAL on ICBM152 by MNI coordinates vs by registration.

``scripts/heldout_templates.py`` scores the default model on the ICBM152 2009a brain against AAL
carried over by the shared MNI space: AAL was drawn on Colin27, and the two brains do not line up
exactly in that space. This script carries AAL a second way, by an affine registration of the
Colin27 brain (``ch2bet``) onto the ICBM152 brain (SimpleITK, Mattes mutual information, three
levels), and prints per structure:

* the agreement (Dice) of the two references with each other: an upper bound, roughly, on what a
  model that follows the ICBM152 anatomy can score against the MNI-coordinate reference;
* the model's Dice against each reference (default options, the path the CLI takes).

Neither reference is the truth (an affine registration leaves local differences); the gap between
the two rows says how much of the held-out shortfall is the reference's.

Usage::

    .venv/bin/python scripts/heldout_reference_check.py [-c CHECKPOINT] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import default_model_data as data  # noqa: E402
import heldout_templates as heldout  # noqa: E402


def registered_reference(fixed_path: str, seed: int = 1) -> np.ndarray:
    """AAL's six targets on the grid of the brain image ``fixed_path`` (file order), carried by an affine registration
    (one thread and a fixed sampling seed, so that the figures repeat; SimpleITK reads seed 0 as
    "the clock")."""
    import SimpleITK as sitk  # noqa: PLC0415

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    templates = data.find_templates()
    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    moving = sitk.ReadImage(os.path.join(templates, "ch2bet.nii.gz"), sitk.sitkFloat32)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(sitk.AffineTransform(3), inPlace=False)  # both already in MNI space
    transform = reg.Execute(fixed, moving)
    aal = sitk.ReadImage(os.path.join(templates, "aal.nii.gz"))
    carried = sitk.Resample(aal, fixed, transform, sitk.sitkNearestNeighbor, 0, aal.GetPixelID())
    params = np.asarray(transform.GetParameters())
    print(f"affine Colin27 -> {os.path.basename(fixed_path)}: scale {np.round(np.diag(params[:9].reshape(3, 3)), 3).tolist()}, "
          f"shift {np.round(params[9:], 2).tolist()} mm (LPS), metric {reg.GetMetricValue():.3f}")
    return data.aal_targets(sitk.GetArrayFromImage(carried).transpose(2, 1, 0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--checkpoint", nargs="+", default=["colin27_deepgm_unet3d"],
                   help="paths or catalogue names (several: one pair of rows each)")
    p.add_argument("--case", default="fsl_mni152_brain", help="a brain-only case of heldout_templates")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import nibabel as nib  # noqa: PLC0415

    import napari_medseg as medseg  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as work:
        case = next(c for c in heldout.make_cases(work) if c["name"] == args.case)
        by_mni = case["ref"]
        by_registration = registered_reference(case["path"])
        rows = {"reference by registration vs by MNI coordinates": heldout.dice_per_class(by_registration, by_mni)}
        for i, checkpoint in enumerate(args.checkpoint):
            out = os.path.join(work, f"pred{i}.nii.gz")
            medseg.predict_file(case["path"], out, checkpoint, device=args.device)
            pred = np.asarray(nib.load(out).dataobj)
            tag = os.path.basename(checkpoint)[:24]
            rows[f"{tag} vs reference by MNI coordinates"] = heldout.dice_per_class(pred, by_mni)
            rows[f"{tag} vs reference by registration"] = heldout.dice_per_class(pred, by_registration)
    names = list(heldout.TARGETS.values())
    print(f"{args.case:55s} " + " ".join(f"{n[:8]:>8s}" for n in names) + "     mean")
    for what, dice in rows.items():
        print(f"{what:55s} " + " ".join(f"{dice[n]:8.3f}" for n in names) + f"  {np.mean(list(dice.values())):7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
