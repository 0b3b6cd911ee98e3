"""Distributed data-parallel training: helpers in one process, and 2 real gloo processes on CPU.

The multi-process tests start ``python -m torch.distributed.run --standalone --nproc_per_node=2``
(torchrun; ``--standalone`` picks a free port) as a subprocess, like a user would, and read what
each rank reports through ``--rank-report``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from napari_medseg.engine.runtime import DeviceError
from napari_medseg.engine.runtime import distributed as ddp

TINY = '{"base_width": 4, "max_width": 16}'
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture
def no_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


# ------------------------------------------------------------------ single process: nothing starts
def test_launch_env_absent_means_single_process(no_launcher):
    assert ddp.launch_env() is None
    assert not ddp.is_distributed()
    assert ddp.get_rank() == 0 and ddp.get_world_size() == 1 and ddp.get_local_rank() == 0
    assert ddp.is_main_process()
    with ddp.distributed_session("cpu") as distributed:
        assert distributed is False
        assert not torch.distributed.is_initialized()
    ddp.barrier()  # no-op, must not hang or raise


def test_launch_env_parsing_and_errors():
    env = ddp.launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert env == ddp.LaunchEnv(rank=3, world_size=4, local_rank=1)
    assert ddp.launch_env({"RANK": "0", "WORLD_SIZE": "2"}).local_rank == 0  # LOCAL_RANK defaults to RANK
    with pytest.raises(ddp.DistributedError, match="RANK and WORLD_SIZE"):
        ddp.launch_env({"WORLD_SIZE": "2"})
    with pytest.raises(ddp.DistributedError, match="integers"):
        ddp.launch_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ddp.DistributedError, match="Inconsistent"):
        ddp.launch_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_world_size_one_under_torchrun_starts_nothing(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ddp.init_distributed("cpu") is False
    assert not torch.distributed.is_initialized()


def test_launched_without_group_refuses_to_train(monkeypatch, no_launcher):
    ddp.require_process_group()  # plain python: fine
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ddp.DistributedError, match="no process group is running"):
        ddp.require_process_group()


def test_single_process_collectives_are_identities(no_launcher):
    t = torch.tensor([1.0, 2.0])
    (s,) = ddp.all_reduce_sum(t)
    assert torch.equal(s, t) and s is not t
    assert ddp.all_reduce_mean(2.5) == 2.5
    assert ddp.all_gather_object({"a": 1}) == [{"a": 1}]
    assert ddp.ranks_disagreeing("x") == []
    ddp.check_same_on_all_ranks({"plan": [1, 2]}, "plan")
    model = torch.nn.Linear(2, 2)
    assert ddp.wrap_model(model, torch.device("cpu")) is model
    assert ddp.unwrap_model(model) is model
    assert ddp.write_rank_report({"x": 1}, None) is None  # no folder asked for


def test_backend_and_device_choice(no_launcher):
    cpu = torch.device("cpu")
    assert ddp.choose_backend(cpu) == "gloo"
    if torch.distributed.is_nccl_available():
        assert ddp.choose_backend(torch.device("cuda", 0)) == "nccl"
    else:  # CPU-only builds: a clear message, not an obscure failure at init
        with pytest.raises(ddp.DistributedError, match="no NCCL support"):
            ddp.choose_backend(torch.device("cuda", 0))
    assert ddp.choose_backend(cpu, "gloo") == "gloo"
    with pytest.raises(ddp.DistributedError, match="NCCL backend needs CUDA"):
        ddp.choose_backend(cpu, "nccl")
    with pytest.raises(ddp.DistributedError, match="Unknown distributed backend"):
        ddp.choose_backend(cpu, "mpi")
    assert ddp.rank_device("cpu", 1) == cpu
    with pytest.raises(ddp.DistributedError, match="MPS"):
        ddp.rank_device("mps", 0)
    if torch.cuda.is_available():
        assert ddp.rank_device("auto", 0) == torch.device("cuda", 0)
        assert ddp.rank_device("cuda:0", 0) == torch.device("cuda", 0)
    else:
        assert ddp.rank_device("auto", 1) == cpu
        with pytest.raises(DeviceError, match="CUDA is not available"):
            ddp.rank_device("cuda", 1)


def test_replica_fingerprint_sees_one_ulp():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2, affine=True))
    b = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2, affine=True))
    b.load_state_dict(a.state_dict())
    assert ddp.replica_fingerprint(a) == ddp.replica_fingerprint(b)
    with torch.no_grad():
        w = b[0].weight.view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(1.0))
    assert ddp.replica_fingerprint(a) != ddp.replica_fingerprint(b)
    assert ddp.fingerprint({"b": 1, "a": [1, 2]}) == ddp.fingerprint({"a": [1, 2], "b": 1})


def test_one_process_group_is_not_distributed(tmp_path, no_launcher):
    # (Unwrapping a real DDP model is checked by the torchrun test: its checkpoint has no "module." keys.)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(3, 2)
        assert not ddp.is_distributed()  # one process: the trainer keeps the bare model
        assert ddp.wrap_model(model, torch.device("cpu")) is model
        assert ddp.all_reduce_mean(3.0) == 3.0
        path = ddp.write_rank_report({"rank": 0}, str(tmp_path / "rep"))
        assert path.endswith("rank0.json") and json.load(open(path)) == {"rank": 0}
    finally:
        ddp.cleanup()
    assert not torch.distributed.is_initialized()


def test_single_process_trainer_is_unchanged(tmp_path, no_launcher):
    from napari_medseg.engine.checkpoints import load_checkpoint
    from napari_medseg.engine.jobs import drive
    from napari_medseg.engine.training import TrainConfig, Trainer, prepare_data
    from napari_medseg.io.phantom import make_phantom

    image, labels = make_phantom((16, 16, 16), seed=0)
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"), model="unet-3d-fullres", model_kwargs=json.loads(TINY), epochs=1,
        iterations_per_epoch=1, val_batches=1, patch_size=(16, 16, 16), batch_size=2, device="cpu", seed=5,
    )
    prepared = drive(prepare_data(cfg, [(image, labels, (1.0, 1.0, 1.0))]))
    trainer = Trainer(cfg, prepared)
    assert (trainer.rank, trainer.world_size) == (0, 1)
    assert trainer.unwrapped_model is trainer.model
    assert trainer.sampler_seed == 5 and trainer.val_sampler_seed == 5 + 12345
    trainer.write_run_info()
    with open(tmp_path / "run" / "run.json") as fh:
        info = json.load(fh)
    assert info["world_size"] == 1 and info["global_batch_size"] == 2
    path = trainer.save("checkpoint_latest.pt", -1)  # rank 0 of 1 writes, the bare network's keys
    assert set(load_checkpoint(path).state_dict) == set(trainer.model.state_dict())


# ------------------------------------------------------------------- two processes, gloo on CPU
_COLLECTIVES = textwrap.dedent(
    """
    import sys
    import torch
    from napari_medseg.engine.runtime import distributed as ddp

    with ddp.distributed_session("cpu", "gloo") as on:
        r = ddp.get_rank()
        assert on and ddp.get_world_size() == 2 and ddp.is_main_process() == (r == 0)
        assert torch.distributed.get_backend() == "gloo"
        tp, n = ddp.all_reduce_sum(torch.tensor([1.0, r + 1.0], dtype=torch.float64), torch.tensor([r + 1]))
        assert tp.tolist() == [2.0, 3.0] and n.tolist() == [3] and n.dtype == torch.int64, (tp, n)
        assert ddp.all_reduce_mean(float(r)) == 0.5
        assert ddp.all_gather_object(r * 10) == [0, 10]
        ddp.check_same_on_all_ranks({"same": 1}, "plan")
        assert ddp.ranks_disagreeing("x" if r == 0 else "y") == [1]
        try:
            ddp.check_same_on_all_ranks({"case": r}, "train/validation split")
        except ddp.DistributedError as err:
            assert "ranks [1]" in str(err)
        else:
            sys.exit("ranks holding different data were not noticed")
        ddp.barrier()
    assert not torch.distributed.is_initialized()
    print(f"rank {r} ok")
    """
)


@pytest.mark.slow
def test_collectives_across_two_gloo_processes(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(_COLLECTIVES)
    proc = subprocess.run(
        [*TORCHRUN, str(script)], env=_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


@pytest.fixture(scope="module")
def torchrun_training(tmp_path_factory):
    """``napari-medseg train`` under torchrun: 2 gloo ranks, 2 epochs x 3 iterations of a tiny U-Net."""
    from napari_medseg.io.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("ddp")
    dataset = write_phantom_dataset(root / "Dataset001_Phantom", num_cases=4, num_test=1, shape=(16, 32, 32))
    run, report = root / "run", root / "report"
    cmd = [
        *TORCHRUN, "-m", "napari_medseg.cli", "train", dataset, "-o", str(run), "-m", "unet-3d-fullres",
        "--model-kwargs", TINY, "--epochs", "2", "--iterations", "3", "--val-batches", "1",
        "--patch-size", "16x16x16", "--batch-size", "2", "--device", "cpu", "--threads", "1",
        "--seed", "0", "-q", "--rank-report", str(root / "report"),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=root
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    reports = [json.load(open(report / f"rank{r}.json")) for r in range(2)]
    return {"dataset": dataset, "run": run, "proc": proc, "reports": reports, "elapsed": elapsed}


@pytest.mark.slow
def test_replicas_stay_identical_while_ranks_see_different_data(torchrun_training):
    r0, r1 = torchrun_training["reports"]
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world_size"] == r1["world_size"] == 2
    # DDP broadcast rank 0's weights and averaged the gradients: bitwise identical replicas ...
    assert r0["initial_fingerprint"] == r1["initial_fingerprint"]
    assert r0["final_fingerprint"] == r1["final_fingerprint"]
    assert r0["replicas_differ"] == r1["replicas_differ"] == []
    # ... that did learn something ...
    assert r0["final_fingerprint"] != r0["initial_fingerprint"]
    # ... from different patches on each rank (seed + rank): different per-rank losses.
    l0, l1 = np.array(r0["train_losses"]), np.array(r1["train_losses"])
    assert l0.shape == l1.shape == (6,)
    assert np.all(np.isfinite(l0)) and np.all(np.isfinite(l1))
    assert not np.allclose(l0, l1)


@pytest.mark.slow
def test_torchrun_cli_writes_one_checkpoint_that_predicts(torchrun_training, tmp_path, capsys):
    from napari_medseg.cli import main
    from napari_medseg.engine.checkpoints import build_model, load_checkpoint
    from napari_medseg.io import read_nifti

    run, proc = torchrun_training["run"], torchrun_training["proc"]
    assert proc.stdout.count("checkpoint:") == 1  # only rank 0 prints
    assert sorted(os.listdir(run)) == [
        "checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_latest.pt", "run.json",
    ]  # one writer: no leftover temp files
    with open(run / "run.json") as fh:
        info = json.load(fh)
    assert info["world_size"] == 2 and info["global_batch_size"] == 4
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert ckpt.epoch == 1 and len(ckpt.history) == 2
    assert not any(k.startswith("module.") for k in ckpt.state_dict)  # same keys as a single-process run
    # What rank 0 saved is exactly what every replica held at the end.
    assert ddp.replica_fingerprint(build_model(ckpt)) == torchrun_training["reports"][0]["final_fingerprint"]
    test_image = os.path.join(torchrun_training["dataset"], "imagesTs", "phantom_004_0000.nii.gz")
    out = str(tmp_path / "pred.nii.gz")
    assert main(["predict", test_image, "-o", out, "-c", str(run / "checkpoint_final.pt"), "--device", "cpu",
                 "--no-mirror", "-q"]) == 0
    pred = read_nifti(out)
    assert pred.data.shape == read_nifti(test_image).data.shape
    assert set(np.unique(pred.data).tolist()) <= {0, 1}
    print(f"torchrun training took {torchrun_training['elapsed']:.1f} s")
