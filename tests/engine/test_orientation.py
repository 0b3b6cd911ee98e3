"""Orientation: axis codes of affines, exact reorientation, checkpoints that record their training
orientation, training that reorients its cases, and prediction that is the same in world space for
a volume stored in any of the 48 axis permutations and flips."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np
import pytest
import torch
from medseg_testing import make_tiny_checkpoint

from napari_medseg.engine.checkpoints import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    with_orientation,
    write_checkpoint,
)
from napari_medseg.engine.jobs import drive
from napari_medseg.engine.preprocessing import (
    OrientationError,
    check_codes,
    orientation_codes,
    reorient,
    reorientation,
)
from napari_medseg.io import affine_from_napari, napari_matrix, voxel_to_world, write_nifti

SPACING = (2.0, 1.0, 1.5)  # napari order (z, y, x)
SHAPE = (9, 12, 14)
LAYOUTS = list(itertools.product(itertools.permutations(range(3)), itertools.product((False, True), repeat=3)))


def _ras_affine(spacing=SPACING, origin=(-20.0, 13.0, 4.5)) -> np.ndarray:
    """A real axis-aligned RAS+ affine (file voxels i, j, k = napari axes reversed)."""
    affine = np.diag([*spacing[::-1], 1.0])
    affine[:3, 3] = origin
    return affine


def _stored(data: np.ndarray, affine: np.ndarray, perm, flips):
    """``data`` stored in another layout: napari axis ``a`` is source axis ``perm[a]``, reversed when
    ``flips[a]``; the affine is adjusted so that every voxel keeps its world position."""
    out = np.transpose(data, perm)
    out = np.flip(out, [a for a in range(3) if flips[a]]) if any(flips) else out
    to_source = np.zeros((4, 4))  # new napari index (homogeneous) -> source napari index
    to_source[3, 3] = 1.0
    for a in range(3):
        to_source[perm[a], a] = -1.0 if flips[a] else 1.0
        to_source[perm[a], 3] = data.shape[perm[a]] - 1 if flips[a] else 0.0
    return np.ascontiguousarray(out), affine_from_napari(napari_matrix(affine) @ to_source), to_source


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


# ------------------------------------------------------------------------------------------- codes
def test_codes_of_ras_lps_and_2d():
    assert orientation_codes(np.eye(4)) == "SAR"  # an axis-aligned RAS+ NIfTI in napari order
    assert orientation_codes(_ras_affine()) == "SAR"
    assert orientation_codes(np.diag([-1.0, -1.0, 1.0, 1.0])) == "SPL"  # LPS (DICOM patient axes)
    assert orientation_codes(np.diag([-0.8, 0.8, -3.0, 1.0])) == "IAL"
    assert orientation_codes(np.diag([2.0, 3.0, 1.0, 1.0]), ndim=2) == "AR"  # a (y, x) image


def test_codes_of_oblique_and_permuted_affines():
    assert orientation_codes(_rotation(2, 25) @ _ras_affine()) == "SAR"
    assert orientation_codes(_rotation(0, -35) @ np.diag([-1.0, -1.0, 1.0, 1.0])) == "SPL"
    coronal = np.array([[1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # i->R, j->S, k->P
    assert orientation_codes(coronal) == "PSR"
    assert orientation_codes(_rotation(1, 30) @ coronal) == "PSR"
    # Both i and j lie closest to R: the assignment gives j the next best axis, never R twice.
    sheared = np.eye(4)
    sheared[:3, 0] = [0.9, 0.436, 0.0]
    sheared[:3, 1] = [0.8, -0.6, 0.0]
    codes = orientation_codes(sheared)
    assert codes == "SPR" and len(set(codes)) == 3


def test_bad_codes_and_affines_are_refused():
    assert check_codes("sar") == "SAR"
    for bad in ("SAX", "SSR", "RL", "SARS", ""):
        with pytest.raises(OrientationError):
            check_codes(bad)
    with pytest.raises(OrientationError):
        check_codes("SA", ndim=3)
    with pytest.raises(OrientationError):
        reorientation("AR", "SR")  # another plane: not a permutation
    with pytest.raises(OrientationError):
        orientation_codes(np.diag([1.0, 0.0, 1.0, 1.0]))


# ------------------------------------------------------------------------------------ reorientation
@pytest.mark.parametrize("perm,flips", LAYOUTS)
def test_reorient_is_exact_and_keeps_world_positions(perm, flips):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, *SHAPE)).astype(np.float32)  # with a channel axis
    affine = _ras_affine()
    _, stored_affine, to_source = _stored(data[0], affine, perm, flips)
    stored = np.stack([_stored(c, affine, perm, flips)[0] for c in data])
    codes = orientation_codes(stored_affine)
    assert {"LPI"["RAS".index(c)] if c in "RAS" else c for c in codes} == set("LPI")
    spacing = tuple(SPACING[p] for p in perm)

    back, move = reorient(stored, codes, "SAR")
    np.testing.assert_array_equal(back, data)
    np.testing.assert_array_equal(move.restore(back), stored)
    assert move.apply_spacing(spacing) == SPACING and move.restore_spacing(SPACING) == spacing
    np.testing.assert_allclose(move.apply_affine(stored_affine, stored.shape[1:]), affine, atol=1e-9)
    assert move.is_identity == (codes == "SAR")

    forward, there = reorient(data, "SAR", codes)  # and the other way
    np.testing.assert_array_equal(forward, stored)
    np.testing.assert_array_equal(there.restore(forward), data)
    np.testing.assert_allclose(there.apply_affine(affine, SHAPE), stored_affine, atol=1e-9)
    for v in [(0, 0, 0), (8, 11, 13), (3, 5, 7)]:  # the stored twin: same value, same world position
        w = tuple(int(round(i)) for i in (np.linalg.inv(to_source) @ [*v, 1.0])[:3])
        assert stored[0][w] == data[0][v]
        np.testing.assert_allclose(voxel_to_world(stored_affine, w), voxel_to_world(affine, v), atol=1e-9)


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_orientation_round_trips_and_old_files_load(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "tiny.pt")
    assert load_checkpoint(path).orientation is None  # written without the field
    ckpt = with_orientation(path, "SAR")
    write_checkpoint(ckpt, tmp_path / "sar.pt")
    assert load_checkpoint(tmp_path / "sar.pt").orientation == "SAR"
    # A file from before the field existed (no "orientation"/"domain" keys) still loads.
    payload = torch.load(path, weights_only=True)
    payload.pop("orientation", None)
    payload.pop("domain", None)
    torch.save(payload, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert old.orientation is None and old.domain is None
    with pytest.raises(CheckpointError, match="orientation"):
        with_orientation(path, "SAX")
    with pytest.raises(CheckpointError, match="orientation"):
        save_checkpoint(tmp_path / "bad.pt", ckpt.state_dict, model_name=ckpt.model_name, model_kwargs=ckpt.model_kwargs,
                        in_channels=1, num_classes=2, spatial_dims=3, plan=ckpt.plan, label_names=None,
                        orientation="SSR")


def test_shipped_checkpoint_records_its_orientation_and_domain():
    """Recorded by scripts/record_checkpoint_domain.py from the RAS+ NIfTI crop it was trained on."""
    import napari_medseg

    shipped = os.path.join(os.path.dirname(napari_medseg.__file__), "checkpoints", "colin27_deepgm_unet3d.pt")
    ckpt = load_checkpoint(shipped)
    assert ckpt.orientation == "SAR"
    assert ckpt.domain["modality"] == "T1" and ckpt.domain["strongly_negative_fraction"] == 0.0


# -------------------------------------------------------------------------------------- prediction
@pytest.fixture(scope="module")
def oriented_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orient")
    path = make_tiny_checkpoint(tmp / "tiny.pt", patch=(16, 16, 16), spacing=(1.0, 1.0, 1.0), seed=3)
    return with_orientation(path, orientation_codes(_ras_affine()))


def _predict(image, spacing, ckpt, affine):
    from napari_medseg.engine.inference import predict

    return drive(predict(image, spacing, ckpt, device="cpu", mirror=False, return_probabilities=True, affine=affine))


def test_prediction_is_the_same_in_world_space_for_all_48_layouts(oriented_checkpoint):
    rng = np.random.default_rng(7)
    data = (rng.random(SHAPE) * 100).astype(np.float32)
    data[2:7, 3:9, 4:11] += 150  # some structure for the random model to respond to
    affine = _ras_affine()
    twin = _predict(data, SPACING, oriented_checkpoint, affine)
    assert twin.labels.shape == SHAPE
    for perm, flips in LAYOUTS:
        stored, stored_affine, _ = _stored(data, affine, perm, flips)
        spacing = tuple(SPACING[p] for p in perm)
        result = _predict(stored, spacing, oriented_checkpoint, stored_affine)
        assert result.labels.shape == stored.shape  # on the input's own layout
        codes = orientation_codes(stored_affine)
        labels_ras, _ = reorient(result.labels, codes, "SAR")
        probabilities_ras, _ = reorient(result.probabilities, codes, "SAR")
        np.testing.assert_array_equal(labels_ras, twin.labels, err_msg=f"{perm} {flips} ({codes})")
        np.testing.assert_array_equal(probabilities_ras, twin.probabilities, err_msg=f"{perm} {flips}")


def test_without_orientation_the_layout_is_used_as_stored(oriented_checkpoint):
    rng = np.random.default_rng(7)
    data = (rng.random(SHAPE) * 100).astype(np.float32)
    data[2:7, 3:9, 4:11] += 150
    stored, stored_affine, _ = _stored(data, _ras_affine(), (2, 0, 1), (True, False, True))
    plain = dataclasses.replace(oriented_checkpoint, orientation=None)
    spacing = tuple(SPACING[p] for p in (2, 0, 1))
    with_affine = _predict(stored, spacing, plain, stored_affine)
    without = _predict(stored, spacing, plain, None)
    np.testing.assert_array_equal(with_affine.probabilities, without.probabilities)  # no behaviour change
    reoriented = _predict(stored, spacing, oriented_checkpoint, stored_affine)
    assert not np.array_equal(reoriented.probabilities, without.probabilities)  # the test above means something


# ---------------------------------------------------------------------------------------- training
def _dataset(root, layouts) -> str:
    from napari_medseg.io.phantom import make_phantom

    os.makedirs(root / "imagesTr")
    os.makedirs(root / "labelsTr")
    for i, (perm, flips) in enumerate(layouts):
        image, labels = make_phantom((16, 24, 20), num_classes=2, seed=i)
        image = np.abs(image).astype(np.float32) * 100
        stored, affine, _ = _stored(image, _ras_affine((2.0, 1.0, 1.0)), perm, flips)
        stored_labels, _, _ = _stored(labels.astype(np.uint8), _ras_affine((2.0, 1.0, 1.0)), perm, flips)
        geometry = {"affine": affine.tolist(), "spacing": [(2.0, 1.0, 1.0)[p] for p in perm]}
        write_nifti(root / "imagesTr" / f"case{i}_0000.nii.gz", stored, geometry)
        write_nifti(root / "labelsTr" / f"case{i}.nii.gz", stored_labels, geometry, is_label=True)
    with open(root / "dataset.json", "w") as fh:
        json.dump({"channel_names": {"0": "T1"}, "labels": {"background": 0, "blob": 1},
                   "numTraining": len(layouts), "file_ending": ".nii.gz"}, fh)
    return str(root)


def test_training_reorients_cases_and_records_orientation_and_domain(tmp_path):
    from napari_medseg.engine.training import TrainConfig, train
    from napari_medseg.engine.training.prepare import case_inputs

    layouts = [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)), ((1, 2, 0), (False, True, False))]
    root = _dataset(tmp_path / "ds", layouts)
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"), model="unet-3d-fullres", model_kwargs={"base_width": 4, "max_width": 16},
        epochs=1, iterations_per_epoch=1, val_batches=1, patch_size=(16, 16, 16), batch_size=1, device="cpu",
        augment=False,
    )
    inputs = case_inputs(cfg, root)
    first = inputs.read(0)
    for i in (1, 2):  # every case in the first case's layout, spacing permuted alike
        image, spacing, label = inputs.read(i)
        assert image.shape == first[0].shape and spacing == first[1] == (2.0, 1.0, 1.0)
        assert label.shape == first[2].shape
    assert inputs.orientation == "SAR"

    path = drive(train(cfg, root))
    ckpt = load_checkpoint(path)
    assert ckpt.orientation == "SAR"
    assert ckpt.domain["modality"] == "T1" and ckpt.domain["num_cases"] == 3
    assert ckpt.domain["spacing_mm"] == [[2.0, 1.0, 1.0], [2.0, 1.0, 1.0]]
    assert ckpt.domain["strongly_negative_fraction"] == 0.0
    with open(tmp_path / "run" / "run.json") as fh:
        assert json.load(fh)["orientation"] == "SAR"

    # Fine-tuning keeps the parent's orientation even when the first case is stored otherwise.
    root2 = _dataset(tmp_path / "ds2", [layouts[1], layouts[0]])
    ft = dataclasses.replace(cfg, output_dir=str(tmp_path / "ft"), init_checkpoint=path)
    tuned = load_checkpoint(drive(train(ft, root2)))
    assert tuned.orientation == "SAR"


def test_reading_a_case_reads_its_image_file_once(tmp_path, monkeypatch):
    """The orientation of a case comes from the geometry its read already found: before, the first
    read of every file case decoded the image a second time for its axis codes (a 512 x 512 x 300
    CT: seconds per case, twice for a fine-tune's parent check)."""
    from napari_medseg.engine.training import TrainConfig
    from napari_medseg.engine.training.prepare import case_inputs
    from napari_medseg.io import dispatch

    layouts = [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True))]
    root = _dataset(tmp_path / "ds", layouts)
    reads = []
    real = dispatch.read_nifti
    monkeypatch.setattr(dispatch, "read_nifti", lambda path: reads.append(os.path.basename(path)) or real(path))
    inputs = case_inputs(TrainConfig(output_dir=str(tmp_path / "run"), device="cpu"), root)
    inputs.read(0)
    inputs.read(1)
    images = [r for r in reads if "_0000" in r]
    assert len(images) == 2 and len(set(images)) == 2, reads
    assert inputs.orientation == "SAR"
    image, spacing, _ = inputs.read(1)
    assert spacing == (2.0, 1.0, 1.0)
