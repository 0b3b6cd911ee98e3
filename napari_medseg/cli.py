"""``napari-medseg``: the engine without a GUI.

Subcommands: ``plan``, ``train``, ``predict``, ``evaluate``, ``find-best``, ``models``, ``view``.
Each drives the same generators as the widgets (DESIGN.md convention 2) with tqdm progress bars.
Heavy imports (torch, the engine) happen inside the subcommands so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Generator, Sequence
from typing import Any

from . import __version__

logger = logging.getLogger("napari_medseg")


# --------------------------------------------------------------------------- helpers
def drive(gen: Generator, *, quiet: bool = False) -> Any:
    """Run an engine generator to completion with one tqdm bar per stage; return its result.

    Ctrl-C closes the generator, so training saves a resumable checkpoint before exiting.
    """
    from tqdm import tqdm

    from .engine.events import EpochEnd, Message, Progress

    bars: dict[str, tqdm] = {}
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            if quiet:
                continue
            if isinstance(event, Progress):
                bar = bars.get(event.stage)
                if bar is None or (event.total and bar.total != event.total) or event.current < bar.n:
                    if bar is not None:
                        bar.close()
                    bar = bars[event.stage] = tqdm(
                        total=event.total or None, desc=event.stage, leave=False, dynamic_ncols=True,
                        file=sys.stderr,
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
    except KeyboardInterrupt:
        gen.close()
        raise
    finally:
        for bar in bars.values():
            bar.close()


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


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- commands
def cmd_plan(args: argparse.Namespace) -> int:
    from .engine.checkpoint import to_plain
    from .engine.data import load_raw_dataset
    from .engine.planning import compute_fingerprint, plan_from_fingerprint, plans_to_json
    from .io import read_nifti

    raw = load_raw_dataset(args.dataset)

    def cases():
        import numpy as np
        from tqdm import tqdm

        for rc in tqdm(raw.cases, desc="fingerprint", leave=False, file=sys.stderr):
            vols = [read_nifti(p) for p in rc.image_paths]
            image = np.stack([v.data for v in vols])
            label = read_nifti(rc.label_path).data if rc.label_path else None
            yield image, vols[0].spacing, label

    fingerprint = compute_fingerprint(cases())
    plans = plan_from_fingerprint(
        fingerprint, modality=tuple(raw.modality),
        num_classes=max(raw.num_classes, int(fingerprint.get("num_classes") or 2)),
    )
    out = args.output or os.path.join(args.dataset, "plans.json")
    plans_to_json(plans, out)
    _write_json(os.path.join(os.path.dirname(os.path.abspath(out)), "fingerprint.json"), to_plain(fingerprint))
    for name, plan in plans.items():
        print(
            f"{name:20s} patch {'x'.join(map(str, plan.patch_size)):>12s}  batch {plan.batch_size:4d}  "
            f"spacing {'x'.join(f'{s:.3g}' for s in plan.spacing)}  pools {len(plan.pool_kernels)}"
        )
    print(f"wrote {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.training import TrainConfig, train

    if args.config:
        with open(args.config) as fh:
            config = TrainConfig.from_dict(json.load(fh))
    else:
        config = TrainConfig()
    overrides = {
        "output_dir": args.output,
        "model": args.model,
        "configuration": args.configuration,
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
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
        "previous_stage": args.previous_stage,
        "mirror_axes": _mirror_axes(args.mirror_axes),
        "early_stopping_patience": args.early_stopping,
        "num_threads": args.threads,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if args.model_kwargs:
        config.model_kwargs = _json_arg(args.model_kwargs)
    if args.no_augment:
        config.augment = False
    if args.no_deep_supervision:
        config.deep_supervision = False
    if args.no_amp:
        config.amp = False
    if args.resume and not args.output:
        config.output_dir = os.path.dirname(os.path.abspath(args.resume))
    from .engine.distributed import distributed_session, is_main_process

    # Under torchrun: one process per GPU (NCCL) or per CPU share (gloo); only rank 0 prints.
    with distributed_session(config.device, backend=args.dist_backend):
        main_rank = is_main_process()
        path = drive(train(config, args.dataset), quiet=args.quiet or not main_rank)
    if main_rank:
        print(f"checkpoint: {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .engine.inference import predict_file

    inputs = _list_inputs(args.input)
    if not inputs:
        raise SystemExit(f"error: no .nii/.nii.gz files found at {args.input}")
    single = len(inputs) == 1 and os.path.isfile(args.input)
    if single and (args.output.endswith(".nii") or args.output.endswith(".nii.gz")):
        outputs = [args.output]
    else:
        os.makedirs(args.output, exist_ok=True)
        outputs = [os.path.join(args.output, _case_name(p) + ".nii.gz") for p in inputs]
    for src, dst in zip(inputs, outputs):
        drive(
            predict_file(
                src, dst, args.checkpoint, device=args.device, mirror=not args.no_mirror, step=args.step,
                batch_size=args.batch_size, largest_component=args.largest_component,
                save_probabilities=args.save_probabilities,
            ),
            quiet=args.quiet,
        )
        print(f"{src} -> {dst}")
    return 0


def _case_name(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]  # nnU-Net channel suffix _0000
    return name


def _list_inputs(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise SystemExit(f"error: {path} does not exist")
    files = sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".nii.gz", ".nii"))
    )
    # Multi-channel cases (_0000, _0001, ...) are predicted from their first channel file.
    firsts = [f for f in files if not _has_channel_suffix(f) or f.endswith(("_0000.nii.gz", "_0000.nii"))]
    return firsts


def _has_channel_suffix(path: str) -> bool:
    return _case_name(path) != os.path.basename(path).split(".nii")[0]


def _label_names(args: argparse.Namespace, ref_dir: str) -> dict[int, str]:
    source = args.labels or os.path.join(os.path.dirname(os.path.abspath(ref_dir)), "dataset.json")
    if os.path.isfile(source):
        with open(source) as fh:
            labels = json.load(fh).get("labels", {})
        out = {}
        for k, v in labels.items():
            if str(k).lstrip("-").isdigit():
                out[int(k)] = str(v)
            else:
                out[int(v)] = str(k)
        return out
    return {}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .engine.checkpoint import to_plain
    from .engine.metrics import evaluate_folder, format_table

    labels = _label_names(args, args.reference)
    if not labels:
        import numpy as np

        from .io import read_nifti

        first = sorted(f for f in os.listdir(args.reference) if f.endswith((".nii", ".nii.gz")))
        if not first:
            raise SystemExit(f"error: no reference label files in {args.reference}")
        values = np.unique(read_nifti(os.path.join(args.reference, first[0])).data)
        labels = {int(v): f"class_{int(v)}" for v in values}
        labels[0] = "background"
    result = evaluate_folder(args.predictions, args.reference, labels)
    print(format_table(result))
    out = args.json or os.path.join(args.predictions, "summary.json")
    _write_json(out, to_plain(result))
    print(f"wrote {out}")
    return 0


def cmd_find_best(args: argparse.Namespace) -> int:
    from .engine.selection import find_best

    runs = {}
    for item in args.run:
        if "=" in item:
            name, path = item.split("=", 1)
        else:
            name, path = os.path.basename(os.path.normpath(item)), item
        runs[name] = path
    result = drive(find_best(args.dataset, runs, device=args.device, mirror=not args.no_mirror), quiet=args.quiet)
    for name, score in sorted(result["scores"].items(), key=lambda kv: -kv[1]):
        print(f"{name:40s} mean foreground Dice {score:.4f}")
    print(f"best: {result['best']}")
    out = args.output or os.path.join(args.dataset, "best_configuration.json")
    _write_json(out, result)
    print(f"wrote {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import count_parameters, create_model, get_model_spec, list_models

    rows = []
    for name in list_models():
        spec = get_model_spec(name)
        dims = spec.spatial_dims[-1]
        try:
            model = create_model(name, 1, 2, dims, **spec.default_kwargs)
            params = f"{count_parameters(model) / 1e6:.2f}M"
        except Exception as err:  # a model that cannot build is reported, not hidden
            params = f"error: {err}"
        rows.append((name, spec.family, "/".join(f"{d}D" for d in spec.spatial_dims), params, spec.description))
    if args.json:
        print(json.dumps([dict(zip(("name", "family", "dims", "parameters", "description"), r)) for r in rows], indent=2))
        return 0
    widths = [max(len(r[i]) for r in rows + [("name", "family", "dims", "params", "")]) for i in range(4)]
    header = ("name", "family", "dims", "params")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  description")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
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
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("plan", help="fingerprint a dataset and write plans.json (nnU-Net v1 planner)")
    s.add_argument("dataset", help="dataset folder in the nnU-Net raw format (imagesTr/, labelsTr/, dataset.json)")
    s.add_argument("-o", "--output", help="where to write plans.json (default: DATASET/plans.json)")
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
    s.add_argument("--config", help="a JSON file of TrainConfig fields; flags override it")
    s.add_argument("-m", "--model", help="registered model name (see `napari-medseg models`)")
    s.add_argument("-c", "--configuration", help="planner configuration: 2d, 3d_fullres, 3d_lowres (default: the model's)")
    s.add_argument("--model-kwargs", help="JSON object of architecture kwargs, e.g. '{\"base_width\": 16}'")
    s.add_argument("--epochs", type=int)
    s.add_argument("--iterations", type=int, help="iterations per epoch (nnU-Net: 250)")
    s.add_argument("--val-batches", type=int, help="validation batches per epoch")
    s.add_argument("--val-fraction", type=float, help="fraction of cases held out for validation")
    s.add_argument("--lr", type=float, help="initial learning rate (default: the model's recipe; nnU-Net 1e-2)")
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
    s.add_argument("--mirror-axes", help="patch axes to mirror in training and test-time augmentation, "
                   "e.g. 2 (left-right only for brain anatomy) or none; default all")
    s.add_argument("--no-deep-supervision", action="store_true")
    s.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    s.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="under torchrun: process-group backend (auto: nccl on CUDA, gloo on CPU)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("predict", help="segment a NIfTI file or a folder of them")
    s.add_argument("input", help="a .nii/.nii.gz file or a folder (nnU-Net _0000 suffixes understood)")
    s.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    s.add_argument("-c", "--checkpoint", required=True, action="append",
                   help="checkpoint file; repeat to ensemble (softmax averaged)")
    s.add_argument("--device", default="auto")
    s.add_argument("--step", type=float, default=0.5, help="tile step as a fraction of the patch")
    s.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass")
    s.add_argument("--no-mirror", action="store_true", help="no mirroring test-time augmentation")
    s.add_argument("--largest-component", action="store_true", help="keep the largest component per class")
    s.add_argument("--save-probabilities", action="store_true", help="also write softmax probabilities")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_predict)

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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        # Our errors are ValueError subclasses with a message written for the user.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
