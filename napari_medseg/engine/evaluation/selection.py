"""Model selection as nnU-Net (v1) does it: every configuration and every pairwise ensemble is
scored by mean foreground Dice on held-out cases, and the best is recorded.

Isensee et al., "nnU-Net", Nature Methods 18, 2021 (``nnUNet_find_best_configuration``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Generator

import numpy as np

from napari_medseg.engine.data import load_raw_dataset, read_raw_case
from napari_medseg.engine.evaluation.metrics import dice_per_class
from napari_medseg.engine.inference import predict
from napari_medseg.engine.jobs import Message, Progress
from napari_medseg.errors import MedsegError
from napari_medseg.io.atomic import read_json_object


class SelectionError(MedsegError, ValueError):
    """The runs cannot be compared."""


def _run_checkpoint(run_dir: str) -> str:
    for name in ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_latest.pt"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return path
    raise SelectionError(f"No checkpoint in {run_dir}: train it first.")


def _val_cases(run_dir: str) -> list[str]:
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise SelectionError(f"{run_dir} has no run.json; it is not a napari-medseg run folder.")
    info = read_json_object(path, SelectionError, "a run's record (an object).")
    if info.get("val_is_train"):
        raise SelectionError(f"{run_dir} was validated on its training data; it cannot be compared fairly.")
    cases = info.get("val_cases", [])
    if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
        raise SelectionError(f"{path}: 'val_cases' must be a list of case names, got {cases!r}.")
    return list(cases)


def find_best(
    dataset_dir: str, runs: dict[str, str], *, device: str = "auto", mirror: bool = True
) -> Generator[Progress | Message, None, dict]:
    """Score each run and each pair of runs (softmax averaged) on their common validation cases.

    Args:
        dataset_dir: The nnU-Net raw dataset the runs were trained on.
        runs: Candidate name -> run folder (with ``run.json`` and a checkpoint).
        device: Inference device.
        mirror: Mirroring test-time augmentation.

    Returns:
        ``{"scores": {candidate: mean foreground Dice}, "best": candidate, "cases": [...],
        "members": {candidate: [run names]}}``; an ensemble is named ``"a+b"``.

    Raises:
        SelectionError: no runs, a run without ``run.json`` (or one that is no JSON object) or
            checkpoint, no common validation case, validation cases the dataset does not label,
            or no foreground to score (every score would be NaN).
    """
    if not runs:
        raise SelectionError("No runs to compare.")
    raw = load_raw_dataset(dataset_dir)
    common = None
    for run_dir in runs.values():
        cases = set(_val_cases(run_dir))
        common = cases if common is None else common & cases
    if not common:
        raise SelectionError(
            "The runs share no validation case; train them with the same --seed and --val-fraction."
        )
    by_name = {c.name: c for c in raw.cases}
    unknown = sorted(n for n in common if n not in by_name or by_name[n].label_path is None)
    if unknown:
        raise SelectionError(
            f"{len(unknown)} validation case(s) of the runs are not labelled cases of {raw.root}: {unknown[:5]}. "
            "Were the runs trained on this dataset?"
        )
    names = sorted(common)
    ckpts = {name: _run_checkpoint(d) for name, d in runs.items()}
    candidates = {name: [name] for name in runs}
    for a, b in itertools.combinations(sorted(runs), 2):
        candidates[f"{a}+{b}"] = [a, b]
    fg = [k for k in raw.labels if int(k) != 0]
    per_candidate: dict[str, list[float]] = {c: [] for c in candidates}
    for i, case_name in enumerate(names):
        rc = by_name[case_name]
        image, spacing, ref = read_raw_case(rc)
        probs = {}
        for run_name, ckpt in ckpts.items():
            result = yield from predict(
                image, spacing, [ckpt], device=device, mirror=mirror, return_probabilities=True
            )
            probs[run_name] = result.probabilities
        for cand, members in candidates.items():
            mean_prob = sum(probs[m] for m in members) / len(members)
            pred = mean_prob.argmax(0)
            scores = dice_per_class(pred, ref, [int(k) for k in fg])
            vals = [v for v in scores.values() if not np.isnan(v)]
            per_candidate[cand].append(float(np.mean(vals)) if vals else float("nan"))
        yield Progress("cases", i + 1, len(names), case_name)
    scores = {c: float(np.mean([x for x in v if not np.isnan(x)])) if any(not np.isnan(x) for x in v) else float("nan")
              for c, v in per_candidate.items()}
    if any(np.isnan(v) for v in scores.values()):
        raise SelectionError(
            f"No foreground in the validation cases {names[:5]} (references and predictions are empty), so "
            "there is no Dice to compare the runs by."
        )
    best = max(scores, key=lambda c: (scores[c], -len(candidates[c])))
    yield Message(f"Best: {best} (mean foreground Dice {scores[best]:.4f})")
    return {"scores": scores, "best": best, "cases": names, "members": candidates,
            "checkpoints": {c: [ckpts[m] for m in members] for c, members in candidates.items()}}
