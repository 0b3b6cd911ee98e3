"""One way to write a file so that a crash never leaves it half written.

Every writer of the package (NIfTI, DICOM-SEG, NRRD/MHA, checkpoints, JSON side files, caches)
writes through :func:`atomic_path`: the data go to a hidden temporary file in the target's folder,
which is flushed to disk (``fsync``) and renamed over the target (``os.replace``, atomic on POSIX and
Windows); the folder is then fsynced so that the rename itself survives a power cut. If anything
fails, the temporary file is removed and the previous file (if any) stays whole. A process killed
outright (SIGKILL) cannot remove its temporary file: the first write into a folder removes this
helper's temporary files there that are older than an hour (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from napari_medseg.errors import MedsegError

logger = logging.getLogger(__name__)

#: Called between the fsync of the temporary file and the rename. ``None`` in production; tests that
#: kill a process mid-save set it (in that process) to widen the window.
before_replace: Callable[[str], None] | None = None

TEMP_MARK = ".tmp"
#: A temporary file of :func:`temp_path_for` (``.{name}.{12 hex}.tmp{ext}``).
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}" + re.escape(TEMP_MARK) + r"(\.[^/\\]*)?$")
#: Temporary files older than this (seconds since their last write) are left over from a killed
#: process (SIGKILL, power cut: no ``finally`` ran) and are removed.
STALE_TEMP_SECONDS = 3600
_swept: set[str] = set()


class AtomicWriteError(MedsegError, OSError):
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


def remove_stale_temp_files(folder: str | os.PathLike, max_age: float = STALE_TEMP_SECONDS) -> list[str]:
    """Remove this helper's temporary files in ``folder`` that no write has touched for ``max_age``
    seconds (left by a killed process); return their paths. Other files are never touched."""
    folder = os.fspath(folder)
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP_NAME.match(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > max_age:
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            continue
    if removed:
        logger.info("Removed %d stale temporary file(s) in %s: %s", len(removed), folder, removed[:3])
    return removed


def _sweep_once(folder: str) -> None:
    """:func:`remove_stale_temp_files` on the first write into ``folder`` of this process."""
    key = os.path.realpath(folder)
    if key not in _swept:
        _swept.add(key)
        remove_stale_temp_files(folder)


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
    _sweep_once(folder)
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


def read_json_object(path: str | os.PathLike, error: type[Exception], what: str) -> dict:
    """Read a JSON file that must hold an object; errors name the file.

    Args:
        path: The file.
        error: The caller's error class to raise.
        what: What the object is, for the message (``"an object of dataset settings"``).

    Raises:
        error: ``Cannot read PATH: ...`` (missing, unreadable or invalid JSON), or ``PATH holds a
            JSON list, not WHAT``.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError) as err:
        raise error(f"Cannot read {os.fspath(path)}: {err}") from err
    if not isinstance(value, dict):
        raise error(f"{os.fspath(path)} holds a JSON {type(value).__name__}, not {what}")
    return value
