"""Held-out figures of the default model: T1 templates in MNI space, scored against AAL carried over.

Cases (each written as a NIfTI file and segmented through ``napari_medseg.predict_file``, the
path the CLI and the widget take):

* ``icbm152_brain``: MNI ICBM152 2009a symmetric T1 (nilearn; a 152-subject average, brain only,
  197x233x189 at 1 mm): another subject than Colin27. Reference: AAL (drawn on Colin27) carried
  over by the shared MNI space, nearest neighbour: **approximate**;
* ``icbm152_brain_flipped_x``: the same voxels stored with the first file axis reversed (the
  affine says so): the labels must be the same in world space;
* ``icbm152_brain_coronal``: the same stored with permuted axes (a "coronal" file);
* ``colin27_head``: the whole Colin27 head (``ch2``, 181x217x181): the training subject, not
  held out, but the whole field of view (scalp, neck, air) a head scan has;
* ``icbm152_in_colin27_head``: a whole head whose brain is not the training subject's: the
  ICBM152 brain (intensities scaled to Colin27's brain median) put by world position into the
  Colin27 head, in place of Colin27's brain (a composite: the scalp, skull and neck are the
  training subject's; no whole-head T1 of another subject ships in a package we can install).

Also counted: predicted voxels outside the brain (a brain mask dilated by 3 mm).

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


def carry_labels(labels: np.ndarray, label_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """``labels`` (file order, on ``label_affine``) resampled by world position onto ``shape``/``affine``."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    src = np.linalg.inv(label_affine)
    vox = np.rint(src[:3, :3] @ world + src[:3, 3:4]).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.array(labels.shape)[:, None]), axis=0)
    out = np.zeros(ijk.shape[1], labels.dtype)
    out[inside] = labels[vox[0, inside], vox[1, inside], vox[2, inside]]
    return out.reshape(shape)


def dice_per_class(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    out = {}
    for cls, name in TARGETS.items():
        p, r = pred == cls, ref == cls
        denom = p.sum() + r.sum()
        out[name] = round(float(2 * (p & r).sum() / denom), 4) if denom else float("nan")
    return out


def make_cases(folder: str) -> list[dict]:
    """Write the cases' images (NIfTI) and return their references and brain masks (file order)."""
    import nibabel as nib  # noqa: PLC0415

    os.makedirs(folder, exist_ok=True)
    templates = data.find_templates()
    aal_img = nib.load(os.path.join(templates, "aal.nii.gz"))
    aal = data.aal_targets(np.asarray(aal_img.dataobj))
    mni = nib.load(data.find_mni_template())
    t1 = np.asarray(mni.dataobj).astype(np.float32)
    ref = carry_labels(aal, aal_img.affine, t1.shape, mni.affine)
    brain = ndimage.binary_dilation(t1 > 0, iterations=3)
    cases = [dict(name="icbm152_brain", image=t1, affine=mni.affine, ref=ref, brain=brain)]
    flip = mni.affine.copy()
    flip[:3, 0] = -mni.affine[:3, 0]
    flip[:3, 3] = mni.affine[:3, 3] + mni.affine[:3, 0] * (t1.shape[0] - 1)
    cases.append(dict(name="icbm152_brain_flipped_x", image=t1[::-1].copy(), affine=flip, ref=ref[::-1].copy(),
                      brain=brain[::-1].copy()))
    perm = (0, 2, 1)  # file axes (i, k, j): a coronal-like storage
    coronal = mni.affine.copy()
    coronal[:3, :3] = mni.affine[:3, :3][:, perm]
    cases.append(dict(name="icbm152_brain_coronal", image=np.ascontiguousarray(t1.transpose(perm)), affine=coronal,
                      ref=np.ascontiguousarray(ref.transpose(perm)), brain=np.ascontiguousarray(brain.transpose(perm))))
    ch2 = nib.load(os.path.join(templates, "ch2.nii.gz"))
    bet = np.asarray(nib.load(os.path.join(templates, "ch2bet.nii.gz")).dataobj)
    cases.append(dict(name="colin27_head", image=np.asarray(ch2.dataobj).astype(np.float32), affine=ch2.affine,
                      ref=carry_labels(aal, aal_img.affine, ch2.shape, ch2.affine),
                      brain=ndimage.binary_dilation(bet > 0, iterations=3)))
    head = np.asarray(ch2.dataobj).astype(np.float32)
    icbm_on_head = carry_labels(t1, mni.affine, ch2.shape, ch2.affine)
    icbm_mask = icbm_on_head > 0
    colin_brain = bet > 0
    scale = np.median(head[colin_brain]) / np.median(icbm_on_head[icbm_mask])
    composite = head.copy()
    composite[colin_brain] = float(np.percentile(head[colin_brain], 2))  # CSF-dark where neither brain is
    composite[icbm_mask] = icbm_on_head[icbm_mask] * scale
    cases.append(dict(name="icbm152_in_colin27_head", image=composite, affine=ch2.affine,
                      ref=carry_labels(aal, aal_img.affine, ch2.shape, ch2.affine),
                      brain=ndimage.binary_dilation(colin_brain | icbm_mask, iterations=3)))
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
    """The figures ``tests/engine/test_heldout_brain.py`` checks: the 2 mm ICBM152 brain of
    ``tests/data`` (``scripts/make_heldout_test_data.py``), Dice per structure and predicted voxels
    outside the brain (its mask dilated by 2 voxels = 4 mm)."""
    import nibabel as nib  # noqa: PLC0415

    import napari_medseg as medseg  # noqa: PLC0415

    src = os.path.join(TEST_DATA, "icbm152_2mm_t1.nii.gz")
    out = os.path.join(folder, "icbm152_2mm_pred.nii.gz")
    medseg.predict_file(src, out, checkpoint, device=device, overwrite=True)
    pred = np.asarray(nib.load(out).dataobj)
    ref = np.asarray(nib.load(os.path.join(TEST_DATA, "icbm152_2mm_deepgm_aal.nii.gz")).dataobj)
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
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=2)


def main() -> int:
    args = arguments(__doc__.split("\n\n")[0]).parse_args()
    report(evaluate_all(args.checkpoint, args.work, args.device), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
