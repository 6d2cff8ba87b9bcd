"""Content digests of files: sha256 of the bytes, remembered across runs in a small SQLite cache.

A run's identity covers the data it ran on (`ImageIndex.fingerprint`, see `docs/protocol.md`, "Run identity"), so every
image file is hashed; the same goes for checkpoint files given by path. Hashing a large dataset takes a while, so each
digest is stored in `file-digests.sqlite` in the cache folder, keyed by the file's resolved absolute path and checked
against its size, modification time (ns), status-change time (ns) and inode: a file whose metadata changed is hashed
again, so a stale digest is never served; the digest itself depends on the bytes only (the same bytes copied elsewhere,
with new times, give the same digest).

The cache folder is `$CDFSL_CACHE_DIR` when set, else `$XDG_CACHE_HOME/cdfsl` (when that is an absolute path), else
`~/.cache/cdfsl`; it is created when missing. The cache is an optimisation only: if the folder cannot be created, the
database cannot be opened or written (read-only home, full disk, another process holding a lock for long, a damaged
file), digests are computed without it and one `DatasetWarning` per cache location says so. A run never fails
because of the cache.

Files are hashed on a thread pool (hashlib releases the GIL while hashing).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

from cdfsl.errors import DatasetWarning

CACHE_ENV = "CDFSL_CACHE_DIR"
DIGEST_DB = "file-digests.sqlite"
HASH_WORKERS = min(8, os.cpu_count() or 1)

_TABLE = "file_digests_v1"
_QUERY_CHUNK = 500  # paths per SELECT (SQLite's bound-parameter limit is 999 on old builds)
_LOCK_TIMEOUT_S = 10.0
_warned: set[str] = set()
_warned_lock = threading.Lock()


class Content(NamedTuple):
    """What identifies an item's content: its size in bytes and the sha256 (hex) of those bytes."""

    size: int
    digest: str


class _Stamp(NamedTuple):
    """File metadata a cached digest is valid for."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


def cache_dir() -> Path | None:
    """The cdfsl cache folder (see the module docstring), or None when no location can be determined."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "cdfsl"
    try:
        return Path.home() / ".cache" / "cdfsl"
    except (RuntimeError, KeyError, OSError):  # no HOME and no password entry
        return None


def open_regular(path: str | Path) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (symlinks followed).

    Opens without blocking, so a FIFO or device put in place of a file is refused instead of hanging the reader.

    Raises:
        OSError: the file cannot be opened, or it is not a regular file; the message names it.
    """
    handle = open(path, "rb", opener=_open_nonblocking)  # noqa: SIM115 - returned to the caller
    try:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(f"not a regular file: {os.fsdecode(path)!r}")
    except BaseException:
        handle.close()
        raise
    return handle


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def file_digest(path: str | Path) -> str:
    """sha256 (64 hex digits) of the bytes of `path`, read in chunks, remembered in the digest cache.

    Raises:
        OSError: the file cannot be read (missing, a folder, permission denied, not a regular file).
    """
    return file_contents([Path(path)])[0].digest


def file_contents(paths: Sequence[Path], workers: int = HASH_WORKERS) -> list[Content]:
    """(size, sha256) of each file in `paths`, same order; cached digests are reused, the others hashed in parallel.

    Raises:
        OSError: a file cannot be read; the message names it.
    """
    if not paths:
        return []
    resolved, stamps = _resolve_and_stat(paths)
    with _open_cache() as db:
        known = db.lookup(resolved, stamps) if db is not None else {}
        todo = [i for i in range(len(paths)) if i not in known]
        hashed = _hash_all([resolved[i] for i in todo], workers)
        fresh: list[tuple[int, Content]] = []
        for i, (content, after) in zip(todo, hashed, strict=True):
            known[i] = content
            if after == stamps[i]:  # unchanged while hashing: safe to remember
                fresh.append((i, content))
        if db is not None:
            db.store([(resolved[i], stamps[i], content) for i, content in fresh])
    return [known[i] for i in range(len(paths))]


# ----------------------------------------------------------------------------------------------------
# hashing


def _resolve_and_stat(paths: Sequence[Path]) -> tuple[list[str], list[_Stamp]]:
    """Resolved absolute path and metadata of each file; one `lstat` per file, one `realpath` per folder."""
    folders: dict[str, str] = {}
    resolved: list[str] = []
    stamps: list[_Stamp] = []
    for path in paths:
        text = os.fspath(path)
        if not os.path.isabs(text):
            text = os.path.join(os.getcwd(), text)  # not normalised: `link/..` must resolve as the OS does
        info = os.lstat(text)
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(text)
            info = os.stat(real)
        else:
            parent, name = os.path.split(text)
            if parent not in folders:
                folders[parent] = os.path.realpath(parent)
            real = os.path.join(folders[parent], name)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        resolved.append(real)
        stamps.append(_Stamp(info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino))
    return resolved, stamps


def _hash_one(path: str) -> tuple[Content, _Stamp]:
    """Content of `path` and the metadata seen after hashing it (compared with the one seen before)."""
    with open_regular(path) as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        size = handle.tell()
    after = os.stat(path)
    return Content(size, digest), _Stamp(after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino)


def _hash_all(paths: Sequence[str], workers: int) -> list[tuple[Content, _Stamp]]:
    if len(paths) <= 1 or workers <= 1:
        return [_hash_one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_hash_one, paths))


# ----------------------------------------------------------------------------------------------------
# the persistent cache


class _DigestCache:
    """An open digest database; a query or write that fails warns once and turns the cache off."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self.usable = True

    def lookup(self, paths: Sequence[str], stamps: Sequence[_Stamp]) -> dict[int, Content]:
        """Positions whose cached digest matches the file's current metadata → that content."""
        positions: dict[bytes, list[int]] = {}
        for i, path in enumerate(paths):
            positions.setdefault(os.fsencode(path), []).append(i)
        unique = list(positions)
        found: dict[int, Content] = {}
        try:
            for start in range(0, len(unique), _QUERY_CHUNK):
                chunk = unique[start : start + _QUERY_CHUNK]
                rows = self.db.execute(
                    f"SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM {_TABLE} "
                    f"WHERE path IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                for path, size, mtime_ns, ctime_ns, inode, digest in rows:
                    for i in positions.get(bytes(path), []):
                        if _Stamp(size, mtime_ns, ctime_ns, inode) == stamps[i]:
                            found[i] = Content(size, digest)
        except sqlite3.Error as error:
            self._fail(error)
            return {}
        return found

    def store(self, rows: Sequence[tuple[str, _Stamp, Content]]) -> None:
        """Remember (resolved path, metadata, content) rows, replacing older rows for the same paths."""
        if not self.usable or not rows:
            return
        try:
            with self.db:
                self.db.executemany(
                    f"INSERT OR REPLACE INTO {_TABLE} (path, size, mtime_ns, ctime_ns, inode, sha256) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (os.fsencode(path), s.size, s.mtime_ns, s.ctime_ns, s.inode, content.digest)
                        for path, s, content in rows
                    ],
                )
        except sqlite3.Error as error:
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self.usable = False
        _warn_unusable(self.path, error)


@contextmanager
def _open_cache() -> Iterator[_DigestCache | None]:
    """The digest cache, or None (after one warning per location) when it cannot be used."""
    folder = cache_dir()
    if folder is None:
        _warn_once("", f"no cache folder for file digests (HOME is not set); set {CACHE_ENV} to a writable folder")
        yield None
        return
    db_path = folder / DIGEST_DB
    try:
        folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(db_path, timeout=_LOCK_TIMEOUT_S)
    except (OSError, sqlite3.Error) as error:
        _warn_unusable(db_path, error)
        yield None
        return
    try:
        with db:
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {_TABLE} (path BLOB PRIMARY KEY, size INTEGER NOT NULL, "
                "mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha256 TEXT NOT NULL)"
            )
    except sqlite3.Error as error:
        db.close()
        _warn_unusable(db_path, error)
        yield None
        return
    try:
        yield _DigestCache(db, db_path)
    finally:
        db.close()


def _warn_unusable(db_path: Path, error: BaseException) -> None:
    _warn_once(
        str(db_path),
        f"file digest cache {db_path} cannot be used ({error}); hashing without it (slower); "
        f"set {CACHE_ENV} to a writable folder to cache digests",
    )


def _warn_once(key: str, message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, DatasetWarning, stacklevel=4)
