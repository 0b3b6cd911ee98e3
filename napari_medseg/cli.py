"""``napari-medseg``: the engine without a GUI.

Subcommands: ``plan``, ``train``, ``predict``, ``fill``, ``evaluate``, ``find-best``, ``models``, ``view``.
Each drives the same generators as the widgets (DESIGN.md convention 2) with tqdm progress bars.
Heavy imports (torch, the engine) happen inside the subcommands so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import __version__
from .errors import MedsegError

logger = logging.getLogger("napari_medseg")


# --------------------------------------------------------------------------- helpers
class TerminalProgress:
    """An ``on_event`` callback for the API's long jobs: one tqdm bar per stage on stderr, epoch
    lines and messages above them (``quiet`` shows nothing). When ``stop`` is set (a signal
    arrived), it raises ``Cancelled``: the job stops at this event, after its own clean-up."""

    def __init__(self, quiet: bool = False, stop: Any = None) -> None:
        self.quiet = quiet
        self.stop = stop
        self.bars: dict[str, Any] = {}

    def __call__(self, event: Any) -> None:
        from tqdm import tqdm

        from .engine.jobs import Cancelled, EpochEnd, Message, Progress

        if self.stop is not None and self.stop.is_set():
            raise Cancelled()
        if self.quiet:
            return
        if isinstance(event, Progress):
            bar = self.bars.get(event.stage)
            if bar is None or (event.total and bar.total != event.total) or event.current < bar.n:
                if bar is not None:
                    bar.close()
                bar = self.bars[event.stage] = tqdm(
                    total=event.total or None, desc=event.stage, leave=False, dynamic_ncols=True, file=sys.stderr,
                )
            bar.update(event.current - bar.n)
            if event.message:
                bar.set_postfix_str(event.message, refresh=False)
        elif isinstance(event, EpochEnd):
            dice = ", ".join(f"{k} {v:.3f}" for k, v in event.val_dice.items())
            val = f"{event.val_loss:.4f}" if event.val_loss is not None else "-"
            tqdm.write(
                f"epoch {event.epoch + 1}/{event.epochs}  train loss {event.train_loss:.4f}  "
                f"val loss {val}  Dice [{dice}]  lr {event.lr:.2e}  {event.elapsed_s:.0f}s",
                file=sys.stderr,
            )
        elif isinstance(event, Message):
            tqdm.write(f"[{event.level}] {event.text}", file=sys.stderr)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


@contextmanager
def terminal_progress(quiet: bool = False) -> Iterator[TerminalProgress]:
    """A :class:`TerminalProgress` that stops the job on SIGINT/SIGTERM; bars closed at the end."""
    from .engine.jobs import Cancelled, stop_on_signals

    with stop_on_signals() as stop:
        progress = TerminalProgress(quiet, stop)
        try:
            yield progress
        except Cancelled:
            if not stop.is_set():
                raise
            raise StoppedBySignal(stop.signum) from None
        finally:
            progress.close()


class StoppedBySignal(Exception):
    """A command stopped cleanly because of SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _json_arg(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: --model-kwargs is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise SystemExit("error: --model-kwargs must be a JSON object, e.g. '{\"base_width\": 16}'")
    return value


def _ints(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v)
    except ValueError:
        raise SystemExit(f"error: expected sizes like 64x64x64, got {text!r}") from None


def _mirror_axes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    return () if text.strip().lower() == "none" else _ints(text)


# --------------------------------------------------------------------------- commands
def cmd_plan(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import api

    with tqdm(desc="fingerprint", leave=False, file=sys.stderr) as bar:
        plans = api.plan(args.dataset, args.output, on_case=lambda name: bar.update(1), overwrite=args.overwrite)
    for name, plan in plans.items():
        print(
            f"{name:20s} patch {'x'.join(map(str, plan.patch_size)):>12s}  batch {plan.batch_size:4d}  "
            f"spacing {'x'.join(f'{s:.3g}' for s in plan.spacing)}  pools {len(plan.pool_kernels)}"
        )
    print(f"wrote {args.output or os.path.join(args.dataset, 'plans.json')}")
    return 0


def _train_config(args: argparse.Namespace) -> Any:
    from .api import TrainConfig

    config = _config_file(args.config, TrainConfig) if args.config else TrainConfig()
    overrides = {
        "output_dir": args.output,
        "model": args.model,
        "configuration": args.configuration,
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
        "minutes": args.minutes,
        "warmup": args.warmup,
        "val_batches": args.val_batches,
        "val_fraction": args.val_fraction,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "batch_size": args.batch_size,
        "patch_size": _ints(args.patch_size),
        "device": args.device,
        "seed": args.seed,
        "init_checkpoint": args.init_checkpoint,
        "resume": args.resume,
        "ignore_label": args.ignore_label,
        "loss": args.loss,
        "mirror_axes": _mirror_axes(args.mirror_axes),
        "early_stopping_patience": args.early_stopping,
        "num_threads": args.threads,
        "rank_report_dir": args.rank_report,
        "overwrite": args.overwrite or None,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if args.previous_stage:  # the cascade's option, kept with the variant's other settings
        config.variant_options["previous_stage"] = args.previous_stage
    if args.model_kwargs:
        config.model_kwargs = _json_arg(args.model_kwargs)
    if args.no_augment:
        config.augment = False
    if args.augment is not None:
        config.augment = {"default": True, "none": False, "synth": "synth"}[args.augment]
    if args.no_deep_supervision:
        config.deep_supervision = False
    if args.no_amp:
        config.amp = False
    if args.resume and not args.output:
        config.output_dir = os.path.dirname(os.path.abspath(args.resume))
    if args.minutes and args.epochs is None:
        config.epochs = 10**6  # the budget decides
    return config


def _config_file(text: str, config_class: Any) -> Any:
    """``--config``: a JSON file of settings (or the JSON object itself); errors name the file."""
    inline = text.lstrip().startswith("{")
    where = "--config" if inline else text
    try:
        if inline:
            value = json.loads(text)
        else:
            with open(text, encoding="utf-8") as fh:
                value = json.load(fh)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read {where}: {err}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"error: {where} must hold a JSON object of settings, not a {type(value).__name__}")
    try:
        return config_class.from_dict(value)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {where}: {err}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from . import api
    from .engine.runtime.distributed import distributed_session, is_main_process

    config = _train_config(args)
    # Under torchrun: one process per GPU (NCCL) or per CPU share (gloo); only rank 0 prints.
    with distributed_session(config.device, backend=args.dist_backend):
        main_rank = is_main_process()
        with terminal_progress(args.quiet or not main_rank) as progress:
            path = api.train(config, args.dataset, on_event=progress)
    if main_rank:
        print(f"checkpoint: {path}")
    return 0


#: ``--format`` -> the output file ending.
OUTPUT_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".dcm"}


def cmd_predict(args: argparse.Namespace) -> int:
    from . import api
    from .engine.inference.config import DomainError
    from .io import WRITE_EXTENSIONS, check_outputs

    inputs = _list_inputs(args.input)
    if not inputs:
        raise SystemExit(f"error: no image files or DICOM series found at {args.input}")
    out_lower = args.output.lower()
    suffix = os.path.splitext(os.path.basename(os.path.normpath(out_lower)))[1]
    if (not os.path.isdir(args.output) and not out_lower.endswith(WRITE_EXTENSIONS)
            and 1 < len(suffix) <= 6 and suffix[1:].isalnum()):
        raise SystemExit(f"error: {args.output}: unknown output format {suffix!r}; name a file ending in "
                         f"{', '.join(WRITE_EXTENSIONS)} (any case), or an output folder (create it first if "
                         "its name has a dot)")
    if len(inputs) == 1 and out_lower.endswith(WRITE_EXTENSIONS) and not os.path.isdir(args.output):
        outputs = [args.output]
    else:
        if out_lower.endswith(WRITE_EXTENSIONS):
            raise SystemExit(f"error: {len(inputs)} inputs need an output folder, not the file name {args.output}")
        ending = OUTPUT_FORMATS[args.format or ("dicom-seg" if all(_is_dicom(p) for p in inputs) else "nifti")]
        outputs = [os.path.join(args.output, _case_name(p) + ending) for p in inputs]
    config = api.PredictConfig(
        device=args.device, mirror=not args.no_mirror, step=args.step, batch_size=args.batch_size,
        largest_component=args.largest_component, save_probabilities=args.save_probabilities,
        overwrite=args.overwrite, force=args.force,
    )
    check_outputs(outputs, inputs, overwrite=args.overwrite)  # all of them, before any compute
    if outputs != [args.output]:
        os.makedirs(args.output, exist_ok=True)  # the output folder, once nothing is refused
    for src, dst in zip(inputs, outputs):
        try:
            with terminal_progress(args.quiet) as progress:
                api.predict_file(src, dst, args.checkpoint, config, on_event=progress)
        except DomainError as err:  # found before any compute; nothing was written for this input
            print(f"error: {src}: {err} Pass --force to segment anyway.", file=sys.stderr)
            return 2
        print(f"{src} -> {dst}")
    return 0


def _is_dicom(path: str) -> bool:
    """A DICOM file, or a folder holding DICOM files itself (a series; a folder of series folders
    is a batch of inputs)."""
    from .io import volume_format
    from .io.dicom_scan import looks_like_dicom

    if os.path.isdir(path):
        files = (os.path.join(path, f) for f in sorted(os.listdir(path)) if not f.startswith("."))
        return any(os.path.isfile(f) and looks_like_dicom(f) for f in files)
    return volume_format(path) == "dicom"


def _case_name(path: str) -> str:
    from .io import volume_stem

    name = volume_stem(path)
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]  # nnU-Net channel suffix _0000
    return name


def _list_inputs(path: str) -> list[str]:
    """The images to segment at ``path``: a file, a DICOM series folder, or a folder of image files
    and DICOM series folders (multi-channel nnU-Net cases by their ``_0000`` file)."""
    from .io import is_volume_path, volume_stem

    if os.path.isfile(path) or (os.path.isdir(path) and _is_dicom(path)):
        return [path]
    if not os.path.isdir(path):
        raise SystemExit(f"error: {path} does not exist")
    entries = sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
    found = [e for e in entries if (os.path.isdir(e) and _is_dicom(e))
             or (os.path.isfile(e) and is_volume_path(e) and not e.lower().endswith(".dcm"))]
    # Multi-channel cases (_0000, _0001, ...) are predicted from their first channel file.
    return [f for f in found if _case_name(f) == volume_stem(f) or volume_stem(f).endswith("_0000")]


def _slice_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise SystemExit(f"error: expected slice indices like 10,20,30, got {text!r}") from None


def cmd_fill(args: argparse.Namespace) -> int:
    """Fill the slices between painted ones (no model) and write the result in the source geometry."""
    import numpy as np

    from .engine.annotation import fill_between_slices, painted_slices
    from .io import check_outputs, read_volume, write_volume

    check_outputs([args.output], [args.labels], overwrite=args.overwrite)  # before any reading
    volume = read_volume(args.labels)
    data = np.asarray(volume.data)
    if volume.channel_axis is not None:
        raise SystemExit(f"error: {args.labels} has {data.shape[0]} channels; fill needs one label map")
    if data.dtype.kind == "f":  # labels stored as floats by some tools
        if not np.array_equal(data, np.round(data)):
            raise SystemExit(f"error: {args.labels} holds non-integer values; fill needs a label map")
        data = data.astype(np.int64)
    slices = _slice_list(args.slices)
    filled = fill_between_slices(data, axis=args.axis, slices=slices)
    names = volume.header.get("label_names") if isinstance(volume.header, dict) else None
    write_volume(args.output, filled, volume, is_label=True, label_names=names or None)
    used = painted_slices(data, args.axis) if slices is None else sorted(set(slices))
    shown = ", ".join(map(str, used[:12])) + (", ..." if len(used) > 12 else "")
    print(f"{args.labels} -> {args.output}: filled between {len(used)} painted slice(s) along axis {args.axis} "
          f"[{shown}]")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import api
    from .engine.evaluation import format_table

    labels = api.dataset_label_names(args.labels) if args.labels else None
    out = args.json or os.path.join(args.predictions, "summary.json")
    result = api.evaluate(args.predictions, args.reference, labels, summary_json=out)
    print(format_table(result))
    print(f"wrote {out}")
    return 0


def cmd_find_best(args: argparse.Namespace) -> int:
    from . import api
    from .io.atomic import atomic_write_json

    runs = {}
    for item in args.run:
        if "=" in item:
            name, path = item.split("=", 1)
        else:
            name, path = os.path.basename(os.path.normpath(item)), item
        runs[name] = path
    with terminal_progress(args.quiet) as progress:
        result = api.find_best(args.dataset, runs, device=args.device, mirror=not args.no_mirror, on_event=progress)
    for name, score in sorted(result["scores"].items(), key=lambda kv: -kv[1]):
        print(f"{name:40s} mean foreground Dice {score:.4f}")
    print(f"best: {result['best']}")
    out = args.output or os.path.join(args.dataset, "best_configuration.json")
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from . import api

    rows = []
    for m in api.describe_models():
        params = m["parameters"] if isinstance(m["parameters"], str) else f"{m['parameters'] / 1e6:.2f}M"
        rows.append((m["name"], m["family"], "/".join(f"{d}D" for d in m["dims"]), params, m["description"]))
    if args.json:
        print(json.dumps([dict(zip(("name", "family", "dims", "parameters", "description"), r)) for r in rows], indent=2))
        return 0
    widths = [max(len(r[i]) for r in rows + [("name", "family", "dims", "params", "")]) for i in range(4)]
    header = ("name", "family", "dims", "params")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  description")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    print("\ncheckpoints (use the name with -c, --init-checkpoint, or in Python):")
    for info in api.list_checkpoints():
        stem = os.path.splitext(os.path.basename(info.path))[0]
        source = "shipped" if info.shipped else "yours"
        segments = ", ".join(info.foreground_names)
        print(f"  {stem}  [{source}, {info.model_name}]  {info.description or segments}")
        print(f"      segments: {segments}; data: {info.training_data or '-'}; file: {info.path}")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from ._launcher import launch_viewer  # imports napari: only here

    launch_viewer(args.files, sample=args.sample, run=not args.no_run)
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="napari-medseg",
        description="Medical image segmentation: plan, train, predict and evaluate from the terminal "
        "with the same engine as the napari plugin.",
    )
    p.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback (default: one line)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("plan", help="fingerprint a dataset and write plans.json (nnU-Net v1 planner)")
    s.add_argument("dataset", help="dataset folder in the nnU-Net raw format (imagesTr/, labelsTr/, dataset.json)")
    s.add_argument("-o", "--output", help="where to write plans.json (default: DATASET/plans.json)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing plans.json / fingerprint.json (never the dataset's own files)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser(
        "train", help="train or fine-tune a model on a dataset folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="distributed training: start the same command under torchrun, one process per GPU:\n"
        "  torchrun --standalone --nproc_per_node=4 -m napari_medseg.cli train DATASET -o RUN\n"
        "Each process trains on its own batches of --batch-size patches (global batch = N x batch\n"
        "size, as nnU-Net v2), gradients are averaged by DistributedDataParallel (NCCL on GPUs, gloo\n"
        "on CPU), validation is pooled over processes, and only rank 0 prints and writes checkpoints.",
    )
    s.add_argument("dataset", help="dataset folder in the nnU-Net raw format")
    s.add_argument("-o", "--output", help="run folder for checkpoints and run.json (default: medseg_run)")
    s.add_argument("--config", help="a JSON file of TrainConfig fields (or the JSON object itself); flags override it")
    s.add_argument("-m", "--model", help="registered model name (see `napari-medseg models`)")
    s.add_argument("-c", "--configuration", help="planner configuration: 2d, 3d_fullres, 3d_lowres (default: the model's)")
    s.add_argument("--model-kwargs", help="JSON object of architecture kwargs, e.g. '{\"base_width\": 16}'")
    s.add_argument("--epochs", type=int)
    s.add_argument("--iterations", type=int, help="iterations per epoch (nnU-Net: 250)")
    s.add_argument("--minutes", type=float,
                   help="time budget: train this long (or --epochs, whichever ends first); the learning "
                   "rate follows the time, so a short run anneals fully; without --optimizer, Adam 1e-3 (on "
                   "the CPU the patch is capped at 64^3 voxels unless --patch-size is given)")
    s.add_argument("--warmup", type=float,
                   help="share of the run with a linear learning-rate warm-up (default: 0.05 when "
                   "fine-tuning with --minutes, else none)")
    s.add_argument("--val-batches", type=int, help="validation batches per epoch")
    s.add_argument("--val-fraction", type=float, help="fraction of cases held out for validation")
    s.add_argument("--lr", type=float, help="initial learning rate (default: the model's recipe, nnU-Net's SGD 1e-2; with --minutes Adam 1e-3)")
    s.add_argument("--optimizer", choices=["sgd", "adam", "lookahead_nadam"])
    s.add_argument("--batch-size", type=int, help="override the plan's batch size")
    s.add_argument("--patch-size", help="override the plan's patch size, e.g. 32x64x64")
    s.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    s.add_argument("--seed", type=int)
    s.add_argument("--init-checkpoint", help="fine-tune from this checkpoint (its plan is kept)")
    s.add_argument("--resume", help="continue this checkpoint (model, optimiser, epoch)")
    s.add_argument("--previous-stage", help="for -c 3d_cascade_fullres: the trained 3d_lowres checkpoint")
    s.add_argument("--ignore-label", type=int, help="label value that contributes nothing to the loss")
    s.add_argument("--loss", choices=["dice_ce", "soft_dice", "ce"], help="default: the model's recipe")
    s.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a lower validation loss")
    s.add_argument("--threads", type=int, help="CPU threads for torch")
    s.add_argument("--no-augment", action="store_true", help="turn data augmentation off")
    s.add_argument("--augment", choices=["default", "none", "synth"],
                   help="augmentation: default (nnU-Net's), none, or synth: half the patches painted "
                   "from the label maps with random contrast, shape, resolution and artefacts (domain "
                   "randomisation, for data sets with few label maps; see docs/synth.md)")
    s.add_argument("--mirror-axes", help="patch axes to mirror in training and test-time augmentation, "
                   "e.g. 2 (left-right only for brain anatomy) or none; default all")
    s.add_argument("--no-deep-supervision", action="store_true")
    s.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    s.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="under torchrun: process-group backend (auto: nccl on CUDA, gloo on CPU)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoints of an existing run folder (default: refuse; --resume continues it)")
    s.add_argument("--rank-report", metavar="DIR",
                   help="under torchrun: each process writes rank{R}.json (its replica's weight "
                   "fingerprints and losses) into DIR, to check that the replicas stayed identical")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("predict", help="segment an image file, a DICOM series, or a folder of them")
    s.add_argument("input", help="a NIfTI/NRRD/MHA file, a DICOM series folder, or a folder of these "
                   "(nnU-Net _0000 suffixes understood)")
    s.add_argument("-o", "--output", required=True,
                   help="output file (one input; .nii.gz, .nrrd, .mha, or .dcm for a DICOM-SEG of a DICOM "
                   "input) or folder")
    s.add_argument("--format", choices=sorted(OUTPUT_FORMATS),
                   help="file format in an output folder (default: dicom-seg for DICOM inputs, else nifti)")
    s.add_argument("-c", "--checkpoint", required=True, action="append",
                   help="checkpoint file; repeat to ensemble (softmax averaged)")
    s.add_argument("--device", default="auto")
    s.add_argument("--step", type=float, default=0.5, help="tile step as a fraction of the patch")
    s.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass")
    s.add_argument("--no-mirror", action="store_true", help="no mirroring test-time augmentation")
    lcc = s.add_mutually_exclusive_group()
    lcc.add_argument("--largest-component", dest="largest_component", action="store_const", const=True,
                     default=None, help="keep the largest component per class (per side for classes that "
                     "hold left and right); default: as the checkpoint recommends (the shipped brain model: on)")
    lcc.add_argument("--no-largest-component", dest="largest_component", action="store_const", const=False,
                     help="keep every component, even where the checkpoint recommends the largest only")
    s.add_argument("--save-probabilities", action="store_true", help="also write softmax probabilities")
    s.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (an input is never replaced)")
    s.add_argument("--force", action="store_true",
                   help="segment even images far outside the model's training domain (another modality, "
                   "much coarser voxels); without it such an image stops with an error before any compute")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("fill", help="fill the slices between painted ones (shape-based interpolation, no model)")
    s.add_argument("labels", help="a label map painted on some slices (NIfTI/NRRD/MHA file, DICOM-SEG)")
    s.add_argument("-o", "--output", required=True, help="output label file (.nii.gz, .nrrd, .mha, .dcm)")
    s.add_argument("--axis", type=int, default=0,
                   help="the axis painted across, napari order (z, y, x): 0 = the file's last voxel axis "
                   "(default 0)")
    s.add_argument("--slices", help="painted slice indices, e.g. 10,20,30 (default: the slices holding any "
                   "label; list a slice painted as all background to end the objects there)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (the input is never replaced)")
    s.set_defaults(func=cmd_fill)

    s = sub.add_parser("evaluate", help="Dice and HD95 (mm) of a folder of predictions against labels")
    s.add_argument("predictions", help="folder of predicted label files")
    s.add_argument("reference", help="folder of reference label files with the same names")
    s.add_argument("--labels", help="dataset.json giving label names (default: beside REFERENCE)")
    s.add_argument("--json", help="where to write the JSON summary (default: PREDICTIONS/summary.json)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("find-best", help="compare trained configurations and their pairwise ensembles")
    s.add_argument("dataset", help="the dataset folder the runs were trained on")
    s.add_argument("run", nargs="+", help="run folders, optionally NAME=FOLDER")
    s.add_argument("-o", "--output", help="where to record the choice (default: DATASET/best_configuration.json)")
    s.add_argument("--device", default="auto")
    s.add_argument("--no-mirror", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_find_best)

    s = sub.add_parser("models", help="list the registered architectures with parameter counts")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("view", help="open napari with the plugin's widgets docked")
    s.add_argument("files", nargs="*", help="NIfTI files to open")
    s.add_argument("--sample", action="store_true", help="also open the Colin27 sample volume")
    s.add_argument("--no-run", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_view)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted after the subcommand too
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except StoppedBySignal as stop:
        print(f"stopped by {signal.Signals(stop.signum).name}; a training run saved checkpoint_latest.pt "
              "(continue it with --resume)", file=sys.stderr)
        return 128 + int(stop.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every failure becomes one line
        if args.debug:
            raise
        print(_one_line(err), file=sys.stderr)
        return 2 if isinstance(err, (MedsegError, ValueError, OSError, MemoryError)) else 1


def _one_line(err: BaseException) -> str:
    """``error: ...`` in one line. The package's errors (:class:`~napari_medseg.errors.MedsegError`,
    and the plain ValueErrors of argument checks) and OS errors carry a message written for the
    user, naming the file; anything else is a bug, shown by its type."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, MemoryError):
        return (f"error: out of memory ({text}); try a smaller input, or set MEDSEG_MAX_MEMORY_GB "
                "(--debug shows where)")
    if isinstance(err, OSError) and getattr(err, "filename", None) and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    if isinstance(err, (MedsegError, ValueError, OSError)):
        return f"error: {text}"
    return f"error: internal error ({type(err).__name__}: {text}); please report it (--debug shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())
