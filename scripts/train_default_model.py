"""Recipe for the shipped default checkpoint: deep grey matter on Colin27, trained with our own CLI.

Data: the sample volume shipped in ``napari_medseg/data`` (Colin27 T1 + AAL labels, six deep grey
matter structures, left and right merged; see its ATTRIBUTION.md). Split **by hemisphere**, as
``shared/DATA.md`` suggests: the left hemisphere trains, the right hemisphere, mirrored, is held out.
The AAL labels of the right hemisphere were drawn independently, so its Dice is a fair estimate.
Mirroring augmentation and mirroring TTA let the model segment both hemispheres.

Usage::

    .venv/bin/python scripts/train_default_model.py [--work _work/default_model] [--epochs 40]

It writes the nnU-Net raw dataset, runs ``napari-medseg train``, ``predict`` and ``evaluate``, and
copies the checkpoint into ``napari_medseg/checkpoints/`` with its measured Dice in ``catalog.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from napari_medseg.cli import main as cli  # noqa: E402
from napari_medseg.io import read_nifti, write_nifti  # noqa: E402

DATA = os.path.join(ROOT, "napari_medseg", "data")
SHIPPED = os.path.join(ROOT, "napari_medseg", "checkpoints")
NAME = "colin27_deepgm_unet3d.pt"
MODEL_KWARGS = {"base_width": 12, "max_width": 96}


def make_dataset(folder: str) -> dict[str, str]:
    """Split the sample by hemisphere into an nnU-Net raw dataset; returns the label names."""
    image = read_nifti(os.path.join(DATA, "colin27_t1_deepgm.nii.gz"))
    labels = read_nifti(os.path.join(DATA, "colin27_deepgm_labels.nii.gz"))
    with open(os.path.join(DATA, "labels.json")) as fh:
        names = json.load(fh)["labels"]
    # World x = affine[0] @ (i, j, k, 1); napari order puts i last. x < 0 is the left hemisphere.
    i_world = image.affine[0, 0] * np.arange(image.data.shape[-1]) + image.affine[0, 3]
    if image.affine[0, 0] <= 0 or np.any(image.affine[0, 1:3]):
        raise SystemExit("expected an RAS, axis-aligned sample volume")
    mid = int(np.searchsorted(i_world, 0.0))
    width = min(mid, image.data.shape[-1] - mid)
    left = (image.data[..., mid - width:mid], labels.data[..., mid - width:mid])
    right = (image.data[..., mid:mid + width][..., ::-1], labels.data[..., mid:mid + width][..., ::-1])
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for split, case, (img, lab) in (("Tr", "left", left), ("Ts", "right_mirrored", right)):
        write_nifti(os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz"), np.ascontiguousarray(img),
                    spacing=image.spacing, translate=(0.0, 0.0, 0.0))
        write_nifti(os.path.join(folder, f"labels{split}", f"{case}.nii.gz"), np.ascontiguousarray(lab),
                    spacing=image.spacing, translate=(0.0, 0.0, 0.0), is_label=True)
    dataset = {
        "name": "Colin27DeepGM",
        "description": "Colin27 T1 + AAL deep grey matter, left hemisphere (train) / right mirrored (test)",
        "channel_names": {"0": "T1"},
        "labels": {v: int(k) for k, v in names.items()},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    with open(os.path.join(folder, "dataset.json"), "w") as fh:
        json.dump(dataset, fh, indent=2)
    return names


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=os.path.join(ROOT, "_work", "default_model"))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--patch-size", default="64x64x40")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ship", action="store_true", help="do not copy the checkpoint into the package")
    args = p.parse_args()

    ds = os.path.join(args.work, "Dataset002_Colin27DeepGM")
    run = os.path.join(args.work, "run")
    pred = os.path.join(args.work, "pred_right_mirrored")
    make_dataset(ds)
    t0 = time.perf_counter()
    rc = cli([
        "train", ds, "-o", run, "-m", "unet-3d-fullres", "--model-kwargs", json.dumps(MODEL_KWARGS),
        "--epochs", str(args.epochs), "--iterations", str(args.iterations), "--val-batches", "4",
        "--patch-size", args.patch_size, "--batch-size", str(args.batch_size), "--device", args.device,
        "--seed", "0", "--mirror-axes", "2",  # left-right only: anatomy is not symmetric front-back
    ])
    train_s = time.perf_counter() - t0
    if rc:
        return rc
    ckpt = os.path.join(run, "checkpoint_final.pt")
    t0 = time.perf_counter()
    rc = cli(["predict", os.path.join(ds, "imagesTs"), "-o", pred, "-c", ckpt, "--device", args.device])
    predict_s = time.perf_counter() - t0
    if rc:
        return rc
    rc = cli(["evaluate", pred, os.path.join(ds, "labelsTs"), "--json", os.path.join(args.work, "heldout.json")])
    if rc:
        return rc
    with open(os.path.join(args.work, "heldout.json")) as fh:
        result = json.load(fh)
    dice = {name: round(float(v["dice"]), 4) for name, v in result["mean"].items()}
    mean = round(float(result["foreground_mean_dice"]), 4)
    print(f"training {train_s:.0f} s, prediction {predict_s:.1f} s, held-out mean Dice {mean}")
    if args.no_ship:
        return 0
    os.makedirs(SHIPPED, exist_ok=True)
    # Ship the weights and the recipe, not the optimiser's momentum buffers (half the file).
    from napari_medseg.engine.checkpoints import load_checkpoint, save_checkpoint

    trained = load_checkpoint(ckpt)
    save_checkpoint(
        os.path.join(SHIPPED, NAME), trained.state_dict, model_name=trained.model_name,
        model_kwargs=trained.model_kwargs, in_channels=trained.in_channels, num_classes=trained.num_classes,
        spatial_dims=trained.spatial_dims, plan=trained.plan, label_names=trained.label_names,
        train_config=trained.train_config, epoch=trained.epoch, history=trained.history,
        extra={"heldout_dice": dice, "heldout_mean_dice": mean},
    )
    catalog_path = os.path.join(SHIPPED, "catalog.json")
    with open(catalog_path) as fh:
        catalog = json.load(fh)
    catalog[NAME] = {
        "name": "Deep grey matter (Colin27, 3D U-Net)",
        "description": "Six deep grey matter structures on T1 MRI at 1 mm: hippocampus, amygdala, caudate, "
        "putamen, pallidum, thalamus (left and right as one class each).",
        "training_data": "Colin27 T1 (ch2) with AAL labels, left hemisphere; MRIcron templates (Debian "
        "mricron-data). Held out: the right hemisphere, mirrored.",
        "license": "BSD-3-Clause (MRIcron templates); see napari_medseg/data/ATTRIBUTION.md",
        "dice": dice,
        "mean_dice": mean,
        "recipe": "scripts/train_default_model.py "
        f"--epochs {args.epochs} --iterations {args.iterations} --patch-size {args.patch_size}",
        "training_seconds": round(train_s),
    }
    tmp = catalog_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(catalog, fh, indent=2)
    os.replace(tmp, catalog_path)
    print(f"shipped {os.path.join(SHIPPED, NAME)} ({os.path.getsize(os.path.join(SHIPPED, NAME)) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
