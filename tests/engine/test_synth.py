"""Domain randomisation: the label-map generator and the synthesising trainer variant."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medseg.engine.data import (
    LabelSynthesizer,
    SynthConfig,
    load_raw_dataset,
    read_raw_case,
    verify_dataset,
)
from napari_medseg.engine.data.synth import gaussian_blur
from napari_medseg.engine.training import TrainConfig, train, trainer_for
from napari_medseg.engine.training.variants.synth import SynthTrainer

CLEAN = SynthConfig(std_max=0.0, blur_sigma_max=0.0, p_lowres=0.0, bias_std=0.0, gamma_std=0.0,
                    noise_std_max=0.0, p_fov_cut=0.0, norm_scale_range=(1.0, 1.0), norm_shift=0.0,
                    p_skull_strip=0.0, p_dark_background=0.0)


def _head(shape=(40, 44, 36)) -> np.ndarray:
    """Nested ellipsoids: air 0, 'scalp' 5, 'brain' 4, two targets 1 and 2, a 'ventricle' 3."""
    z, y, x = np.indices(shape, dtype=np.float32)
    c = [(s - 1) / 2 for s in shape]
    r = np.sqrt(((z - c[0]) / (shape[0] / 2.2)) ** 2 + ((y - c[1]) / (shape[1] / 2.2)) ** 2
                + ((x - c[2]) / (shape[2] / 2.2)) ** 2)
    lab = np.zeros(shape, np.int64)
    lab[r < 1.0] = 5
    lab[r < 0.8] = 4
    lab[(r < 0.25)] = 3
    lab[(r < 0.55) & (x < c[2] - 3) & (r > 0.3)] = 1
    lab[(r < 0.55) & (x > c[2] + 3) & (r > 0.3)] = 2
    return lab


LUT = [0, 1, 2, 0, 0, 0]


def _batch(n=3):
    return torch.from_numpy(_head()[None, None]).repeat(n, 1, 1, 1, 1)


def test_shapes_dtypes_and_target_values():
    synth = LabelSynthesizer(6, LUT, (32, 32, 32), strip_labels=[5], mirror_axes=(2,), seed=0)
    images, targets = synth(_batch())
    assert images.shape == (3, 1, 32, 32, 32) and images.dtype == torch.float32
    assert targets.shape == (3, 1, 32, 32, 32) and targets.dtype == torch.int64
    assert set(targets.unique().tolist()) <= {0, 1, 2}
    assert torch.isfinite(images).all()


def test_image_and_targets_stay_aligned_after_deformation():
    """With every artefact off, the image is a function of the warped label: one value per label."""
    config = SynthConfig(**{**CLEAN.__dict__, "rotation_deg": 20.0, "elastic_voxels": 4.0})
    synth = LabelSynthesizer(6, list(range(6)), (32, 32, 32), config, seed=3)  # identity lookup
    images, labels = synth(_batch(2))
    for b in range(2):
        img, lab = images[b, 0], labels[b, 0]
        values = {}
        for v in lab.unique().tolist():
            region = img[lab == v]
            assert float(region.max() - region.min()) < 1e-4, f"label {v} is not painted uniformly"
            values[v] = float(region.mean())
        assert len(set(np.round(list(values.values()), 3))) == len(values)  # labels got distinct values
    # the deformation moved things: the warped labels differ from a plain centre crop
    crop = _batch(1)[0, 0, 4:36, 6:38, 2:34]
    assert (labels[0, 0] != crop).float().mean() > 0.02


def test_same_seed_same_batch_other_seed_other_batch():
    a = LabelSynthesizer(6, LUT, (24, 24, 24), seed=5)(_batch(2))
    b = LabelSynthesizer(6, LUT, (24, 24, 24), seed=5)(_batch(2))
    c = LabelSynthesizer(6, LUT, (24, 24, 24), seed=6)(_batch(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_painted_statistics_within_their_ranges():
    config = SynthConfig(mean_range=(0.2, 0.7), std_max=0.05, p_dark_background=1.0)
    synth = LabelSynthesizer(6, LUT, (40, 44, 36), config, seed=1)
    labels = _batch(8)
    painted = synth.paint(labels)
    for b in range(8):
        for v in range(6):
            region = painted[b, 0][labels[b, 0] == v]
            lo, hi = (0.0, 0.1) if v == 0 else config.mean_range
            assert lo - 0.02 <= float(region.mean()) <= hi + 0.02
            assert float(region.std()) <= config.std_max * 1.15 + 1e-6


def test_skull_strip_paints_strip_labels_as_air():
    config = SynthConfig(**{**CLEAN.__dict__, "p_skull_strip": 1.0, "mean_range": (0.5, 1.0)})
    synth = LabelSynthesizer(6, LUT, (40, 44, 36), config, strip_labels=[5], seed=2)
    labels = _batch(2)
    painted = synth.paint(labels)
    for b in range(2):
        air = painted[b, 0][labels[b, 0] == 0]
        scalp = painted[b, 0][labels[b, 0] == 5]
        assert torch.allclose(scalp, air.mean().expand_as(scalp), atol=1e-5)


def test_normalised_output_and_artefacts_vary_contrast():
    synth = LabelSynthesizer(6, LUT, (32, 32, 32), seed=4)
    images, targets = synth(_batch(6))
    means = images.mean(dim=(1, 2, 3, 4))
    stds = images.std(dim=(1, 2, 3, 4))
    cfg = synth.config
    assert (means.abs() <= cfg.norm_shift + 0.05).all()
    assert ((stds >= cfg.norm_scale_range[0] - 0.05) & (stds <= cfg.norm_scale_range[1] + 0.05)).all()
    # contrast differs between samples: the order of the two targets' mean intensities is not fixed
    order = []
    for b in range(6):
        m1 = images[b, 0][targets[b, 0] == 1].mean()
        m2 = images[b, 0][targets[b, 0] == 2].mean()
        order.append(bool(m1 > m2))
    assert len(set(order)) == 2


def test_field_of_view_cut_blanks_image_and_targets():
    config = SynthConfig(**{**CLEAN.__dict__, "p_fov_cut": 1.0, "fov_cut_max": 0.5})
    synth = LabelSynthesizer(6, LUT, (32, 32, 32), config, seed=8)
    images, targets = synth(_batch(4))
    cut = 0
    for b in range(4):
        img, tgt = images[b, 0], targets[b, 0]
        blank = img == img.min()
        for a in range(3):
            others = tuple(d for d in range(3) if d != a)
            planes = blank.all(dim=others)
            if planes.any():
                cut += 1
                assert int(tgt.index_select(a, planes.nonzero().flatten()).count_nonzero()) == 0
    assert cut >= 2, "the field of view was cut in fewer than half of the samples"


def test_gaussian_blur_keeps_mass_and_smooths():
    x = torch.zeros(1, 1, 15, 15, 15)
    x[0, 0, 7, 7, 7] = 1.0
    y = gaussian_blur(x, (1.0, 0.0, 2.0))
    assert abs(float(y.sum()) - 1.0) < 1e-4
    assert float(y.max()) < 0.2
    assert float(y[0, 0, :, 6, :].abs().sum()) == 0.0  # no blur along the sigma-0 axis


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        SynthConfig(p_lowres=2.0)
    with pytest.raises(ValueError):
        LabelSynthesizer(6, [0, 1], (8, 8, 8))
    with pytest.raises(ValueError):
        LabelSynthesizer(6, LUT, (64, 64, 64))(_batch(1))


# ------------------------------------------------------------------------------ dataset + trainer
def _write_dataset(root) -> str:
    folder = os.path.join(root, "Dataset900_Synth")
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub))
    lab = _head((36, 36, 32))
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(2):
        img = np.array([0, 80, 60, 20, 100, 140], np.float32)[lab] + rng.normal(0, 5, lab.shape)
        # napari (z, y, x) -> NIfTI (i, j, k)
        nib.save(nib.Nifti1Image(img.T.astype(np.float32), affine), os.path.join(folder, "imagesTr", f"c{i}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab.T.astype(np.uint8), affine), os.path.join(folder, "labelsTr", f"c{i}.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w") as fh:
        json.dump({"channel_names": {"0": "T1"}, "labels": {"background": 0, "left": 1, "right": 2},
                   "generation_labels": {"ventricle": 3, "brain": 4, "scalp": 5},
                   "numTraining": 2, "file_ending": ".nii.gz"}, fh)
    return folder


def test_dataset_generation_labels_are_background_unless_kept(tmp_path):
    raw = load_raw_dataset(_write_dataset(tmp_path))
    assert raw.generation_labels == {3: "ventricle", 4: "brain", 5: "scalp"}
    verify_dataset(raw)
    _, _, label = read_raw_case(raw.cases[0])
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    from dataclasses import replace

    _, _, full = read_raw_case(replace(raw.cases[0], keep_generation=True))
    assert set(np.unique(full).tolist()) == {0, 1, 2, 3, 4, 5}


def test_generation_labels_may_not_reuse_label_values(tmp_path):
    folder = _write_dataset(tmp_path)
    meta_path = os.path.join(folder, "dataset.json")
    with open(meta_path) as fh:
        meta = json.load(fh)
    meta["generation_labels"]["scalp"] = 2
    with open(meta_path, "w") as fh:
        json.dump(meta, fh)
    with pytest.raises(ValueError, match="reuse"):
        load_raw_dataset(folder)


def _drain(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def test_synth_training_runs_and_learns_only_the_targets(tmp_path):
    folder = _write_dataset(tmp_path)
    config = TrainConfig(
        output_dir=str(tmp_path / "run"), model="unet-3d-fullres",
        model_kwargs={"base_width": 4, "max_width": 16}, epochs=1, iterations_per_epoch=2, val_batches=1,
        patch_size=(16, 16, 16), batch_size=2, device="cpu", augment="synth", val_fraction=0.0,
        variant_options={"synth_fraction": 0.5, "synth_strip_labels": [5]}, mirror_axes=(2,),
    )
    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.engine.planning import Plan

    assert trainer_for(config, Plan.from_dict(_plan_stub())) is SynthTrainer
    path = _drain(train(config, folder))
    ckpt = load_checkpoint(path)
    assert ckpt.num_classes == 3
    assert ckpt.label_names == {0: "background", 1: "left", 2: "right"}
    assert ckpt.train_config["augment"] == "synth"


def test_default_training_reads_a_full_label_map_as_targets(tmp_path):
    folder = _write_dataset(tmp_path)
    config = TrainConfig(
        output_dir=str(tmp_path / "run"), model="unet-3d-fullres",
        model_kwargs={"base_width": 4, "max_width": 16}, epochs=1, iterations_per_epoch=1, val_batches=1,
        patch_size=(16, 16, 16), batch_size=2, device="cpu", val_fraction=0.0,
    )
    from napari_medseg.engine.checkpoints import load_checkpoint

    ckpt = load_checkpoint(_drain(train(config, folder)))
    assert ckpt.num_classes == 3


def _plan_stub() -> dict:
    return {"configuration": "3d_fullres", "spacing": [2.0, 2.0, 2.0], "patch_size": [16, 16, 16],
            "batch_size": 2, "pool_kernels": [[2, 2, 2]], "conv_kernels": [[3, 3, 3], [3, 3, 3]],
            "normalization": ["zscore"], "num_classes": 3}
