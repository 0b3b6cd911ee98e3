"""Patch-free inference: whole-volume forward, predict() dispatch, memory refusal, CLI end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_medseg.cli import main
from napari_medseg.engine.checkpoints import CheckpointError, save_checkpoint
from napari_medseg.engine.inference import predict
from napari_medseg.engine.inference.variants.patchfree import (
    VolumeTooLargeError,
    estimate_peak_bytes,
    forward_whole_volume,
    largest_cube_side,
)
from napari_medseg.engine.jobs import drive
from napari_medseg.engine.planning import plan_experiment
from napari_medseg.engine.runtime.memory import MEMORY_ENV
from napari_medseg.io import read_nifti, write_nifti
from napari_medseg.io.phantom import make_phantom
from napari_medseg.models import create_model

SHAPE = (20, 28, 26)


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(path, model_name="pfseg", num_classes=3, kwargs=None):
    kwargs = {"width": 4} if kwargs is None and model_name == "pfseg" else (kwargs or {})
    plan = plan_experiment([(1.0, 1.0, 1.0)], [SHAPE], num_channels=1, num_classes=num_classes)["3d_fullres"]
    if model_name != "pfseg":
        kwargs = {**kwargs, "pool_kernels": plan.pool_kernels, "conv_kernels": plan.conv_kernels}
    torch.manual_seed(0)
    net = create_model(model_name, 1, num_classes, **kwargs)
    return save_checkpoint(
        path, net, model_name=model_name, model_kwargs=kwargs, in_channels=1, num_classes=num_classes,
        spatial_dims=3, plan=plan.to_dict(), label_names={0: "background", 1: "a", 2: "b"},
    )


def test_forward_whole_volume_matches_a_manual_forward():
    torch.manual_seed(0)
    net = create_model("pfseg", 1, 2, width=4).eval()
    hr = torch.randn(1, 20, 30, 50)
    probs = drive(forward_whole_volume(net, hr))
    # by hand: pad centrally to (32, 32, 64), LR = mean of 2x2x2 blocks, guidance = central quarter
    padded = torch.zeros(1, 1, 32, 32, 64)
    padded[0, :, 6:26, 1:31, 7:57] = hr
    lr = F.avg_pool3d(padded, 2)
    guide = padded[:, :, 12:20, 12:20, 24:40]
    with torch.no_grad():
        ref = torch.softmax(net(lr, guide), 1)[0, :, 6:26, 1:31, 7:57]
    assert probs.shape == (2, 20, 30, 50)
    assert torch.allclose(probs, ref, atol=1e-5)
    mirrored = drive(forward_whole_volume(net, hr, mirror_axes=(2,)))
    with torch.no_grad():
        flipped = torch.flip(torch.softmax(net(F.avg_pool3d(padded.flip(4), 2), guide.flip(4)), 1), [4])
    assert torch.allclose(mirrored, (ref + flipped[0, :, 6:26, 1:31, 7:57]) / 2, atol=1e-5)


def test_predict_returns_labels_in_the_source_geometry(tmp_path):
    ckpt = _checkpoint(tmp_path / "pf.pt")
    image, _ = make_phantom(SHAPE, num_classes=3, seed=3)
    result = drive(predict(image, (1.0, 1.0, 1.0), ckpt, device="cpu", mirror=False,
                                       return_probabilities=True, return_uncertainty=True))
    assert result.labels.shape == SHAPE and result.probabilities.shape == (3, *SHAPE)
    assert np.allclose(result.probabilities.sum(0), 1.0, atol=1e-4)
    assert np.array_equal(result.labels, result.probabilities.argmax(0))
    assert result.uncertainty.shape == SHAPE and result.label_names[1] == "a"
    # a 2-checkpoint ensemble of the same model gives the same softmax
    ens = drive(predict(image, (1.0, 1.0, 1.0), [ckpt, ckpt], device="cpu", mirror=False,
                                    return_probabilities=True))
    assert np.allclose(ens.probabilities, result.probabilities, atol=1e-5)


def test_refusals(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "pf.pt")
    image = make_phantom(SHAPE, seed=1)[0]
    monkeypatch.setenv(MEMORY_ENV, "0.1")  # less than the interpreter alone needs
    with pytest.raises(VolumeTooLargeError, match=r"GiB.*unet-3d-fullres"):
        drive(predict(image, (1.0, 1.0, 1.0), ckpt, device="cpu"))
    monkeypatch.delenv(MEMORY_ENV)
    unet = _checkpoint(tmp_path / "unet.pt", "unet-3d-fullres", kwargs={"base_width": 2, "max_width": 4})
    with pytest.raises(CheckpointError, match="ensembled"):
        drive(predict(image, (1.0, 1.0, 1.0), [ckpt, unet], device="cpu"))
    with pytest.raises(CheckpointError, match="3D model"):
        drive(predict(image[0], (1.0, 1.0), ckpt, device="cpu"))


def test_memory_model():
    small, big = estimate_peak_bytes((64, 64, 64)), estimate_peak_bytes((128, 128, 128))
    assert big > small > 0
    # linear in the voxels: doubling the voxels adds the same amount again
    assert estimate_peak_bytes((64, 64, 128)) - small == pytest.approx(small - estimate_peak_bytes((64, 64, 0)), rel=1e-6)
    side = largest_cube_side(24 * 2**30)
    assert side % 32 == 0 and estimate_peak_bytes((side,) * 3) <= 24 * 2**30 < estimate_peak_bytes((side + 32,) * 3)
    assert 256 <= side <= 512  # the paper's BraTS volumes (128x192x192) fit comfortably


def test_cli_predict_with_a_pfseg_checkpoint(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "pf.pt", num_classes=2)
    image = make_phantom(SHAPE, seed=2)[0]
    src, dst = tmp_path / "case_0000.nii.gz", tmp_path / "out" / "case.nii.gz"
    write_nifti(str(src), image, spacing=(1.0, 1.0, 1.0))
    assert main(["predict", str(src), "-o", str(dst), "-c", ckpt, "--device", "cpu", "--no-mirror", "-q"]) == 0
    out = read_nifti(str(dst))
    assert out.data.shape == SHAPE and set(np.unique(out.data)) <= {0, 1}
    assert np.allclose(out.affine, read_nifti(str(src)).affine)
