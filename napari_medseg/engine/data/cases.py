"""Preprocessed training cases: from raw files or in-memory arrays, with an on-disk cache.

A :class:`Case` is an image ``(C, *grid)`` and its labels on the plan's grid
(:func:`~napari_medseg.engine.preprocessing.preprocess.preprocess_case`: crop, transpose, resample,
normalise). :func:`iter_preprocess_dataset` preprocesses a whole raw dataset and can keep the results
in a cache folder, written atomically (:mod:`napari_medseg.io.atomic`).

**Orientation.** :func:`read_case` reads a case's files with their geometry and can reorient the
image and labels to a training orientation (axis codes, see
:mod:`napari_medseg.engine.preprocessing.orientation`) by permutations and flips, so that the cases
of a dataset stored in different orientations (RAS NIfTI, LPS from DICOM converters, sagittal
acquisitions) reach the network in one layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from napari_medseg.engine.data.dataset import (
    DatasetError,
    RawCase,
    RawDataset,
    file_affine,
    read_case_label,
    read_image,
    read_raw_case,
)
from napari_medseg.engine.jobs import Progress
from napari_medseg.engine.planning import Plan
from napari_medseg.engine.preprocessing import (
    CaseProperties,
    OrientationError,
    orientation_codes,
    preprocess_case,
    reorientation,
)
from napari_medseg.io.atomic import atomic_path

_CACHE_VERSION = 1


@dataclass
class Case:
    """A preprocessed case: image ``(C, *grid)`` float32 and label ``(*grid)`` int16 on the plan grid."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    properties: CaseProperties


@dataclass
class CaseArrays:
    """A case before preprocessing: ``image (C, *spatial)``, its ``spacing``, ``label`` (or ``None``),
    ``orientation``, the axis codes of these arrays, and ``source``, those of the stored case (both
    ``None`` when the geometry is unknown)."""

    image: np.ndarray
    spacing: tuple[float, ...]
    label: np.ndarray | None
    orientation: str | None
    source: str | None = None


def file_orientation(path: str, ndim: int) -> str:
    """The axis codes (napari order) of the volume file at ``path`` (its geometry as remembered
    from the case's read: :func:`~napari_medseg.engine.data.dataset.file_affine`).

    Raises:
        DatasetError: the file cannot be read.
    """
    try:
        return orientation_codes(file_affine(path), ndim)
    except ValueError as err:
        raise DatasetError(f"Cannot read the geometry of {path}: {err}") from err


def orient_arrays(
    image: np.ndarray, spacing: Sequence[float], label: np.ndarray | None, codes: str | None,
    orientation: str | None,
) -> CaseArrays:
    """``image`` (``(C, *spatial)``) and ``label`` moved from ``codes`` to ``orientation`` by
    permutations and flips (spacing permuted alike); unchanged when either is ``None``.

    Raises:
        DatasetError: the two orientations do not share their world axes (2D images of other planes).
    """
    spacing = tuple(float(s) for s in spacing)
    if codes is None or orientation is None or codes == orientation:
        return CaseArrays(image, spacing, label, codes, codes)
    try:
        move = reorientation(codes, orientation)
    except OrientationError as err:
        raise DatasetError(f"Cannot bring a case to the training orientation: {err}") from err
    label = None if label is None else np.ascontiguousarray(move.apply(label))
    return CaseArrays(np.ascontiguousarray(move.apply(image)), move.apply_spacing(spacing), label, orientation, codes)


def read_case(raw_case: RawCase, orientation: str | None = None, codes: str | None = None) -> CaseArrays:
    """Read a case's files (:func:`~napari_medseg.engine.data.dataset.read_raw_case`), in ``orientation``.

    Args:
        raw_case: Paths of the case.
        orientation: Axis codes to reorient to (permutations and flips only); ``None`` keeps the
            files' layout.
        codes: The files' own axis codes when already known (their geometry is not read again).

    Returns:
        The arrays, with the codes of their layout.

    Raises:
        DatasetError: unreadable files or mismatched shapes.
    """
    image, spacing, label = read_raw_case(raw_case)
    if label is not None and label.shape != image.shape[1:]:
        raise DatasetError(
            f"Case {raw_case.name}: label shape {label.shape} differs from image shape {image.shape[1:]}"
        )
    if codes is None:
        codes = file_orientation(raw_case.image_paths[0], len(spacing))
    return orient_arrays(image, spacing, label, codes, orientation)


def check_label_values(label: np.ndarray, allowed: Iterable[int], source: str | None) -> None:
    """Raise DatasetError when ``label`` holds values outside ``allowed`` (``source`` names the file)."""
    allowed = set(allowed)
    found = set(np.unique(label).tolist())
    if not found <= allowed:
        raise DatasetError(
            f"Label file {source} contains values {sorted(found - allowed)} that are "
            f"not in dataset.json's labels {sorted(allowed)}"
        )


def load_case(
    raw_case: RawCase, plan: Plan, label_values: Iterable[int] | None = None, orientation: str | None = None
) -> Case:
    """Read a case's files and preprocess it with ``plan``.

    Args:
        raw_case: Paths of the case.
        plan: The configuration's plan.
        label_values: Allowed label values (``dataset.json``'s); default ``range(plan.num_classes)``.
        orientation: Axis codes to reorient the case to first (:func:`read_case`); ``None``: as stored.

    Raises:
        DatasetError: unreadable files, mismatched shapes, or label values not in ``label_values``.
    """
    if orientation is not None:
        arrays = read_case(raw_case, orientation)
        image, spacing, label = arrays.image, arrays.spacing, arrays.label
    else:
        image, spacing = read_image(raw_case)
        label = None
        if raw_case.label_path:
            label = read_case_label(raw_case)  # generation-only values: background unless kept
            if label.shape != image.shape[1:]:
                raise DatasetError(
                    f"Case {raw_case.name}: label shape {label.shape} differs from image shape {image.shape[1:]}"
                )
    if label is not None:
        allowed = range(plan.num_classes) if label_values is None else label_values
        check_label_values(label, allowed, raw_case.label_path)
    img, lab, props = preprocess_case(image, spacing, plan, label)
    return Case(raw_case.name, img, lab, props)


def case_from_arrays(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing: Sequence[float],
    plan: Plan,
    name: str = "layer",
    ignore_label: int | None = None,
) -> Case:
    """Preprocess in-memory arrays (e.g. napari layers) into a :class:`Case`.

    Args:
        image: ``(z, y, x)`` or ``(C, z, y, x)`` (2D: ``(y, x)`` / ``(C, y, x)`` with 2 spacings).
        label: Integer label map of the image's spatial shape, or ``None``.
        spacing: Spacing per spatial axis, napari order.
        plan: The configuration's plan.
        name: Name of the case.
        ignore_label: The label of unpainted voxels, if ``label`` is partly painted.
    """
    img, lab, props = preprocess_case(np.asarray(image), spacing, plan, label, ignore_label=ignore_label)
    return Case(name, img, lab, props)


# ---------------------------------------------------------------------------------------- caching
def _cache_key(rc: RawCase, plan: Plan) -> str:
    relevant = {k: plan.to_dict()[k] for k in ("spacing", "transpose_forward", "normalization",
                                              "intensity_stats", "use_mask_for_norm", "num_classes")}
    relevant["dims"] = plan.spatial_dims
    relevant["keep_generation"] = bool(rc.keep_generation and rc.generation_values)
    sources = []
    for p in [*rc.image_paths, rc.label_path]:
        if p:
            st = os.stat(p)
            sources.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": _CACHE_VERSION, "plan": relevant, "sources": sources}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _save_npy(path: str, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def _load_cached(cache_dir: str, rc: RawCase, key: str) -> Case | None:
    meta_path = os.path.join(cache_dir, f"{rc.name}.json")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("key") != key:
            return None
        image = np.load(os.path.join(cache_dir, f"{rc.name}_image.npy"))
        label = np.load(os.path.join(cache_dir, f"{rc.name}_label.npy")) if meta["has_label"] else None
        return Case(rc.name, image, label, CaseProperties.from_dict(meta["properties"]))
    except (OSError, ValueError, KeyError):
        return None


def _save_cached(cache_dir: str, case: Case, key: str) -> None:
    _save_npy(os.path.join(cache_dir, f"{case.name}_image.npy"), case.image)
    if case.label is not None:
        _save_npy(os.path.join(cache_dir, f"{case.name}_label.npy"), case.label)
    meta = {"key": key, "has_label": case.label is not None, "properties": case.properties.to_dict()}
    with atomic_path(os.path.join(cache_dir, f"{case.name}.json")) as tmp, open(tmp, "w") as fh:
        json.dump(meta, fh)  # written last: its key validates the arrays beside it


def iter_preprocess_dataset(
    raw: RawDataset, plan: Plan, cache_dir: str | os.PathLike | None = None
) -> Generator[Progress, None, list[Case]]:
    """Load and preprocess every training case of ``raw``, optionally caching the results.

    With ``cache_dir``, each case is stored as ``{name}_image.npy``, ``{name}_label.npy`` and
    ``{name}.json`` (properties and a key of the plan's preprocessing fields and the source files'
    sizes and modification times); a later call with the same plan and files reads the cache.

    Yields:
        A :class:`~napari_medseg.engine.jobs.Progress` per case.

    Returns:
        The preprocessed cases, in the dataset's order.
    """
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    if cache:
        os.makedirs(cache, exist_ok=True)
    cases = []
    for i, rc in enumerate(raw.cases):
        key = _cache_key(rc, plan) if cache else ""
        case = _load_cached(cache, rc, key) if cache else None
        if case is None:
            case = load_case(rc, plan, label_values=raw.labels.keys())
            if cache:
                _save_cached(cache, case, key)
        cases.append(case)
        yield Progress("preprocess", i + 1, len(raw.cases), rc.name)
    return cases


__all__ = [
    "Case", "CaseArrays", "case_from_arrays", "check_label_values", "file_orientation", "iter_preprocess_dataset",
    "load_case", "orient_arrays", "read_case",
]
