"""Distributed data-parallel training under ``torchrun`` (one process per GPU, or several on CPU).

``torchrun --nproc_per_node=N`` starts N copies of a program and tells each who it is through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). This
module reads that environment, starts the process group (NCCL for CUDA devices, gloo on CPU), pins
each process to ``cuda:LOCAL_RANK``, and offers the few collectives the trainer needs: a barrier,
sums and means over ranks, and checks that every rank holds the same data and the same weights.

Without that environment (a plain ``python`` or the napari widget) nothing is initialised and
every helper is a cheap no-op for a single process, so the trainer calls them unconditionally.
``napari-medseg train`` opens a :func:`distributed_session` itself; a script does the same::

    with distributed_session(config.device):        # torchrun --nproc_per_node=N script.py
        drive(train(config, dataset))         # only rank 0 writes run.json and checkpoints

As in nnU-Net v2, each process trains on its own batches of the plan's batch size: the global
batch is ``WORLD_SIZE x batch_size``. ``DistributedDataParallel`` broadcasts rank 0's weights when
it wraps the model and averages the gradients in every backward pass, so replicas stay identical.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from napari_medseg.engine.runtime.devices import DeviceError, resolve_device
from napari_medseg.errors import MedsegError
from napari_medseg.io.atomic import atomic_write_json

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
#: Set to a folder to make every rank write ``rank{R}.json`` (weight fingerprints before and after
#: training, its own per-iteration losses) at the end of a distributed run: a consistency check.


class DistributedError(MedsegError, ValueError):
    """The distributed environment or settings are unusable (the message says what to change)."""


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is, as ``torchrun`` (``torch.distributed.run``) describes it."""

    rank: int
    world_size: int
    local_rank: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; ``None`` when not started by a launcher.

    Args:
        environ: The environment to read (default ``os.environ``).

    Raises:
        DistributedError: if the variables are partly set or not consistent integers.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    try:
        world_size = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as err:
        raise DistributedError(
            "RANK and WORLD_SIZE must both be integers when either is set (torchrun sets them); "
            f"got RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}."
        ) from err
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedError(
            f"Inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}."
        )
    return LaunchEnv(rank, world_size, local_rank)


def _dist_ready() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return _dist_ready() and torch.distributed.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return torch.distributed.get_rank() if _dist_ready() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return torch.distributed.get_world_size() if _dist_ready() else 1


def get_local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 when not distributed)."""
    env = launch_env()
    return env.local_rank if env is not None and _dist_ready() else 0


def require_process_group() -> None:
    """Refuse to train when torchrun started several processes but no process group is running.

    Without a group, each process would train alone and all would write the same run folder.

    Raises:
        DistributedError: saying how to start the group.
    """
    env = launch_env()
    if env is not None and env.world_size > 1 and not _dist_ready():
        raise DistributedError(
            f"Started by torchrun with WORLD_SIZE={env.world_size}, but no process group is running: "
            "use `napari-medseg train`, or call train() inside "
            "`with napari_medseg.engine.runtime.distributed.distributed_session(device):`."
        )


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one that writes files and prints."""
    return get_rank() == 0


def rank_device(spec: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto`` (with CUDA) or any CUDA spec.

    One process drives one GPU, so an explicit ``cuda:N`` is replaced by ``cuda:LOCAL_RANK`` (with a
    warning when they differ); restrict the GPUs with ``CUDA_VISIBLE_DEVICES`` instead.

    Args:
        spec: The user's device (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        local_rank: Default: ``LOCAL_RANK`` of the launcher environment, else 0.

    Raises:
        DistributedError: for MPS, or when this machine has fewer GPUs than local processes.
    """
    if local_rank is None:
        env = launch_env()
        local_rank = env.local_rank if env is not None else 0
    text = str(spec or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("mps"):
        raise DistributedError("Distributed training does not support MPS; use --device cpu or CUDA GPUs.")
    if not text.startswith("cuda"):
        return resolve_device(text)
    if not torch.cuda.is_available():
        raise DeviceError(f"Device {text!r} was requested but CUDA is not available on this machine.")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(
            f"LOCAL_RANK {local_rank} needs GPU cuda:{local_rank} but this machine has "
            f"{torch.cuda.device_count()} CUDA GPU(s): start at most that many processes per node."
        )
    requested = torch.device(text)
    if requested.index is not None and requested.index != local_rank:
        logger.warning("Distributed run: using cuda:%d (LOCAL_RANK) instead of %s.", local_rank, text)
    return torch.device("cuda", local_rank)


def choose_backend(device: torch.device, backend: str = "auto") -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise; check an explicit choice fits the device.

    Raises:
        DistributedError: for an unknown backend, NCCL without CUDA, or a backend this build lacks.
    """
    backend = (backend or "auto").lower()
    if backend not in BACKENDS:
        raise DistributedError(f"Unknown distributed backend {backend!r}; use one of {list(BACKENDS)}.")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError("The NCCL backend needs CUDA devices; use --dist-backend gloo on CPU.")
    available = {"nccl": torch.distributed.is_nccl_available(), "gloo": torch.distributed.is_gloo_available()}
    if not available[backend]:
        raise DistributedError(f"This PyTorch build has no {backend.upper()} support.")
    return backend


def init_distributed(
    device: str | torch.device | None = "auto", backend: str = "auto", timeout_s: float = 1800.0
) -> bool:
    """Start the process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``.

    Pins CUDA ranks to ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``) before starting NCCL.

    Args:
        device: The run's device setting; decides the backend under ``auto``.
        backend: ``auto`` (NCCL on CUDA, gloo on CPU), ``nccl`` or ``gloo``.
        timeout_s: How long a collective waits for the other ranks before failing.

    Returns:
        True when this call started a process group (the caller then destroys it), else False: not
        launched by torchrun, a single process, or a group already running.
    """
    env = launch_env()
    if env is None or env.world_size == 1 or _dist_ready():
        return False
    if not torch.distributed.is_available():
        raise DistributedError("This PyTorch build has no torch.distributed support.")
    dev = rank_device(device, env.local_rank)
    chosen = choose_backend(dev, backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group(
        backend=chosen, init_method="env://", rank=env.rank, world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    logger.info("Rank %d/%d started (%s on %s).", env.rank, env.world_size, chosen, dev)
    return True


def cleanup() -> None:
    """Destroy the process group if one is running (idempotent)."""
    if _dist_ready():
        torch.distributed.destroy_process_group()


@contextmanager
def distributed_session(device: str | torch.device | None = "auto", backend: str = "auto") -> Iterator[bool]:
    """Context in which a torchrun-launched program is distributed; a no-op otherwise.

    Yields:
        Whether more than one process takes part.
    """
    started = init_distributed(device, backend)
    try:
        yield is_distributed()
    finally:
        if started:
            cleanup()


# ----------------------------------------------------------------------------------- collectives
def _collective_device() -> torch.device:
    if _dist_ready() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank arrives (no-op in a single process)."""
    if not is_distributed():
        return
    if torch.distributed.get_backend() == "nccl":
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Element-wise sums over ranks, returned on each tensor's own device and dtype.

    The inputs are not modified; in a single process copies of them are returned.
    """
    if not is_distributed():
        return [t.clone() for t in tensors]
    dev = _collective_device()
    out = []
    for t in tensors:
        buf = t.detach().to(dev, dtype=torch.float64 if t.is_floating_point() else torch.int64, copy=True)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        out.append(buf.to(t.device, t.dtype))
    return out


def all_reduce_mean(value: float) -> float:
    """Mean of a Python number over ranks (the value itself in a single process)."""
    if not is_distributed():
        return float(value)
    (total,) = all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64))
    return float(total[0]) / get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's (picklable) ``obj``, in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def fingerprint(obj: Any) -> str:
    """SHA-256 of a JSON-able object (keys sorted): compares plans or case lists across ranks."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def replica_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and exact bytes of a module's state dict."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ranks_disagreeing(value: str) -> list[int]:
    """Ranks whose ``value`` differs from rank 0's (empty when all agree or not distributed)."""
    values = all_gather_object(value)
    return [r for r, v in enumerate(values) if v != values[0]]


def check_same_on_all_ranks(obj: Any, what: str) -> None:
    """Raise on every rank unless all ranks hold the same JSON-able ``obj``.

    Raises:
        DistributedError: naming the ranks that differ from rank 0.
    """
    differ = ranks_disagreeing(fingerprint(obj))
    if differ:
        raise DistributedError(
            f"The {what} differs between ranks {differ} and rank 0; every rank must see the same "
            "dataset folder and settings."
        )


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` when distributed; return it unchanged otherwise.

    Wrapping broadcasts rank 0's parameters and buffers, so every replica starts from the same
    weights (resumed, fine-tuned or freshly initialised). Unused parameters are looked for in every
    step: deep supervision gives the lowest-resolution head a loss weight of 0, and some
    architectures leave branches out of the training loss, which plain DDP refuses.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=ids, output_device=ids[0] if ids else None, find_unused_parameters=True
    )


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def write_rank_report(report: dict, folder: str | None) -> str | None:
    """Write ``report`` as ``rank{R}.json`` into ``folder`` (``TrainConfig.rank_report_dir``); nothing
    when ``folder`` is ``None``.

    Returns:
        The file written, or ``None``.
    """
    if not folder:
        return None
    path = os.path.join(folder, f"rank{get_rank()}.json")
    atomic_write_json(path, report, make_parents=True)
    return path


__all__ = [
    "BACKENDS", "DistributedError", "LaunchEnv", "all_gather_object", "all_reduce_mean",
    "all_reduce_sum", "barrier", "check_same_on_all_ranks", "choose_backend", "cleanup", "distributed_session",
    "fingerprint", "get_local_rank", "get_rank", "get_world_size", "init_distributed", "is_distributed",
    "is_main_process", "launch_env", "rank_device", "ranks_disagreeing", "replica_fingerprint",
    "require_process_group", "unwrap_model",
    "wrap_model", "write_rank_report",
]
