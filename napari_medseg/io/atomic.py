"""One way to write a file so that a crash never leaves it half written.

Every writer of the package (NIfTI, DICOM-SEG, NRRD/MHA, checkpoints, JSON side files, caches)
writes through :func:`atomic_path`: the data go to a hidden temporary file in the target's folder,
which is flushed to disk (``fsync``) and renamed over the target (``os.replace``, atomic on POSIX and
Windows); the folder is then fsynced so that the rename itself survives a power cut. If anything
fails, the temporary file is removed and the previous file (if any) stays whole.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: Called between the fsync of the temporary file and the rename. ``None`` in production; tests that
#: kill a process mid-save set it (in that process) to widen the window.
before_replace: Callable[[str], None] | None = None

TEMP_MARK = ".tmp"


class AtomicWriteError(OSError):
    """A file could not be written; the previous file, if any, is unchanged."""


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_folder(folder: str) -> None:
    try:  # not every platform lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: str | os.PathLike) -> str:
    """A fresh hidden name in the folder of ``path`` that keeps its extension (``.nii.gz`` too), so
    that libraries choosing the format by extension write the right one."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    lower = base.lower()
    ext = next((e for e in (".nii.gz", ".seg.nrrd", ".tar.gz") if lower.endswith(e)), os.path.splitext(base)[1])
    return os.path.join(folder, f".{base}.{secrets.token_hex(6)}{TEMP_MARK}{ext}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, make_parents: bool = False) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s new content to; on a clean exit it replaces ``path``.

    Args:
        path: the file to (re)write.
        make_parents: create missing parent folders (otherwise a missing folder is an error).

    Raises:
        AtomicWriteError: the folder is missing or not writable, or the write or the rename failed
            (the original ``OSError`` is chained). Other exceptions from the body pass through;
            in every failure the temporary file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if make_parents:
        os.makedirs(folder, exist_ok=True)
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise AtomicWriteError(f"{path}: cannot write: the parent folder {folder} {what}")
    tmp = temp_path_for(path)
    try:  # O_EXCL: never clobber; mode 0o666 minus the umask, like an ordinary new file
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise AtomicWriteError(f"{path}: cannot write to folder {folder}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        _fsync_file(tmp)
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, AtomicWriteError):
            raise AtomicWriteError(f"{path}: cannot write: {exc.strerror or exc}") from exc
        raise
    _fsync_folder(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, **kwargs: Any) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, **kwargs) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs: Any) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **kwargs: Any) -> None:
    """Write ``obj`` as JSON (strict: NaN and infinities are refused) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False)
    atomic_write_text(path, text + "\n", **kwargs)
