"""Datasets in the nnU-Net raw format, preprocessed cases, and patch sampling for training.

The raw format (nnU-Net v1 and v2)::

    Dataset/
      dataset.json      channels: "channel_names" (v2) or "modality" (v1): {"0": "CT", ...}
                        labels:   {"background": 0, "liver": 1} (v2) or {"0": "background", ...} (v1)
      imagesTr/{case}_{XXXX}.nii.gz    one file per channel XXXX = 0000, 0001, ...
      labelsTr/{case}.nii.gz
      imagesTs/...                     optional (labelsTs optional too)

The Medical Segmentation Decathlon layout (one possibly 4D file per case, no ``_XXXX`` suffix) is
accepted as well. Patch sampling follows nnU-Net (v1): random cases, random crops, and the last
samples of every batch forced to contain foreground.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .events import Progress
from .planning import Plan
from .preprocessing import CaseProperties, preprocess_case

logger = logging.getLogger(__name__)

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_ENDINGS = (".nii.gz", ".nii")
_CACHE_VERSION = 1


class DatasetError(ValueError):
    """A folder is not a valid nnU-Net raw dataset, or one of its files does not fit it."""


@dataclass
class RawCase:
    """One case on disk: a file per channel (or one 4D file) and an optional label file."""

    name: str
    image_paths: list[str]
    label_path: str | None = None


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


@dataclass
class Case:
    """A preprocessed case: image ``(C, *grid)`` float32 and label ``(*grid)`` int16 on the plan grid."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    properties: CaseProperties


# --------------------------------------------------------------------------------------------- raw
def _strip_ending(fname: str) -> str | None:
    for end in _ENDINGS:
        if fname.endswith(end):
            return fname[: -len(end)]
    return None


def _parse_labels(raw: dict) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError("dataset.json needs a non-empty 'labels' mapping")
    try:
        if all(str(k).lstrip("-").isdigit() for k in raw):  # v1: {"0": "background"}
            labels = {int(k): str(v) for k, v in raw.items()}
        else:  # v2: {"background": 0}
            if any(isinstance(v, (list, tuple)) for v in raw.values()):
                raise DatasetError("Region-based labels (lists of values) in dataset.json are not supported")
            labels = {int(v): str(k) for k, v in raw.items()}
    except (TypeError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"Cannot read the 'labels' of dataset.json: {raw}") from err
    if sorted(labels) != list(range(len(labels))):
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
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"Cannot read {meta_path}: {err}") from err
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in _ENDINGS:
        raise DatasetError(f"Only NIfTI datasets are supported (file_ending {ending!r})")
    channels = _parse_channels(meta)
    labels = _parse_labels(meta.get("labels"))
    images = _scan_images(images_tr, len(channels), "imagesTr")
    if not images:
        raise DatasetError(f"{images_tr} contains no NIfTI images")
    label_files = _scan_labels(os.path.join(root, "labelsTr"), images, "labelsTr")
    unlabelled = [n for n in images if n not in label_files]
    if unlabelled:
        logger.warning("%d training case(s) have no label file, e.g. %s", len(unlabelled), unlabelled[:3])
    cases = [RawCase(n, p, label_files.get(n)) for n, p in images.items()]
    test = []
    images_ts = os.path.join(root, "imagesTs")
    if os.path.isdir(images_ts):
        ts = _scan_images(images_ts, len(channels), "imagesTs")
        ts_labels = _scan_labels(os.path.join(root, "labelsTs"), ts, "labelsTs")
        test = [RawCase(n, p, ts_labels.get(n)) for n, p in ts.items()]
    return RawDataset(
        root=root, cases=cases, labels=labels, channel_names=channels, num_channels=len(channels),
        num_classes=len(labels), modality=tuple(channels[i] for i in range(len(channels))),
        test_images=test, name=str(meta.get("name", os.path.basename(root))),
    )


# ---------------------------------------------------------------------------------------- reading
def _read_nifti(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """``(data, spacing)`` in napari order; data ``(z, y, x)`` or channels-first ``(C, z, y, x)``."""
    try:  # the io package's reader when it is there; nibabel directly otherwise
        from napari_medseg.io.nifti import read_nifti
    except ImportError:
        read_nifti = None
    if read_nifti is not None:
        try:
            vol = read_nifti(path)
        except ValueError as err:
            raise DatasetError(f"Cannot read {path}: {err}") from err
        return np.asarray(vol.data), tuple(float(s) for s in vol.spacing)
    import nibabel as nib

    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for broken files
        raise DatasetError(f"Cannot read {path}: {err}") from err
    zooms = img.header.get_zooms()
    if data.ndim == 4:
        return np.transpose(data, (3, 2, 1, 0)), tuple(float(z) for z in zooms[:3][::-1])
    return data.T, tuple(float(z) for z in zooms[: data.ndim][::-1])


def read_label(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a NIfTI label map: ``(int16 array in napari order, spacing)``.

    Raises:
        DatasetError: unreadable file, non-integer values or values that do not fit int16.
    """
    data, spacing = _read_nifti(path)
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.round(data)
        if not np.allclose(rounded, data):
            raise DatasetError(f"Label file {path} has non-integer values")
        data = rounded
    if data.size and (data.max() >= 2**15 or data.min() < -(2**15)):
        raise DatasetError(f"Label file {path} has values outside the int16 range")
    return data.astype(np.int16), spacing


def _read_image(raw_case: RawCase) -> tuple[np.ndarray, tuple[float, ...]]:
    chans, spacing = [], None
    for p in raw_case.image_paths:
        data, sp = _read_nifti(p)
        if spacing is None:
            spacing = sp
        elif not np.allclose(sp, spacing, rtol=1e-3):
            logger.warning("Case %s: %s has spacing %s, channel 0 has %s", raw_case.name, p, sp, spacing)
        if len(raw_case.image_paths) > 1 and data.ndim == len(sp) + 1:
            raise DatasetError(f"{p} has several channels, but case {raw_case.name} uses one file per channel")
        chans.extend(data if data.ndim == len(sp) + 1 else [data])
    shapes = {c.shape for c in chans}
    if len(shapes) != 1:
        raise DatasetError(f"Case {raw_case.name}: channel files have different shapes {sorted(shapes)}")
    return np.stack(chans).astype(np.float32, copy=False), spacing


def read_raw_case(raw_case: RawCase) -> tuple[np.ndarray, tuple[float, ...], np.ndarray | None]:
    """``(image (C, *sp) float32, spacing, label or None)`` of a raw case, before preprocessing."""
    image, spacing = _read_image(raw_case)
    label = read_label(raw_case.label_path)[0] if raw_case.label_path else None
    return image, spacing, label


def load_case(raw_case: RawCase, plan: Plan, label_values: Iterable[int] | None = None) -> Case:
    """Read a case's NIfTI files and preprocess it with ``plan``.

    Args:
        raw_case: Paths of the case.
        plan: The configuration's plan.
        label_values: Allowed label values (``dataset.json``'s); default ``range(plan.num_classes)``.

    Raises:
        DatasetError: unreadable files, mismatched shapes, or label values not in ``label_values``.
    """
    image, spacing = _read_image(raw_case)
    label = None
    if raw_case.label_path:
        label, _ = read_label(raw_case.label_path)
        if label.shape != image.shape[1:]:
            raise DatasetError(
                f"Case {raw_case.name}: label shape {label.shape} differs from image shape {image.shape[1:]}"
            )
        allowed = set(range(plan.num_classes) if label_values is None else label_values)
        found = set(np.unique(label).tolist())
        if not found <= allowed:
            raise DatasetError(
                f"Label file {raw_case.label_path} contains values {sorted(found - allowed)} that are "
                f"not in dataset.json's labels {sorted(allowed)}"
            )
    img, lab, props = preprocess_case(image, spacing, plan, label)
    return Case(raw_case.name, img, lab, props)


def verify_dataset(raw: RawDataset) -> None:
    """Read every training label and check its values and its shape against the images.

    Raises:
        DatasetError: on the first problem found.
    """
    allowed = set(raw.labels)
    for rc in raw.cases:
        if rc.label_path is None:
            continue
        label, _ = read_label(rc.label_path)
        bad = set(np.unique(label).tolist()) - allowed
        if bad:
            raise DatasetError(f"Label file {rc.label_path} contains values {sorted(bad)} that are not in "
                               f"dataset.json's labels {sorted(allowed)}")
        img, _ = _read_image(rc)
        if img.shape[1:] != label.shape:
            raise DatasetError(f"Case {rc.name}: label shape {label.shape} != image shape {img.shape[1:]}")


def case_from_arrays(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing: Sequence[float],
    plan: Plan,
    name: str = "layer",
) -> Case:
    """Preprocess in-memory arrays (e.g. napari layers) into a :class:`Case`.

    Args:
        image: ``(z, y, x)`` or ``(C, z, y, x)`` (2D: ``(y, x)`` / ``(C, y, x)`` with 2 spacings).
        label: Integer label map of the image's spatial shape, or ``None``.
        spacing: Spacing per spatial axis, napari order.
        plan: The configuration's plan.
        name: Name of the case.
    """
    img, lab, props = preprocess_case(np.asarray(image), spacing, plan, label)
    return Case(name, img, lab, props)


# ---------------------------------------------------------------------------------------- caching
def _cache_key(rc: RawCase, plan: Plan) -> str:
    relevant = {k: plan.to_dict()[k] for k in ("spacing", "transpose_forward", "normalization",
                                              "intensity_stats", "use_mask_for_norm", "num_classes")}
    relevant["dims"] = plan.spatial_dims
    sources = []
    for p in [*rc.image_paths, rc.label_path]:
        if p:
            st = os.stat(p)
            sources.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": _CACHE_VERSION, "plan": relevant, "sources": sources}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _atomic_save_npy(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


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
    _atomic_save_npy(os.path.join(cache_dir, f"{case.name}_image.npy"), case.image)
    if case.label is not None:
        _atomic_save_npy(os.path.join(cache_dir, f"{case.name}_label.npy"), case.label)
    meta = {"key": key, "has_label": case.label is not None, "properties": case.properties.to_dict()}
    tmp = os.path.join(cache_dir, f"{case.name}.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(meta, fh)
    os.replace(tmp, os.path.join(cache_dir, f"{case.name}.json"))


def iter_preprocess_dataset(
    raw: RawDataset, plan: Plan, cache_dir: str | os.PathLike | None = None
) -> Generator[Progress, None, list[Case]]:
    """Generator form of :func:`preprocess_dataset`: yields a :class:`Progress` per case."""
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


def preprocess_dataset(
    raw: RawDataset,
    plan: Plan,
    cache_dir: str | os.PathLike | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> list[Case]:
    """Load and preprocess every training case, optionally caching the results.

    With ``cache_dir``, each case is stored as ``{name}_image.npy``, ``{name}_label.npy`` and
    ``{name}.json`` (properties and a key of the plan's preprocessing fields and the source files'
    sizes and modification times); a later call with the same plan and files reads the cache.
    """
    gen = iter_preprocess_dataset(raw, plan, cache_dir)
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(event)


# --------------------------------------------------------------------------------------- sampling
def _crop(arr: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value) -> np.ndarray:
    """Crop the trailing ``len(size)`` axes of ``arr`` at ``start``, padding with ``pad_value``."""
    lead = arr.shape[: arr.ndim - len(size)]
    out = np.full((*lead, *size), pad_value, dtype=arr.dtype)
    src, dst = [], []
    for s0, n, dim in zip(start, size, arr.shape[len(lead):]):
        a, b = max(s0, 0), min(s0 + n, dim)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - s0, a - s0 + max(b - a, 0)))
    out[(..., *dst)] = arr[(..., *src)]
    return out


class PatchSampler:
    """Random training patches with nnU-Net's foreground oversampling.

    Every batch draws ``batch_size`` cases at random (with replacement). The last
    ``round(batch_size * oversample_foreground)`` samples of a batch are *forced*: a foreground class
    present in the case is chosen at random, then one of its voxels, and the patch is placed so that
    this voxel lies at a random position inside it (inside the central ``final_patch_size`` window
    when given, so that it survives the augmenter's centre crop). The other samples are random crops.
    With batch size 1 (where the rounding gives 0 forced samples), the sample is forced with
    probability ``oversample_foreground`` instead.

    Crops may reach outside a case by half of what it lacks to fill a patch (as nnU-Net); padding is
    0 for the image and, for the label, ``ignore_label`` when set (so padding does not teach
    "background") or else 0. With a 2-entry ``patch_size`` on 3D cases, 2D slices along axis 0 are
    sampled (the ``2d`` configuration).

    Args:
        cases: Preprocessed cases with labels.
        patch_size: 2 or 3 entries.
        batch_size: Samples per batch.
        oversample_foreground: Fraction of forced-foreground samples per batch.
        seed: Seed; the same seed and cases give the same batches.
        ignore_label: Label value excluded from the foreground classes and used for label padding.
        final_patch_size: Size of the patch after the augmenter's centre crop (default: the patch).
        max_locations: Voxel locations remembered per class and case.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        batch_size: int,
        oversample_foreground: float = 0.33,
        seed: int | None = 0,
        ignore_label: int | None = None,
        final_patch_size: Sequence[int] | None = None,
        max_locations: int = 10000,
    ) -> None:
        self.cases = list(cases)
        if not self.cases:
            raise ValueError("PatchSampler needs at least one case")
        missing = [c.name for c in self.cases if c.label is None]
        if missing:
            raise ValueError(f"PatchSampler needs labelled cases; without label: {missing[:5]}")
        channels = {c.image.shape[0] for c in self.cases}
        if len(channels) != 1:
            raise ValueError(f"Cases have different numbers of channels: {sorted(channels)}")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must have 2 or 3 positive entries, got {patch_size}")
        for c in self.cases:
            if c.image.ndim - 1 < len(self.patch_size):
                raise ValueError(f"Case {c.name} has {c.image.ndim - 1} spatial axes, patch {self.patch_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError(f"oversample_foreground must be in [0, 1], got {oversample_foreground}")
        self.batch_size = int(batch_size)
        self.oversample_foreground = float(oversample_foreground)
        self.ignore_label = ignore_label
        final = self.patch_size if final_patch_size is None else tuple(int(p) for p in final_patch_size)
        if len(final) != len(self.patch_size) or any(f > p for f, p in zip(final, self.patch_size)):
            raise ValueError(f"final_patch_size {final_patch_size} must fit inside patch_size {self.patch_size}")
        self.final_patch_size = final
        self.max_locations = int(max_locations)
        self.rng = np.random.default_rng(seed)
        self._locations: dict[int, dict[int, np.ndarray]] = {}
        self.num_channels = channels.pop()

    @property
    def num_forced(self) -> int:
        """Samples per batch forced to contain foreground (see the class docstring)."""
        return int(round(self.batch_size * self.oversample_foreground))

    def _class_locations(self, idx: int) -> dict[int, np.ndarray]:
        """Flat indices of (up to ``max_locations``) voxels per foreground class of case ``idx``."""
        if idx not in self._locations:
            label = self.cases[idx].label
            flat = label.ravel()
            locs = {}
            for c in np.unique(flat):
                if c == 0 or (self.ignore_label is not None and c == self.ignore_label):
                    continue
                where = np.flatnonzero(flat == c)
                n = max(min(self.max_locations, where.size), int(np.ceil(where.size * 0.01)))
                if n < where.size:
                    where = np.sort(self.rng.choice(where, n, replace=False))
                locs[int(c)] = where
            self._locations[idx] = locs
        return self._locations[idx]

    def _start(self, shape: Sequence[int], voxel: Sequence[int] | None) -> list[int]:
        start = []
        for d, (dim, p, f) in enumerate(zip(shape, self.patch_size, self.final_patch_size)):
            need = max(p - dim, 0)
            lb, ub = -(need // 2), dim + need // 2 + need % 2 - p
            if voxel is None:
                start.append(int(self.rng.integers(lb, ub + 1)))
                continue
            m = (p - f) // 2
            lo, hi = max(lb, voxel[d] - m - f + 1), min(ub, voxel[d] - m)
            if lo > hi:
                start.append(int(np.clip(voxel[d] - p // 2, lb, ub)))
            else:
                start.append(int(self.rng.integers(lo, hi + 1)))
        return start

    def _one(self, force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
        idx = int(self.rng.integers(len(self.cases)))
        case = self.cases[idx]
        image, label = case.image, case.label
        voxel = None
        if force_fg:
            locs = self._class_locations(idx)
            if locs:
                classes = sorted(locs)
                cls = classes[int(self.rng.integers(len(classes)))]
                flat = locs[cls][int(self.rng.integers(locs[cls].size))]
                voxel = [int(v) for v in np.unravel_index(flat, label.shape)]
        if len(self.patch_size) == 2 and label.ndim == 3:
            z = voxel[0] if voxel is not None else int(self.rng.integers(label.shape[0]))
            image, label = image[:, z], label[z]
            voxel = voxel[1:] if voxel is not None else None
        start = self._start(label.shape, voxel)
        pad_label = self.ignore_label if self.ignore_label is not None else 0
        img = _crop(image, start, self.patch_size, 0)
        lab = _crop(label, start, self.patch_size, pad_label)
        return img, lab

    def sample_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """One batch as numpy: images float32 ``(B, C, *patch)``, labels int64 ``(B, 1, *patch)``."""
        n_forced = self.num_forced
        if n_forced == 0 and self.oversample_foreground > 0 and self.batch_size == 1:
            n_forced = int(self.rng.random() < self.oversample_foreground)
        images = np.empty((self.batch_size, self.num_channels, *self.patch_size), np.float32)
        labels = np.empty((self.batch_size, 1, *self.patch_size), np.int64)
        for b in range(self.batch_size):
            images[b], labels[b, 0] = self._one(force_fg=b >= self.batch_size - n_forced)
        return images, labels

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch as CPU tensors: images float32 ``(B, C, *patch)``, labels int64 ``(B, 1, *patch)``."""
        images, labels = self.sample_numpy()
        return torch.from_numpy(images), torch.from_numpy(labels)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample()


class BackgroundBatches:
    """Iterator that prefetches ``sampler.sample()`` batches in a background thread.

    Batches come in the order the sampler produces them, so a seeded sampler stays deterministic.
    An exception in the thread is re-raised by ``next``. Call :meth:`close` (or use ``with``) to stop.

    Args:
        sampler: Anything with a ``sample()`` method.
        n_prefetch: Batches kept ready.
        pin_memory: Pin the batch tensors (faster copies to a CUDA GPU).
    """

    _DONE = object()

    def __init__(self, sampler, n_prefetch: int = 2, pin_memory: bool = False) -> None:
        self.sampler = sampler
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._queue: queue.Queue = queue.Queue(maxsize=max(int(n_prefetch), 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="medseg-batches", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.sampler.sample()
                if self.pin_memory:
                    item = tuple(t.pin_memory() for t in item)
            except BaseException as err:  # handed to the consumer
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self):
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("The batch thread stopped unexpectedly") from None
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stop the thread and drop prefetched batches."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> BackgroundBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
