"""Orientation: which way the array axes point in the patient, and exact reorientation.

**Axis codes.** An orientation is a string of one letter per *napari-order* array axis: the world
direction that axis *increases towards*, from ``R``/``L`` (right/left), ``A``/``P`` (anterior/
posterior) and ``S``/``I`` (superior/inferior), each pair used once. The world is RAS+ (the
convention of :mod:`napari_medseg.io.world`). Because napari order is the file's voxel axes
reversed, ``(k, j, i)``, the codes are nibabel's ``aff2axcodes`` reversed: an axis-aligned RAS+
NIfTI (``i`` to the right, ``j`` anterior, ``k`` superior) read into napari order is ``"SAR"``; an
LPS volume (DICOM's patient axes, ``i`` to the left, ``j`` posterior) is ``"SPL"``. For an oblique
affine each axis gets the closest world axis (the assignment of world axes to array axes with the
largest summed ``|direction cosine|``, no world axis used twice); the sign gives the letter.

**Reorientation** (:func:`reorient`) moves an array from its codes to target codes by an axis
permutation and flips only: no resampling, no interpolation, so every voxel value is kept and
:meth:`Reorientation.restore` is the exact inverse (a label map predicted in the target layout goes
back to the source layout voxel for voxel). A leading channel axis is carried along.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.io.world import affine_from_napari, napari_matrix

__all__ = [
    "OrientationError",
    "Reorientation",
    "check_codes",
    "orientation_codes",
    "reorient",
    "reorientation",
]

#: World axis (RAS+ order: x, y, z) -> (letter of the positive direction, of the negative one).
_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))
_AXIS_OF = {letter: (axis, sign) for axis, pair in enumerate(_LETTERS) for sign, letter in zip((1, -1), pair)}


class OrientationError(MedsegError, ValueError):
    """Orientation codes are malformed, or two orientations cannot be matched by permutation and flips."""


def check_codes(codes: str, ndim: int | None = None) -> str:
    """``codes`` upper-cased, checked: letters from ``RLAPSI``, each world axis at most once.

    Raises:
        OrientationError: another letter, a world axis named twice, or not ``ndim`` letters.
    """
    if not isinstance(codes, str):
        raise OrientationError(f"Orientation codes must be a string such as 'SAR', not {type(codes).__name__}.")
    text = codes.upper()
    if any(c not in _AXIS_OF for c in text):
        raise OrientationError(f"Orientation {codes!r}: use the letters R/L, A/P and S/I (e.g. 'SAR').")
    axes = [_AXIS_OF[c][0] for c in text]
    if len(set(axes)) != len(axes) or not 2 <= len(text) <= 3:
        raise OrientationError(f"Orientation {codes!r} must name 2 or 3 different world axes (e.g. 'SAR').")
    if ndim is not None and len(text) != ndim:
        raise OrientationError(f"Orientation {codes!r} has {len(text)} letters for {ndim} array axes.")
    return text


def orientation_codes(affine: np.ndarray, ndim: int = 3) -> str:
    """The closest axis codes of the napari-order array axes of a volume with this RAS+ ``affine``.

    Args:
        affine: 4x4 file-voxel ``(i, j, k)`` to RAS+ matrix (``Volume.affine``).
        ndim: Spatial axes of the array (3, or 2 for a ``(y, x)`` image: the codes of its two axes).

    Returns:
        E.g. ``"SAR"`` for an axis-aligned RAS+ volume, ``"SPL"`` for LPS (see the module docstring).

    Raises:
        OrientationError: ``affine`` is not a finite 4x4 matrix, or an axis has no direction.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise OrientationError(f"Expected a finite 4x4 affine, got shape {a.shape}.")
    if ndim not in (2, 3):
        raise OrientationError(f"Orientation codes are for 2 or 3 spatial axes, not {ndim}.")
    lin = napari_matrix(a, 3)[:3, :3][::-1]  # rows: world R, A, S; columns: napari axes (k, j, i)
    norms = np.linalg.norm(lin, axis=0)
    if np.any(norms < 1e-12) or abs(np.linalg.det(lin)) < 1e-12 * float(np.prod(norms)):
        raise OrientationError("The affine is singular: an array axis has no direction in world space.")
    cosines = lin / norms
    # world[p] is the world axis of napari axis p; ties keep the first assignment (the stable choice).
    best = max(permutations(range(3)), key=lambda w: round(sum(abs(cosines[w[p], p]) for p in range(3)), 9))
    codes = "".join(_LETTERS[w][0 if cosines[w, p] > 0 else 1] for p, w in enumerate(best))
    return codes[3 - ndim:]


@dataclass(frozen=True)
class Reorientation:
    """Permutation and flips taking an array from ``source`` codes to ``target`` codes.

    Axis ``a`` of the reoriented array is axis ``perm[a]`` of the source, reversed when
    ``flip[a]``. Spatial axes are the last ``len(perm)`` axes; leading (channel) axes are kept.

    Attributes:
        source: Codes of the source layout.
        target: Codes of the reoriented layout.
        perm: Source axis of each reoriented axis.
        flip: Whether each reoriented axis runs opposite to its source axis.
    """

    source: str
    target: str
    perm: tuple[int, ...]
    flip: tuple[bool, ...]

    @property
    def is_identity(self) -> bool:
        """Nothing moves: the source already has the target codes."""
        return self.perm == tuple(range(len(self.perm))) and not any(self.flip)

    @property
    def inverse(self) -> Reorientation:
        """The reorientation from ``target`` back to ``source``."""
        inv = tuple(int(p) for p in np.argsort(self.perm))
        return Reorientation(self.target, self.source, inv, tuple(self.flip[a] for a in inv))

    def _spatial(self, array: np.ndarray) -> tuple[np.ndarray, int]:
        array = np.asarray(array)
        lead = array.ndim - len(self.perm)
        if lead < 0:
            raise OrientationError(
                f"An array of shape {array.shape} has fewer than the {len(self.perm)} spatial axes of {self.source!r}."
            )
        return array, lead

    def apply(self, array: np.ndarray) -> np.ndarray:
        """``array`` (source layout, optional leading axes) in the target layout: a view."""
        array, lead = self._spatial(array)
        out = np.transpose(array, list(range(lead)) + [lead + p for p in self.perm])
        flips = tuple(lead + a for a, f in enumerate(self.flip) if f)
        return np.flip(out, flips) if flips else out

    def restore(self, array: np.ndarray) -> np.ndarray:
        """The exact inverse of :meth:`apply`: target layout back to the source layout (a view)."""
        return self.inverse.apply(array)

    def apply_spacing(self, spacing: Sequence[float]) -> tuple[float, ...]:
        """Spacing (source order) in the target order."""
        return tuple(float(spacing[p]) for p in self.perm)

    def restore_spacing(self, spacing: Sequence[float]) -> tuple[float, ...]:
        """Spacing (target order) back in the source order."""
        return self.inverse.apply_spacing(spacing)

    def apply_affine(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """The 4x4 RAS+ affine of the reoriented array (same world positions for every voxel).

        Args:
            affine: 4x4 affine of the source array.
            shape: Spatial shape of the source array, napari order.
        """
        n = len(self.perm)
        if len(shape) < n:
            raise OrientationError(f"Shape {tuple(shape)} has fewer than {n} spatial axes.")
        shape = tuple(int(s) for s in shape)[-n:]
        step = np.zeros((n + 1, n + 1))  # reoriented napari index (homogeneous) -> source index
        step[n, n] = 1.0
        for a, (p, f) in enumerate(zip(self.perm, self.flip)):
            step[p, a] = -1.0 if f else 1.0
            step[p, n] = shape[p] - 1 if f else 0.0
        return affine_from_napari(napari_matrix(affine, n) @ step)


def reorientation(source: str, target: str) -> Reorientation:
    """The permutation and flips from ``source`` codes to ``target`` codes.

    Raises:
        OrientationError: malformed codes, different lengths, or different world axes (a 2D
            ``"AR"`` image cannot become ``"SR"`` without resampling).
    """
    source, target = check_codes(source), check_codes(target)
    if len(source) != len(target):
        raise OrientationError(f"Cannot reorient {source!r} to {target!r}: different numbers of axes.")
    world = {_AXIS_OF[c][0]: (i, _AXIS_OF[c][1]) for i, c in enumerate(source)}
    perm, flip = [], []
    for c in target:
        axis, sign = _AXIS_OF[c]
        if axis not in world:
            raise OrientationError(f"Cannot reorient {source!r} to {target!r}: {c} is not along any source axis.")
        src, src_sign = world[axis]
        perm.append(src)
        flip.append(src_sign != sign)
    return Reorientation(source, target, tuple(perm), tuple(flip))


def reorient(array: np.ndarray, source: str, target: str) -> tuple[np.ndarray, Reorientation]:
    """Reorient a napari-order array (optional leading channel axis) from ``source`` to ``target`` codes.

    Only axis permutations and flips: every value is kept, and ``transform.restore(result)`` gives
    ``array`` back exactly (use it to put a label map or probabilities predicted in the target layout
    on the source grid). ``transform.apply_spacing`` permutes the spacing the same way.

    Returns:
        ``(reoriented view of array, transform)``.

    Raises:
        OrientationError: the codes do not fit each other or the array.
    """
    transform = reorientation(source, target)
    return transform.apply(array), transform
