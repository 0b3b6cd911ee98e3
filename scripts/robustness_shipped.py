"""How the shipped model holds when a held-out scan differs from the templates the way users' scans do.

Each variant is made from a held-out case of ``scripts/heldout_templates.py`` (FSL's MNI152 1 mm
brain, or the whole head made of it and Colin27's scalp), written as a NIfTI file and segmented
through ``napari_medseg.predict_file`` (the CLI's and widget's path, default options), then scored
against AAL carried onto the variant's own grid (approximate, as in the held-out table):

* ``scanner_units``: intensities rescaled to 12 bits (0-4095), stored as int16 (what a scanner exports);
* ``zero_mean``: already normalised to zero mean and unit variance (as many ML data sets ship);
* ``bias_field``: a smooth multiplicative field, 0.75-1.33 across the brain (an uncorrected coil profile);
* ``noise``: Rician noise (magnitude MRI), sigma 5 % of the brain's median intensity;
* ``gamma_0.6`` / ``gamma_1.6``: another contrast weighting (intensity ** gamma);
* ``voxels_1.5mm``: resampled to 1.5 mm isotropic (trilinear after a matching blur);
* ``slices_3mm``: 1 x 1 x 3 mm, thick axial slices (blurred along the slice axis first);
* ``tilted_15deg``: the head pitched 15 degrees inside the voxel grid (a scan not aligned to
  MNI space: the network sees a rotated head, not only another affine);
* ``wider_fov``: 40 mm more below and 20 mm more on each side, filled with the head's background noise.

Usage::

    .venv/bin/python scripts/robustness_shipped.py [-c CHECKPOINT] [--cases brain,head] [--json out.json]
"""

from __future__ import annotations

import os
import sys

import numpy as np
from scipy import ndimage

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import heldout_templates as heldout  # noqa: E402

BASE_CASES = {"brain": "fsl_mni152_brain", "head": "fsl_mni152_in_colin27_head"}


def _resample(array: np.ndarray, affine: np.ndarray, shape, new_affine: np.ndarray, order: int) -> np.ndarray:
    """``array`` (on ``affine``) sampled by world position on ``shape`` / ``new_affine``."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    to_src = np.linalg.inv(affine) @ new_affine
    src = to_src[:3, :3] @ ijk + to_src[:3, 3:4]
    out = ndimage.map_coordinates(array, src, order=order, mode="constant", cval=0.0, prefilter=False)
    return out.reshape(shape).astype(array.dtype)


def _regrid(case: dict, spacing) -> dict:
    """``case`` on a grid of ``spacing`` mm (same field of view), blurred to that resolution first."""
    zooms = np.linalg.norm(case["affine"][:3, :3], axis=0)
    factors = np.asarray(spacing, float) / zooms
    shape = tuple(int(np.floor(s / f)) for s, f in zip(case["image"].shape, factors))
    new_affine = case["affine"].copy()
    new_affine[:3, :3] = case["affine"][:3, :3] * factors
    # voxel centres of the new grid span the same box: the first centre moves by half the growth
    new_affine[:3, 3] = case["affine"][:3, 3] + case["affine"][:3, :3] @ ((factors - 1) / 2)
    sigma = np.where(factors > 1, factors / 2.355, 0)  # FWHM of the blur = the new voxel
    blurred = ndimage.gaussian_filter(case["image"], sigma)
    return dict(image=_resample(blurred, case["affine"], shape, new_affine, 1),
                ref=_resample(case["ref"], case["affine"], shape, new_affine, 0),
                brain=_resample(case["brain"].astype(np.uint8), case["affine"], shape, new_affine, 0) > 0,
                affine=new_affine)


def _tilted(case: dict, degrees: float) -> dict:
    """The head pitched by ``degrees`` about the left-right axis through the grid's centre, stored
    with the original affine (so the file's axes no longer follow the anatomy)."""
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    centre = case["affine"] @ np.r_[(np.asarray(case["image"].shape) - 1) / 2, 1]
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    sample_affine = back @ rot @ shift @ case["affine"]  # where each stored voxel takes its content from
    shape = case["image"].shape
    return dict(image=_resample(case["image"], case["affine"], shape, sample_affine, 1),
                ref=_resample(case["ref"], case["affine"], shape, sample_affine, 0),
                brain=_resample(case["brain"].astype(np.uint8), case["affine"], shape, sample_affine, 0) > 0,
                affine=case["affine"])


def _bias(shape, brain: np.ndarray, rng) -> np.ndarray:
    """A smooth field exp(sum of low-order terms), scaled to span 0.75-1.33 across the brain."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    field = sum(rng.uniform(-1, 1) * g for g in grids) + sum(rng.uniform(-1, 1) * g * h for g in grids for h in grids)
    lo, hi = field[brain].min(), field[brain].max()
    field = np.clip((field - lo) / (hi - lo), -0.5, 1.5)
    return np.exp(np.log(0.75) + field * (np.log(1.33) - np.log(0.75))).astype(np.float32)


def _wider(case: dict, below_mm: int = 40, side_mm: int = 20, seed: int = 0) -> dict:
    """The field of view grown below and on both sides, filled with noise like the head's air."""
    zooms = np.linalg.norm(case["affine"][:3, :3], axis=0)
    below, side = int(round(below_mm / zooms[2])), int(round(side_mm / zooms[0]))
    pads = ((side, side), (side, side), (below, 0))
    air = case["image"][:8, :8, :8]
    rng = np.random.default_rng(seed)
    image = np.pad(case["image"], pads)
    mask = np.pad(np.zeros(case["image"].shape, bool), pads, constant_values=True)
    image[mask] = np.abs(rng.normal(air.mean(), air.std() + 1e-3, int(mask.sum())))
    affine = case["affine"].copy()
    affine[:3, 3] -= case["affine"][:3, :3] @ np.array([side, side, below], float)
    return dict(image=image.astype(np.float32), ref=np.pad(case["ref"], pads), brain=np.pad(case["brain"], pads),
                affine=affine)


def _rician(image: np.ndarray, sigma: float, rng) -> np.ndarray:
    """The magnitude of ``image`` plus complex Gaussian noise (what a magnitude MR image carries)."""
    real = image + rng.normal(0, sigma, image.shape)
    imag = rng.normal(0, sigma, image.shape)
    return np.hypot(real, imag).astype(np.float32)


def variants(case: dict, seed: int = 0) -> dict[str, dict]:
    """The named variants of one held-out case (arrays in file order, with reference and brain mask)."""
    rng = np.random.default_rng(seed)
    image = case["image"]
    median = float(np.median(image[case["brain"] & (image > 0)]))
    same = dict(ref=case["ref"], brain=case["brain"], affine=case["affine"])
    positive = np.clip(image, 0, None) / image.max()
    return {
        "as_is": dict(image=image, **same),
        "scanner_units": dict(image=np.round(image * (4095.0 / image.max())).astype(np.int16), **same),
        "zero_mean": dict(image=((image - image.mean()) / image.std()).astype(np.float32), **same),
        "bias_field": dict(image=image * _bias(image.shape, case["brain"], rng), **same),
        "noise": dict(image=_rician(image, 0.05 * median, rng), **same),
        "gamma_0.6": dict(image=(positive ** 0.6 * image.max()).astype(np.float32), **same),
        "gamma_1.6": dict(image=(positive ** 1.6 * image.max()).astype(np.float32), **same),
        "voxels_1.5mm": _regrid(case, (1.5, 1.5, 1.5)),
        "slices_3mm": _regrid(case, (1.0, 1.0, 3.0)),
        "tilted_15deg": _tilted(case, 15.0),
        "wider_fov": _wider(case, seed=seed),
    }


def evaluate(checkpoint: str, folder: str, which: list[str], device: str = "auto") -> dict[str, dict]:
    import nibabel as nib  # noqa: PLC0415

    from napari_medseg.engine.inference.config import DomainError  # noqa: PLC0415

    cases = {c["name"]: c for c in heldout.make_cases(folder)}
    results = {}
    for short in which:
        for name, v in variants(cases[BASE_CASES[short]]).items():
            key, path = f"{short}:{name}", os.path.join(folder, f"robust_{short}_{name}.nii.gz")
            nib.save(nib.Nifti1Image(v["image"], v["affine"]), path)
            try:
                results[key] = heldout.score_case(checkpoint, path, v, device)
            except DomainError as err:  # the user would be asked; say so and go on
                results[key] = {"domain_message": str(err)}
                print(f"{key}: domain message: {err}", flush=True)
                continue
            r = results[key]
            print(f"{key}: mean Dice {r['mean_dice']:.3f}, {r['outside']} outside, {r['seconds']:.1f} s", flush=True)
    return results


def main() -> int:
    p = heldout.arguments(__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="brain,head", help="comma-separated: " + ", ".join(BASE_CASES))
    args = p.parse_args()
    heldout.report(evaluate(args.checkpoint, args.work, args.cases.split(","), args.device), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
