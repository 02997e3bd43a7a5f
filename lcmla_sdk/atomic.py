"""Writes that leave either the old content or the new, never a broken mix: write beside, then rename into place.

Files are written under a hidden temporary name in the same folder (``.NAME.tmp-PID-RANDOM.SUFFIX``), flushed to
disk, and renamed over ``NAME`` (``os.replace``: atomic on POSIX and Windows). Directories are filled beside in the
same way, flushed, then exchanged with the old one in a single step where the kernel can (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere the old one is renamed aside first), and the old one is removed last.

Any ``OSError`` (disk full, no permission, a directory where a file should go) becomes a one-line
:class:`~lcmla_sdk.errors.WriteError` naming the path; the temporary is removed and the old content stays. What a
writer killed mid-way (``kill -9``) leaves is a hidden temporary, removed by the next write to the same path.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import WriteError

TEMPORARY = ".tmp-"


def write_error(path: str | os.PathLike, error: BaseException) -> WriteError:
    """``error`` (an ``OSError`` or a library's write failure) as a one-line :class:`WriteError` naming ``path``."""
    code = error.errno if isinstance(error, OSError) else None
    found = re.search(r"os error (\d+)", str(error))  # how Rust writers (safetensors) report the OS error
    code = code if code is not None or found is None else int(found.group(1))
    reason = os.strerror(code) if code is not None else str(error).splitlines()[0]
    if code == errno.EFBIG:
        reason += " (the file size limit was reached)"
    result = WriteError(f"{path}: cannot write: {reason}")
    result.errno = code
    return result


@contextmanager
def atomic_path(path: str | os.PathLike, failures: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """A temporary file path beside ``path`` (same suffix, so format-guessing writers work) to write with any writer
    that takes a path; on success it is synced and renamed to ``path``.

    ``failures``: the writer's own exception types for an I/O failure (e.g. ``SafetensorError``), reported like
    ``OSError``.
    """
    path = Path(path)
    _prepare(path, directory=False)
    temporary = _temporary(path)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except BaseException as error:
        _remove(temporary)
        if isinstance(error, (OSError, *failures)) and not isinstance(error, WriteError):
            raise write_error(path, error) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, **dumps: Any) -> Path:
    return write_text(path, json.dumps(value, **dumps))


@contextmanager
def atomic_directory(path: str | os.PathLike, failures: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """A fresh empty directory beside ``path`` to fill; on success it replaces ``path`` and whatever it held."""
    path = Path(path)
    _prepare(path, directory=True)
    staging = _temporary(path)
    try:
        staging.mkdir()
        yield staging
        fsync_tree(staging)
        replace_directory(staging, path)
    except BaseException as error:
        _remove(staging)
        if isinstance(error, (OSError, *failures)) and not isinstance(error, WriteError):
            raise write_error(path, error) from None
        raise


def replace_directory(new: Path, path: Path) -> None:
    """Put the complete directory ``new`` at ``path`` (same filesystem), then remove what was there."""
    if not path.exists():
        os.rename(new, path)
    elif _exchange(new, path):  # one step: ``path`` is never missing
        shutil.rmtree(new, ignore_errors=True)
    else:
        aside = _temporary(path)
        os.rename(path, aside)
        try:
            os.rename(new, path)
        except OSError:
            os.rename(aside, path)  # the old directory goes back
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_directory(path.parent)


# ------------------------------------------------------------------ helpers
def _prepare(path: Path, directory: bool) -> None:
    try:
        if path.exists() and path.is_dir() != directory:
            found, wanted = ("a directory", "a file") if path.is_dir() else ("a file", "a directory")
            raise WriteError(f"{path}: cannot write: {found} is in the way of {wanted}")
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
    except OSError as error:
        if isinstance(error, WriteError):
            raise
        raise write_error(path, error) from None


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMPORARY}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _remove_leftovers(path: Path) -> None:
    """Temporaries of ``path`` whose writer is gone (killed while writing)."""
    if os.name != "posix":
        return
    for leftover in path.parent.glob(f".{glob.escape(path.name)}{TEMPORARY}*"):
        pid = leftover.name[len(path.name) + 1 + len(TEMPORARY) :].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            _remove(leftover)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); directories cannot be opened for syncing on Windows."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """Flush every file and folder under ``directory`` to disk (before it is renamed into place)."""
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync(path)
    for path in [*(p for p in directory.rglob("*") if p.is_dir() and not p.is_symlink()), directory]:
        _fsync_directory(path)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2``; ``False`` where the kernel or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
