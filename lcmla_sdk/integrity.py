"""SHA-256 of files, streamed and computed once per change: lcmla's one file-hashing helper, and the check of a file
against the hash a manifest records.

Every result is kept by the file's identity (device and inode, so a renamed file keeps it), size and mtime_ns: in
memory, and for files of at least ``CACHE_MIN_BYTES`` also in ``$LCMLA_CACHE_DIR/sha256.json`` (default
``~/.cache/lcmla``), so a model directory of many gigabytes is hashed once, not on every load in every process. A file
rewritten in place gets a new mtime and is hashed again; a file modified less than ``RACY_NS`` before it was hashed
is not cached at all, since a second write within the filesystem's timestamp granularity could keep its mtime. The
cache trusts that nobody rewrites a file and then restores its size and mtime by hand; an unwritable cache folder
only means hashing again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from .atomic import write_json
from .errors import IntegrityError

CHUNK = 1 << 24  # 16 MiB reads
CACHE_MIN_BYTES = 1 << 20  # smaller files hash faster than the cache file is rewritten
CACHE_ENTRIES = 10_000  # the oldest entries go first beyond this
CACHE_FILE = "sha256.json"
RACY_NS = 2_000_000_000  # coarser than any filesystem's timestamp granularity (FAT: 2 s)
SHA256 = re.compile(r"[0-9a-f]{64}")

_lock = threading.Lock()
_memory: dict[str, list] = {}  # "device:inode" -> [size, mtime_ns, sha256]
_disk_loaded = False


def sha256_json(value: Any) -> str:
    """Hex SHA-256 of a JSON-able value, keys sorted (fingerprints of configs and build inputs)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (from the cache when the file has not changed since it was last hashed)."""
    path = Path(path)
    key, stamp = _stamp(path)
    with _lock:
        _load_disk_cache()
        cached = _memory.get(key)
    if cached is not None and cached[:2] == stamp:
        return cached[2]
    started = time.time_ns()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    found = digest.hexdigest()
    if _stamp(path) == (key, stamp) and started - stamp[1] > RACY_NS:  # settled, and not changed while read
        with _lock:
            _memory[key] = [*stamp, found]
        if stamp[0] >= CACHE_MIN_BYTES:
            _save_disk_cache(key)
    return found


def verify_file(path: str | os.PathLike, expected: str, manifest: str | os.PathLike) -> str:
    """Raise :class:`IntegrityError` naming the file and both hashes unless ``path`` hashes to ``expected``."""
    found = sha256_file(path)
    if found != expected:
        raise IntegrityError(
            f"{path}: sha256 {found} does not match {expected} recorded in {manifest}: the file is corrupt or was "
            f"changed after {Path(manifest).name} was written (verify=False skips this check)"
        )
    return found


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and SHA256.fullmatch(value) is not None


def cache_path() -> Path:
    return Path(os.environ.get("LCMLA_CACHE_DIR") or Path.home() / ".cache" / "lcmla") / CACHE_FILE


def _stamp(path: Path) -> tuple[str, list[int]]:
    stat = path.stat()
    return f"{stat.st_dev}:{stat.st_ino}", [stat.st_size, stat.st_mtime_ns]


def _read_disk_cache() -> dict[str, list]:
    try:
        entries = json.loads(cache_path().read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, list) and len(v) == 3 and is_sha256(v[2])}


def _load_disk_cache() -> None:
    global _disk_loaded
    if not _disk_loaded:
        _disk_loaded = True
        _memory.update({k: v for k, v in _read_disk_cache().items() if k not in _memory})


def _save_disk_cache(key: str) -> None:
    """Merge this entry into the cache file (other processes' entries are kept); best effort."""
    with _lock:
        entries = _read_disk_cache()
        entries.pop(key, None)
        entries[key] = _memory[key]
        for old in list(entries)[: max(0, len(entries) - CACHE_ENTRIES)]:
            del entries[old]
        try:
            write_json(cache_path(), {"version": 2, "entries": entries})
        except OSError:
            pass  # no cache folder we may write: hash again next time
