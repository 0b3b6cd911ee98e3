"""One rule for every file a command writes: an output never replaces one of the command's inputs,
never replaces a file that is already there unless the user says so (``overwrite``), and two
outputs of one command never share a name. Checked before any compute, so a refused command
changes nothing."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from napari_medseg.io.volume import VolumeError


class OutputError(VolumeError):
    """An output would replace an input, an existing file, or another output of the same command."""


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _inside(path: str, folder: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.isdir(root) and (real == root or real.startswith(root.rstrip(os.sep) + os.sep))


def check_output(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, overwrite: bool = False
) -> str:
    """Refuse writing ``path`` when it is (or is inside) one of ``inputs`` (files or folders, e.g. a
    DICOM series), or when it exists and ``overwrite`` is false; return it as a string.

    Raises:
        OutputError: naming the file and what to do instead.
    """
    path = os.fspath(path)
    for src in inputs:
        src = os.fspath(src)
        if _same_file(path, src) or (os.path.isdir(src) and _inside(path, src)):
            raise OutputError(
                f"{path}: the output would replace the input {src}; choose another output name "
                "(an input is never overwritten, not even with --overwrite)."
            )
    if os.path.isdir(path):
        raise OutputError(f"{path}: the output name is an existing folder; name a file inside it.")
    if os.path.exists(path) and not overwrite:
        raise OutputError(f"{path} exists already; choose another name, or pass --overwrite (overwrite=True).")
    return path


def check_outputs(
    paths: Sequence[str | os.PathLike], inputs: Iterable[str | os.PathLike] = (), *, overwrite: bool = False
) -> list[str]:
    """:func:`check_output` for each of ``paths``, and no two of them the same file (e.g. the inputs
    ``case.nii`` and ``case.nii.gz`` would both become ``case.nii.gz``)."""
    inputs = [os.fspath(i) for i in inputs]
    out = [check_output(p, inputs, overwrite=overwrite) for p in paths]
    seen: dict[str, str] = {}
    for p in out:
        key = os.path.normcase(os.path.realpath(p))
        if key in seen:
            raise OutputError(f"Two inputs would be written to the same output {p}; rename one of them.")
        seen[key] = p
    return out


__all__ = ["OutputError", "check_output", "check_outputs"]
