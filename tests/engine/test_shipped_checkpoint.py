"""The shipped default checkpoint works out of the box on the shipped sample volume, offline.

It must segment the whole sample (both hemispheres) at least as well as the README reports for it
(``sample_mean_dice`` in catalog.json; the held-out right-hemisphere Dice is reported beside it).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import napari_medseg
from napari_medseg.engine.checkpoints import list_checkpoints
from napari_medseg.engine.evaluation import dice_per_class
from napari_medseg.engine.inference import predict
from napari_medseg.engine.jobs import drive
from napari_medseg.io import read_nifti

PKG = os.path.dirname(napari_medseg.__file__)
NAME = "colin27_deepgm_unet3d.pt"

pytestmark = pytest.mark.slow


def test_shipped_checkpoint_is_catalogued_and_small():
    shipped = [c for c in list_checkpoints() if c.shipped]
    assert any(os.path.basename(c.path) == NAME for c in shipped)
    assert os.path.getsize(os.path.join(PKG, "checkpoints", NAME)) < 10 * 1024 * 1024


def test_shipped_checkpoint_segments_the_sample_above_reported_dice():
    with open(os.path.join(PKG, "checkpoints", "catalog.json")) as fh:
        reported = json.load(fh)[NAME]["sample_mean_dice"]
    image = read_nifti(os.path.join(PKG, "data", "colin27_t1_deepgm.nii.gz"))
    labels = read_nifti(os.path.join(PKG, "data", "colin27_deepgm_labels.nii.gz")).data
    result = drive(
        predict(image.data, image.spacing, [os.path.join(PKG, "checkpoints", NAME)], device="cpu")
    )
    assert result.labels.shape == labels.shape
    assert result.label_names[3] == "caudate"
    scores = dice_per_class(result.labels, labels, range(1, 7))
    mean = float(np.mean(list(scores.values())))
    assert mean >= reported - 0.005, (mean, reported, scores)  # tolerance: BLAS summation order


def test_the_shipped_model_flags_thick_slices_not_fine_voxels():
    """Trained at 2 mm, its class weights fitted on 1 mm images: its domain spans both, so a 0.7 mm
    T1 (HCP-like) passes and 5 mm slices are flagged."""
    from napari_medseg.engine.inference.domain import check_domain

    shipped = os.path.join(PKG, "checkpoints", NAME)
    rng = np.random.default_rng(0)
    t1 = rng.gamma(2.0, 40.0, (40, 40, 40)).astype(np.float32)
    assert check_domain(t1, (0.7, 0.7, 0.7), shipped) == []
    assert check_domain(t1, (1.0, 1.0, 1.0), shipped) == []
    assert check_domain(t1, (5.0, 1.0, 1.0), shipped)
