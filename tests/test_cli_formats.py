"""The CLI on what hospitals and challenges store: a DICOM series in, a DICOM-SEG out; a dataset of
MetaImage files trains, and NRRD/MHA files predict (issue 16, engine and CLI)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from medseg_testing import make_tiny_checkpoint

import napari_medseg
from napari_medseg.cli import main
from napari_medseg.io import read_nifti, read_volume, write_volume
from napari_medseg.io.phantom import write_phantom_dataset

pytestmark = pytest.mark.slow
DICOM_SAMPLE = os.path.join(os.path.dirname(napari_medseg.__file__), "data", "colin27_dicom")


def test_predict_dicom_series_writes_dicom_seg_on_its_grid(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt", patch=(16, 16, 16), spacing=(2.0, 1.2, 1.2))
    out = tmp_path / "labels.dcm"
    assert main(["predict", DICOM_SAMPLE, "-o", str(out), "-c", ckpt, "--device", "cpu", "--no-mirror", "-q"]) == 0
    series, seg = read_volume(DICOM_SAMPLE), read_volume(out)
    assert seg.data.shape == series.data.shape
    np.testing.assert_allclose(seg.affine, series.affine, atol=1e-4)
    assert seg.header["dicom"]["frame_of_reference_uid"] == series.header["dicom"]["frame_of_reference_uid"]


def test_predict_folder_of_dicom_series_defaults_to_dicom_seg(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt", patch=(16, 16, 16), spacing=(2.0, 1.2, 1.2))
    shutil.copytree(DICOM_SAMPLE, tmp_path / "in" / "patient1")
    assert main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-c", ckpt, "--device", "cpu",
                 "--no-mirror", "-q"]) == 0
    assert os.listdir(tmp_path / "out") == ["patient1.dcm"]


def test_metaimage_dataset_trains_and_nrrd_predicts(tmp_path):
    nifti = write_phantom_dataset(tmp_path / "nii", num_cases=3, shape=(16, 32, 32), spacing=(2.0, 1.0, 1.0))
    mha = tmp_path / "Dataset002_MHA"
    for sub in ("imagesTr", "labelsTr"):
        (mha / sub).mkdir(parents=True)
        for name in os.listdir(os.path.join(nifti, sub)):
            vol = read_nifti(os.path.join(nifti, sub, name))
            write_volume(mha / sub / name.replace(".nii.gz", ".mha"), vol.data, vol, is_label=sub == "labelsTr")
    meta = json.load(open(os.path.join(nifti, "dataset.json")))
    (mha / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".mha"}))
    run = tmp_path / "run"
    assert main(["train", str(mha), "-o", str(run), "-m", "unet-3d-fullres", "--model-kwargs",
                 '{"base_width": 4, "max_width": 16}', "--epochs", "1", "--iterations", "2", "--val-batches", "1",
                 "--patch-size", "16x32x32", "--batch-size", "1", "--device", "cpu", "-q"]) == 0
    src = read_volume(mha / "imagesTr" / "phantom_000_0000.mha")
    write_volume(tmp_path / "scan.nrrd", src.data, src)
    assert main(["predict", str(tmp_path / "scan.nrrd"), "-o", str(tmp_path / "scan_seg.nrrd"),
                 "-c", str(run / "checkpoint_final.pt"), "--device", "cpu", "-q"]) == 0
    labels = read_volume(tmp_path / "scan_seg.nrrd")
    assert labels.data.shape == src.data.shape
    np.testing.assert_allclose(labels.affine, src.affine, atol=1e-6)
