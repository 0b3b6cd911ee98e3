"""The domain check: an image far outside a checkpoint's training domain stops predict before any
compute (unless forced), in the engine, the API and the CLI; unusual but valid images pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medseg_testing import TINY_KWARGS, make_tiny_checkpoint

from napari_medseg.engine.checkpoints import (
    CheckpointError,
    load_checkpoint,
    with_domain,
    write_checkpoint,
)
from napari_medseg.engine.inference import InferenceError, predict
from napari_medseg.engine.inference.config import DomainError
from napari_medseg.engine.inference.domain import (
    case_domain_stats,
    check_domain,
    intensity_features,
    summarise_domain,
)
from napari_medseg.engine.jobs import drive
from napari_medseg.io import write_nifti

SHAPE = (20, 28, 24)
SPACING = (1.0, 1.0, 1.0)


def _radius(shape=SHAPE) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.sqrt(z**2 + y**2 + x**2)


def _inner(shape=SHAPE) -> np.ndarray:
    """The labelled structure: a central ball."""
    return (_radius(shape) < 0.35).astype(np.int16)


def mri(shape=SHAPE, seed=0, scale=1.0) -> np.ndarray:
    """A T1-like volume: noise (>= 0) around a head and a brighter inner structure, arbitrary units
    0..255 times ``scale``."""
    rng = np.random.default_rng(seed)
    r = _radius(shape)
    image = np.abs(rng.normal(0, 4, shape))
    image[r < 0.85] = rng.normal(110, 15, int((r < 0.85).sum()))
    image[r < 0.35] = rng.normal(170, 10, int((r < 0.35).sum()))
    return (np.clip(image, 0, 255) * scale).astype(np.float32)


def ct(shape=SHAPE, seed=0) -> np.ndarray:
    """A head CT in Hounsfield units: air near -1000 around the head, a bone shell > 1000, brain ~30."""
    rng = np.random.default_rng(seed)
    r = _radius(shape)
    image = rng.normal(-1000, 8, shape)
    image[r < 0.85] = rng.normal(1200, 80, int((r < 0.85).sum()))
    image[r < 0.75] = rng.normal(30, 5, int((r < 0.75).sum()))
    return image.astype(np.float32)


@pytest.fixture(scope="module")
def mri_domain():
    cases = [case_domain_stats(mri(seed=seed)[None], _inner(), SPACING, seed) for seed in range(3)]
    return summarise_domain(cases, modality="T1")


@pytest.fixture(scope="module")
def mri_checkpoint(tmp_path_factory, mri_domain):
    tmp = tmp_path_factory.mktemp("domain")
    path = make_tiny_checkpoint(tmp / "plain.pt", patch=(16, 16, 16))
    return write_checkpoint(with_domain(path, mri_domain), tmp / "mri.pt")


def test_training_domain_summary(mri_domain, mri_checkpoint):
    assert mri_domain["modality"] == "T1" and mri_domain["num_cases"] == 3
    assert mri_domain["spacing_mm"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert mri_domain["strongly_negative_fraction"] == 0.0
    p = mri_domain["intensity_percentiles"]
    assert 140 < p["0.5"] < p["50"] < p["99.5"] < 210  # the inner structure's raw intensities
    assert load_checkpoint(mri_checkpoint).domain == mri_domain  # round-trips through the file


def test_ct_into_mri_model_is_refused_before_any_compute(mri_checkpoint, monkeypatch):
    import importlib

    from napari_medseg.models import create_model

    predict_module = importlib.import_module("napari_medseg.engine.inference.predict")

    reasons = check_domain(ct(), SPACING, mri_checkpoint)
    assert len(reasons) == 1 and "strongly negative" in reasons[0] and "T1" in reasons[0], reasons

    model_class = type(create_model("unet-3d-fullres", 1, 2, 3, **TINY_KWARGS))
    calls = []

    def forbidden_forward(self, x):
        calls.append(x.shape)
        raise AssertionError("the model ran")

    monkeypatch.setattr(model_class, "forward", forbidden_forward)
    monkeypatch.setattr(predict_module, "select_inferer", lambda ckpts: pytest.fail("an inferer was chosen"))
    with pytest.raises(DomainError) as err:
        drive(predict(ct(), SPACING, mri_checkpoint, device="cpu", mirror=False))
    assert isinstance(err.value, InferenceError) and err.value.reasons == reasons
    assert "\n" not in str(err.value) and "strongly negative" in str(err.value)
    assert calls == []


def test_force_segments_anyway(mri_checkpoint):
    result = drive(predict(ct(), SPACING, mri_checkpoint, device="cpu", mirror=False, force=True))
    assert result.labels.shape == SHAPE


def test_mri_of_another_scanner_passes(mri_checkpoint):
    rescaled = mri(seed=5, scale=16.0)  # 0..4000 instead of 0..255: arbitrary units
    assert rescaled.max() > 3000
    assert check_domain(rescaled, SPACING, mri_checkpoint) == []
    ringing = mri(seed=6)
    ringing[::7, ::5, 0] = -6.0  # a few slightly negative voxels (reconstruction ringing)
    assert check_domain(ringing, SPACING, mri_checkpoint) == []
    assert check_domain(mri(seed=7).astype(np.int16), (1.2, 0.9, 1.1), mri_checkpoint) == []
    result = drive(predict(rescaled, SPACING, mri_checkpoint, device="cpu", mirror=False))
    assert result.labels.shape == SHAPE


def test_an_mri_normalised_to_zero_mean_passes_a_zscore_model(mri_checkpoint):
    """Many ML data sets ship T1s already z-scored (background near -1): strongly negative, but to
    a model that z-scores each image only an offset and a scale away from the raw one, so no
    "CT?" message; and it segments as the raw image does. A CT is still flagged."""
    raw = mri(seed=8)
    zero_mean = ((raw - raw.mean()) / raw.std()).astype(np.float32)
    assert intensity_features(zero_mean)["strongly_negative_fraction"] > 0.3  # would have read as CT
    assert check_domain(zero_mean, SPACING, mri_checkpoint) == []
    same = drive(predict(zero_mean, SPACING, mri_checkpoint, device="cpu", mirror=False))
    ref = drive(predict(raw, SPACING, mri_checkpoint, device="cpu", mirror=False))
    assert np.mean(same.labels == ref.labels) > 0.999
    assert len(check_domain(ct(), SPACING, mri_checkpoint)) == 1


def test_far_voxel_sizes_are_refused(mri_checkpoint):
    thick = check_domain(mri()[None], (5.0, 1.0, 1.0), mri_checkpoint)
    assert len(thick) == 1 and "voxel size 5 x 1 x 1 mm" in thick[0] and "axis 0 coarser" in thick[0], thick
    fine = check_domain(mri(), (1.0, 0.3, 1.0), mri_checkpoint)
    assert len(fine) == 1 and "axis 1 finer" in fine[0], fine
    assert check_domain(mri(), (2.4, 0.45, 1.0), mri_checkpoint) == []  # within 2.5x / 0.4x
    with pytest.raises(DomainError, match="voxel size"):
        drive(predict(mri(), (5.0, 1.0, 1.0), mri_checkpoint, device="cpu"))


def test_merged_domains_join_the_ranges(tmp_path):
    from napari_medseg.engine.inference.domain import merge_domains

    trained = summarise_domain([case_domain_stats(mri()[None], _inner(), (2.0, 2.0, 2.0), 0)], modality="T1")
    fitted = summarise_domain([case_domain_stats(mri(seed=s)[None], _inner(), SPACING, s) for s in (1, 2)], "T1")
    merged = merge_domains(trained, fitted)
    assert merged["spacing_mm"] == [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    assert merged["field_of_view_mm"] == [[20.0, 28.0, 24.0], [40.0, 56.0, 48.0]]
    assert merged["num_cases"] == 3 and merged["modality"] == "T1"
    assert merged["intensity_percentiles"] == fitted["intensity_percentiles"]  # the one with more cases
    assert merge_domains(None, fitted) is fitted and merge_domains(trained, None) is trained
    assert merge_domains(trained, {**fitted, "modality": "T2"})["modality"] == "T1, T2"
    ckpt = with_domain(make_tiny_checkpoint(tmp_path / "m.pt"), merged)
    # a 0.7 mm T1 (HCP-like) passes a model fitted on 1 mm images; 5 mm slices do not
    assert check_domain(mri(), (0.7, 0.7, 0.7), ckpt) == []
    thick = check_domain(mri(), (5.0, 1.0, 1.0), ckpt)
    assert len(thick) == 1 and "axis 0 coarser by at least 2.5x" in thick[0], thick


def test_mri_into_ct_model_is_refused(tmp_path):
    stats = [case_domain_stats(ct(seed=s)[None], _inner(), SPACING, s) for s in range(2)]
    domain = summarise_domain(stats, modality="CT")
    assert domain["strongly_negative_fraction"] > 0.3
    ckpt = with_domain(make_tiny_checkpoint(tmp_path / "ct.pt", patch=(16, 16, 16)), domain)
    ckpt.plan["normalization"] = ["ct"]
    assert check_domain(ct(seed=4), SPACING, ckpt) == []
    reasons = check_domain(mri(), SPACING, ckpt)
    assert len(reasons) == 1 and "Hounsfield" in reasons[0], reasons


def test_checkpoints_without_domain_are_not_checked(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "old.pt", patch=(16, 16, 16))
    assert load_checkpoint(path).domain is None
    assert check_domain(ct(), (5.0, 1.0, 1.0), path) == []


def test_bad_domains_are_refused(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "x.pt", patch=(16, 16, 16))
    for bad in ({"spacing_mm": [[1, 1, 1]]}, {"modality": 3}, {"intensity_percentiles": {"50": "a"}},
                {"strongly_negative_fraction": 2.0}, ["T1"]):
        with pytest.raises(CheckpointError, match="domain"):
            with_domain(path, bad)


def test_cli_stops_with_a_hint_and_force_segments(mri_checkpoint, tmp_path, capsys):
    from napari_medseg.cli import main

    src = str(tmp_path / "ct.nii.gz")
    write_nifti(src, ct(), spacing=SPACING)
    out = tmp_path / "ct_labels.nii.gz"
    args = ["predict", src, "-o", str(out), "-c", mri_checkpoint, "--device", "cpu", "--no-mirror", "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "strongly negative" in err and "pass --force to segment anyway" in err.lower()
    assert not out.exists()
    assert main(args + ["--force"]) == 0
    assert out.exists()


def test_shipped_model_flags_a_ct_before_any_compute(monkeypatch):
    """A CT in HU into the shipped T1 brain model: one line, no tile computed."""
    import napari_medseg as medseg
    from napari_medseg.engine.inference.config import DomainError

    rng = np.random.default_rng(0)
    ct = np.full((40, 60, 60), -1000.0, np.float32)
    ct[5:35, 10:50, 10:50] = rng.normal(40, 20, (30, 40, 40))
    ct[15:25, 25:35, 25:35] = 700.0  # bone
    calls = []
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **k: calls.append(1))
    with pytest.raises(DomainError) as err:
        medseg.predict(ct, (3.0, 1.0, 1.0), "colin27_deepgm_unet3d", device="cpu")
    assert "\n" not in str(err.value) and calls == []
