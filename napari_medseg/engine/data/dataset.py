"""Datasets in the nnU-Net raw format: scanning the folder and reading a case's files.

The raw format (nnU-Net v1 and v2)::

    Dataset/
      dataset.json      channels: "channel_names" (v2) or "modality" (v1): {"0": "CT", ...}
                        labels:   {"background": 0, "liver": 1} (v2) or {"0": "background", ...} (v1)
      imagesTr/{case}_{XXXX}.nii.gz    one file per channel XXXX = 0000, 0001, ...
      labelsTr/{case}.nii.gz
      imagesTs/...                     optional (labelsTs optional too)

The Medical Segmentation Decathlon layout (one possibly 4D file per case, no ``_XXXX`` suffix) is
accepted as well. Files are read through :mod:`napari_medseg.io`; preprocessing them into training
cases is :mod:`~napari_medseg.engine.data.cases`' job.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.io import Volume, read_volume
from napari_medseg.io._dtypes import to_float32
from napari_medseg.io.atomic import read_json_object
from napari_medseg.io.grid import grid_difference, grid_of

logger = logging.getLogger(__name__)

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: File endings a raw dataset may use (dataset.json's ``file_ending``, one per dataset, as nnU-Net v2).
DATASET_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class DatasetError(MedsegError, ValueError):
    """A folder is not a valid nnU-Net raw dataset, or one of its files does not fit it."""


@dataclass
class RawCase:
    """One case on disk: a file per channel (or one 4D file) and an optional label file.

    ``generation_values`` are the label values of the dataset's *generation-only* classes
    (``dataset.json``'s ``generation_labels``: e.g. white matter or scalp in a full label map made
    for domain randomisation). :func:`read_case_label` returns them as background unless
    ``keep_generation`` is set (the synthesising trainer sets it).
    """

    name: str
    image_paths: list[str]
    label_path: str | None = None
    generation_values: tuple[int, ...] = ()
    keep_generation: bool = False


@dataclass
class RawDataset:
    """A dataset in the nnU-Net raw format (see :func:`load_raw_dataset`)."""

    root: str
    cases: list[RawCase]
    labels: dict[int, str]
    channel_names: dict[int, str]
    num_channels: int
    num_classes: int
    modality: tuple[str, ...]
    test_images: list[RawCase] = field(default_factory=list)
    name: str = ""
    generation_labels: dict[int, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- raw
def _strip_ending(fname: str) -> str | None:
    for end in DATASET_FILE_ENDINGS:
        if fname.endswith(end):
            return fname[: -len(end)]
    return None


def parse_labels(raw: dict, consecutive: bool = True) -> dict[int, str]:
    """``{value: name}`` from dataset.json's ``labels``, nnU-Net v1 (``{"0": "background"}``) or v2
    (``{"background": 0}``) style; ``consecutive`` also requires the values 0..K-1 (training does).

    Raises:
        DatasetError: empty, region-based (list-valued) or unreadable labels.
    """
    if not isinstance(raw, dict) or not raw:
        raise DatasetError("dataset.json needs a non-empty 'labels' mapping")
    regions = {str(k): v for k, v in raw.items() if isinstance(v, (list, tuple, dict))}
    if regions:
        raise DatasetError(f"Region-based labels (lists of values) in dataset.json are not supported: {regions}")
    try:
        if all(str(k).lstrip("-").isdigit() for k in raw):  # v1: {"0": "background"}
            labels = {int(k): str(v) for k, v in raw.items()}
        else:  # v2: {"background": 0}
            bad = {str(k): v for k, v in raw.items()
                   if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer())}
            if bad:
                raise DatasetError(f"Label values in dataset.json must be integers, got {bad}")
            labels = {int(v): str(k) for k, v in raw.items()}
    except (TypeError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"Cannot read the 'labels' of dataset.json: {raw}") from err
    if consecutive and sorted(labels) != list(range(len(labels))):
        raise DatasetError(
            f"dataset.json labels must be consecutive integers from 0 (background); got {sorted(labels)}"
        )
    return labels


def _parse_channels(meta: dict) -> dict[int, str]:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise DatasetError("dataset.json needs 'channel_names' (nnU-Net v2) or 'modality' (v1)")
    try:
        chans = {int(k): str(v) for k, v in raw.items()}
    except ValueError as err:
        raise DatasetError(f"Channel keys in dataset.json must be integers, got {list(raw)}") from err
    if sorted(chans) != list(range(len(chans))):
        raise DatasetError(f"Channel keys in dataset.json must be 0..C-1, got {sorted(chans)}")
    return chans


def _scan_images(folder: str, num_channels: int, what: str) -> dict[str, list[str]]:
    """``{case: [path per channel]}`` of an images folder; checks every case has every channel."""
    files = sorted(f for f in os.listdir(folder) if not f.startswith(".") and _strip_ending(f))
    per_case: dict[str, dict[int, str]] = {}
    plain: list[str] = []
    for f in files:
        stem = _strip_ending(f)
        m = _CHANNEL_RE.match(stem)
        if m:
            per_case.setdefault(m["case"], {})[int(m["channel"])] = os.path.join(folder, f)
        else:
            plain.append(f)
    if per_case and plain:
        raise DatasetError(
            f"{what}: files {plain[:3]} do not follow the '{{case}}_{{XXXX}}.nii.gz' naming of the others"
        )
    if plain:  # Decathlon layout: one (possibly 4D) file per case
        return {_strip_ending(f): [os.path.join(folder, f)] for f in plain}
    cases = {}
    for name, chans in sorted(per_case.items()):
        missing = [f"{name}_{c:04d}" for c in range(num_channels) if c not in chans]
        extra = [f"{name}_{c:04d}" for c in chans if c >= num_channels]
        if missing:
            raise DatasetError(f"{what}: case {name!r} is missing channel file(s) {missing} "
                               f"(dataset.json lists {num_channels} channel(s))")
        if extra:
            raise DatasetError(f"{what}: case {name!r} has channel file(s) {extra} beyond the "
                               f"{num_channels} channel(s) in dataset.json")
        cases[name] = [chans[c] for c in range(num_channels)]
    return cases


def _scan_labels(folder: str | None, images: dict[str, list[str]], what: str) -> dict[str, str]:
    if folder is None or not os.path.isdir(folder):
        return {}
    labels = {}
    for f in sorted(os.listdir(folder)):
        stem = _strip_ending(f)
        if f.startswith(".") or stem is None:
            continue
        if stem not in images:
            raise DatasetError(f"{what}: label {f!r} has no image (expected {stem}_0000.nii.gz)")
        labels[stem] = os.path.join(folder, f)
    return labels


def load_raw_dataset(folder: str | os.PathLike) -> RawDataset:
    """Read the structure of a dataset in the nnU-Net raw format (no image is loaded).

    Raises:
        DatasetError: when the folder has no ``dataset.json`` or ``imagesTr``, a case lacks a
            channel file, a label has no image, or ``dataset.json`` is malformed. Label *values* are
            checked when cases are loaded (:func:`load_case`) or by :func:`verify_dataset`.
    """
    root = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(root):
        raise DatasetError(f"{root} is not a folder")
    meta_path = os.path.join(root, "dataset.json")
    images_tr = os.path.join(root, "imagesTr")
    if not os.path.isfile(meta_path) or not os.path.isdir(images_tr):
        raise DatasetError(
            f"{root} is not an nnU-Net raw dataset folder: it needs dataset.json and imagesTr/ "
            "(plus labelsTr/ for training)"
        )
    meta = read_json_object(meta_path, DatasetError, "an object of dataset settings")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in DATASET_FILE_ENDINGS:
        raise DatasetError(f"Unsupported file_ending {ending!r} in {meta_path}; supported: {', '.join(DATASET_FILE_ENDINGS)}")
    try:
        channels = _parse_channels(meta)
        labels = parse_labels(meta.get("labels"))
    except DatasetError as err:
        raise DatasetError(f"{meta_path}: {err}") from err
    generation = _parse_generation_labels(meta.get("generation_labels"), labels, meta_path)
    images = _scan_images(images_tr, len(channels), "imagesTr")
    if not images:
        raise DatasetError(f"{images_tr} contains no images ({', '.join(DATASET_FILE_ENDINGS)})")
    label_files = _scan_labels(os.path.join(root, "labelsTr"), images, "labelsTr")
    unlabelled = [n for n in images if n not in label_files]
    if unlabelled:
        logger.warning("%d training case(s) have no label file, e.g. %s", len(unlabelled), unlabelled[:3])
    cases = [RawCase(n, p, label_files.get(n), tuple(sorted(generation))) for n, p in images.items()]
    test = []
    images_ts = os.path.join(root, "imagesTs")
    if os.path.isdir(images_ts):
        ts = _scan_images(images_ts, len(channels), "imagesTs")
        ts_labels = _scan_labels(os.path.join(root, "labelsTs"), ts, "labelsTs")
        test = [RawCase(n, p, ts_labels.get(n)) for n, p in ts.items()]
    return RawDataset(
        root=root, cases=cases, labels=labels, channel_names=channels, num_channels=len(channels),
        num_classes=len(labels), modality=tuple(channels[i] for i in range(len(channels))),
        test_images=test, name=str(meta.get("name", os.path.basename(root))), generation_labels=generation,
    )


def _parse_generation_labels(value, labels: dict[int, str], meta_path: str) -> dict[int, str]:
    """``dataset.json``'s optional ``generation_labels`` (name -> value, like ``labels``)."""
    if value is None:
        return {}
    try:
        generation = parse_labels({"background": 0, **dict(value)}, consecutive=False)
    except (DatasetError, TypeError, ValueError) as err:
        raise DatasetError(f"{meta_path}: bad generation_labels: {err}") from err
    generation.pop(0)
    clash = sorted(set(generation) & set(labels))
    if clash:
        raise DatasetError(f"{meta_path}: generation_labels reuse the label values {clash} of labels")
    return generation


# ---------------------------------------------------------------------------------------- reading
#: Grids of the files read last, ``{(path, size, mtime): (spatial shape, napari-order matrix)}``:
#: a case's label file is checked against its image's grid without reading the image again.
#: ``(spatial shape, napari-order voxel-to-world matrix, RAS+ affine)`` of the volume files read lately.
_GRIDS: OrderedDict[tuple, tuple[tuple[int, ...], np.ndarray, np.ndarray]] = OrderedDict()
_GRIDS_KEPT = 512


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _read_volume_file(path: str) -> Volume:
    """Read ``path`` (remembering its grid).

    Raises:
        DatasetError: the file cannot be read (the message names it).
    """
    try:
        vol = read_volume(path)
        _GRIDS[_file_key(path)] = (*grid_of(vol), np.asarray(vol.affine, float))
    except ValueError as err:
        raise DatasetError(f"Cannot read {path}: {err}") from err
    while len(_GRIDS) > _GRIDS_KEPT:
        _GRIDS.popitem(last=False)
    return vol


def _file_geometry(path: str) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """``(spatial shape, napari-order voxel-to-world matrix, RAS+ affine)`` of a volume file
    (remembered from its last read; read when not)."""
    try:
        return _GRIDS[_file_key(path)]
    except (KeyError, OSError):
        vol = _read_volume_file(path)
        return (*grid_of(vol), np.asarray(vol.affine, float))


def _file_grid(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """``(spatial shape, napari-order voxel-to-world matrix)`` of a volume file (cached)."""
    shape, matrix, _ = _file_geometry(path)
    return shape, matrix


def file_affine(path: str) -> np.ndarray:
    """The RAS+ affine (``Volume.affine``) of a volume file, remembered from its last read (if the
    file is unchanged since), so reading a case and then its geometry reads its voxels once.

    Raises:
        DatasetError: the file cannot be read.
    """
    return _file_geometry(path)[2]


def _read_volume(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """``(data, spacing)`` in napari order; data ``(z, y, x)`` or channels-first ``(C, z, y, x)``."""
    vol = _read_volume_file(path)
    return np.asarray(vol.data), tuple(float(s) for s in vol.spacing)


def _as_label(data: np.ndarray, path: str) -> np.ndarray:
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.round(data)
        if not np.allclose(rounded, data):
            raise DatasetError(f"Label file {path} has non-integer values")
        data = rounded
    if data.size and (data.max() >= 2**15 or data.min() < -(2**15)):
        raise DatasetError(f"Label file {path} has values outside the int16 range")
    return data.astype(np.int16)


def read_label(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a label map: ``(int16 array in napari order, spacing)``.

    Raises:
        DatasetError: unreadable file, non-integer values or values that do not fit int16.
    """
    data, spacing = _read_volume(path)
    return _as_label(data, path), spacing


def read_label_volume(path: str) -> Volume:
    """A label map as a :class:`~napari_medseg.io.Volume` (int16 data, with its geometry).

    Raises:
        DatasetError: unreadable file, non-integer values or values that do not fit int16.
    """
    vol = _read_volume_file(path)
    vol.data = _as_label(np.asarray(vol.data), path)
    return vol


def check_on_grid(path: str, reference: str, what: str) -> None:
    """Refuse the volume file ``path`` unless it lies on the voxel grid of ``reference`` (shape, voxel
    size, axis directions, origin: :func:`napari_medseg.io.grid.grid_difference`). The widget
    applies the same comparison to layers.

    Raises:
        DatasetError: naming both files and what differs, with the numbers.
    """
    shape, matrix = _file_grid(path)
    ref_shape, ref_matrix = _file_grid(reference)
    if shape != ref_shape:
        raise DatasetError(f"{what}: {path} has shape {shape}, which differs from {reference}'s {ref_shape}")
    problem = grid_difference(shape, matrix, ref_shape, ref_matrix, ref_name=f"{os.path.basename(reference)}'s")
    if problem:
        raise DatasetError(
            f"{what}: {path} is not on the voxel grid of {reference}: {problem}. Same shape is not enough: "
            "the voxels would not correspond. Resample it onto that grid (or correct the header that is wrong)."
        )


def read_image(raw_case: RawCase) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a raw case's channel files: ``(image (C, *spatial) float32, spacing of channel 0)``.

    Raises:
        DatasetError: unreadable files, a multi-channel file among per-channel files, channel files
            of different shapes, or channel files on another grid than channel 0.
    """
    chans, spacing = [], None
    for p in raw_case.image_paths:
        data, sp = _read_volume(p)
        if spacing is None:
            spacing = sp
        if len(raw_case.image_paths) > 1 and data.ndim == len(sp) + 1:
            raise DatasetError(f"{p} has several channels, but case {raw_case.name} uses one file per channel")
        chans.extend(data if data.ndim == len(sp) + 1 else [data])
    shapes = {c.shape for c in chans}
    if len(shapes) != 1:
        raise DatasetError(f"Case {raw_case.name}: channel files have different shapes {sorted(shapes)}")
    for p in raw_case.image_paths[1:]:
        check_on_grid(p, raw_case.image_paths[0], f"Case {raw_case.name}")
    return to_float32(np.stack(chans), f"Case {raw_case.name}", DatasetError), spacing


def read_raw_case(raw_case: RawCase) -> tuple[np.ndarray, tuple[float, ...], np.ndarray | None]:
    """``(image (C, *sp) float32, spacing, label or None)`` of a raw case, before preprocessing."""
    image, spacing = read_image(raw_case)
    label = read_case_label(raw_case) if raw_case.label_path else None
    return image, spacing, label


def read_case_label(raw_case: RawCase, *, keep_generation: bool | None = None) -> np.ndarray:
    """The label map of a raw case, checked to lie on its image's grid (:func:`check_on_grid`);
    generation-only values become 0 unless ``keep_generation`` (default: the case's setting).

    Raises:
        DatasetError: unreadable file, values that are no labels, or another grid than the image's.
    """
    label, _ = read_label(raw_case.label_path)
    check_on_grid(raw_case.label_path, raw_case.image_paths[0], f"Case {raw_case.name}: label file")
    keep = raw_case.keep_generation if keep_generation is None else keep_generation
    if raw_case.generation_values and not keep:
        label = np.where(np.isin(label, raw_case.generation_values), 0, label).astype(label.dtype)
    return label


def verify_dataset(raw: RawDataset) -> None:
    """Read every training case and check its label values and that the label (and every channel)
    lies on the image's grid: shape, voxel size, axis directions and origin.

    Raises:
        DatasetError: on the first problem found.
    """
    allowed = set(raw.labels) | set(raw.generation_labels)
    for rc in raw.cases:
        if rc.label_path is None:
            continue
        read_image(rc)
        label = read_case_label(rc, keep_generation=True)
        bad = set(np.unique(label).tolist()) - allowed
        if bad:
            raise DatasetError(f"Label file {rc.label_path} contains values {sorted(bad)} that are not in "
                               f"dataset.json's labels {sorted(allowed)}")


__all__ = [
    "DatasetError", "RawCase", "RawDataset", "check_on_grid", "file_affine", "load_raw_dataset", "read_image", "read_label",
    "read_label_volume", "read_raw_case", "verify_dataset",
]
