"""The result store: one SQLite row per finished episode, so runs resume and reports read only data.

Schema (bound parameters only; names and config values are data, never SQL):

- `runs(run_id PK, run_name, dataset, method, backbone, pretrained, ways, shots, queries, seed, config_json,
  identity_json, created_at, recipe)`; `config_json` is the resolved config (every recipe value filled in). A run
  gets its row in the same transaction as its first stored episodes, so a run that failed before finishing an
  episode leaves no row.
- `episodes(run_id, episode, correct, total, accuracy, seconds, finished_at, trained_by, queries_json, curves_json,
  records_json, device, PK(run_id, episode))`, accuracy in [0, 1]; `device` the model of the device that trained
  the episode (`engine.reproducibility.device_model`; NULL in rows written before it existed); `trained_by` is the
  owner id of the process that trained the episode (NULL in rows written before it existed, or through
  `add_episodes` without an owner); `queries_json`
  its per-query labels, `curves_json` its training curves; `records_json` what the method recorded for the episode
  beyond accuracy, as one JSON object of named values (VtT's `dlc_off_step`, MaPLe's epoch losses; NULL: nothing
  recorded). Stores written before `records_json` existed may hold a `dlc_off_step` column (VtT's switch-off step,
  the only record then); a row with a value there and no records reads as `{"dlc_off_step": value}`. New rows
  leave that column empty and new stores do not have it.
- `claims(run_id, episode, owner, expires_at, PK(run_id, episode))`: episodes a process is training now.
  `expires_at` is a Unix time in seconds; a claim whose time has passed is a lease nobody holds any more. `owner`
  is `host:pid:token` (`new_owner_id`); a live owner renews its leases (`keep_claims_alive`).

Concurrency: the store is in WAL mode with a 60 s busy timeout, so several processes (the same command started
twice, or several workers) can share one file on one machine. Every write is one `BEGIN IMMEDIATE` transaction.
`claim_episodes` picks, in ascending order, the next episodes that are neither stored nor held by a live claim
(an expired claim is taken over, and so is the claim of an owner on this host whose process is gone: SIGKILL or
the out-of-memory killer leave claims behind) and records them with a lease, all in one transaction, so two
processes never hold the same episode at once. `add_episodes(..., owner=...)` stores a finished batch,
registers its run and deletes the owner's claims on it in one transaction: a batch is either fully stored or not
at all, and an episode stored twice (a lease that expired while its owner was still training) keeps its first row.
`release_claims` hands back an interrupted owner's claims. Rows never depend on which process trained an episode.

Read-only mode (`ResultStore(path, read_only=True)`, what reports use): the file is opened through SQLite's URI
`file:…?mode=ro`; nothing is created, no table is added or altered and the journal mode is left as it is. A WAL
store in a folder the reader cannot write (SQLite cannot create its `-shm` file there) is opened with
`immutable=1`, unless its `-wal` file holds changes not yet merged, which such a reader would not see (then a
`StoreError` says so). Stores written before a column existed read as NULL in that column.

In read-write mode, stores written before a column existed gain it when opened (NULL for their rows). A SQLite file
with tables of another program, or with any object cdfsl does not create (a trigger, which would run inside cdfsl's
own writes; a view; another table or index), is refused in both modes, and so is a read-only or damaged file:
every SQLite error at this boundary becomes a one-line `StoreError` naming the file and what to do.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cdfsl.errors import StoreError
from cdfsl.registry import BASES, PLUGINS

_TABLES = {
    "runs": """CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    run_name TEXT,
    dataset TEXT NOT NULL,
    method TEXT NOT NULL,
    backbone TEXT NOT NULL,
    pretrained TEXT NOT NULL,
    ways INTEGER NOT NULL,
    shots INTEGER NOT NULL,
    queries INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    config_json TEXT NOT NULL,
    identity_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    recipe TEXT
)""",
    "episodes": """CREATE TABLE IF NOT EXISTS episodes (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    episode INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    total INTEGER NOT NULL,
    accuracy REAL NOT NULL,
    seconds REAL NOT NULL,
    finished_at TEXT NOT NULL,
    trained_by TEXT,
    queries_json TEXT,
    curves_json TEXT,
    records_json TEXT,
    device TEXT,
    PRIMARY KEY (run_id, episode)
)""",
    "claims": """CREATE TABLE IF NOT EXISTS claims (
    run_id TEXT NOT NULL,
    episode INTEGER NOT NULL,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (run_id, episode)
)""",
}
# Columns of the first release, which every cdfsl store has.
_REQUIRED_COLUMNS = {
    "runs": {
        "run_id", "run_name", "dataset", "method", "backbone", "pretrained", "ways", "shots", "queries", "seed",
        "config_json", "identity_json", "created_at",
    },
    "episodes": {"run_id", "episode", "correct", "total", "accuracy", "seconds", "finished_at"},
    "claims": {"run_id", "episode", "owner", "expires_at"},
}  # fmt: skip
# Columns added after the first release, per table: (name, SQL type), appended to older stores when opened.
_ADDED_COLUMNS = {
    "runs": (("recipe", "TEXT"),),
    "episodes": (
        ("trained_by", "TEXT"),
        ("queries_json", "TEXT"),
        ("curves_json", "TEXT"),
        ("records_json", "TEXT"),
        ("device", "TEXT"),
    ),
}
# The one per-episode record that had a column of its own before `records_json` (VtT's switch-off step); read from
# stores that have it, never written.
_LEGACY_RECORD_COLUMN = "dlc_off_step"

_BUSY_TIMEOUT_S = 60.0
# The largest range of episode indices `claim_episodes` reads at once while it skips stored or claimed episodes.
_MAX_WINDOW = 1 << 16

# SQLite's primary result codes (the low byte of an extended code).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR = 5, 6, 8, 10
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 11, 13, 14, 26


@dataclass(frozen=True)
class EpisodeQueries:
    """An episode's queries: its class names in episode-label order, and each query's true and predicted label."""

    classes: tuple[str, ...]
    truth: tuple[int, ...]
    predicted: tuple[int, ...]

    @property
    def correct(self) -> int:
        return sum(t == p for t, p in zip(self.truth, self.predicted, strict=True))

    def to_json(self) -> str:
        return json.dumps(
            {"classes": list(self.classes), "truth": list(self.truth), "predicted": list(self.predicted)},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> EpisodeQueries:
        """Parse a stored row; raises `ValueError` when it is not a consistent record."""
        data = json.loads(text)
        classes, truth, predicted = data["classes"], data["truth"], data["predicted"]
        if not (
            isinstance(classes, list)
            and all(isinstance(c, str) for c in classes)
            and isinstance(truth, list)
            and isinstance(predicted, list)
            and len(truth) == len(predicted)
            and all(type(x) is int and 0 <= x < len(classes) for x in truth + predicted)
        ):
            raise ValueError("classes, truth and predicted do not form a per-query record")
        return cls(tuple(classes), tuple(truth), tuple(predicted))


@dataclass(frozen=True)
class EpisodeResult:
    """One finished episode: `correct` of `total` queries right, `seconds` of wall time attributed to it, its
    per-query labels, its training curves (`{"step": [...], name: [...]}`, see `cdfsl.methods.training.Curves`;
    None for a method that trains nothing) and its records: what the method recorded beyond accuracy, by name
    (`Method.episode_records` less `curves`; JSON values, e.g. VtT's `dlc_off_step`)."""

    episode: int
    correct: int
    total: int
    seconds: float
    queries: EpisodeQueries | None = None
    curves: dict[str, list[Any]] | None = None
    records: Mapping[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def records_json(records: Mapping[str, Any], where: str = "") -> str | None:
    """An episode's records as the text of its `records_json` cell (None when there are none).

    Raises `StoreError` for a record that JSON cannot hold as it is: a name that is not a string, a value that is not
    a JSON value (a tensor, a NumPy number, an object), or a number that is not finite (stored, it would read back
    as something else or not at all). `where` (`run R episode E`) starts the message."""
    prefix = f"{where}: " if where else ""
    if not records:
        return None
    names = [name for name in records if not isinstance(name, str)]
    if names:
        raise StoreError(
            f"{prefix}record names must be strings, not {names[0]!r}; name each per-episode record by a string"
        )
    try:
        return json.dumps(dict(records), separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise StoreError(
            f"{prefix}per-episode records {_shown(records)} cannot be stored ({error}): a method's `episode_records` "
            "must give finite JSON values (numbers, strings, booleans, null, lists and objects of them; convert "
            "tensors with `.item()` or `.tolist()`)"
        ) from None


def record_names(per_episode: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every record name in `per_episode` (each episode's records), in the order outputs show them.

    The one place that orders record names: first those the registered bases and plug-ins declare (`Record`), in
    the order of their declarations, then any other name alphabetically (a part registered in another process, a
    record no longer declared)."""
    present = {name for records in per_episode for name in records}
    parts = (*BASES.values(), *PLUGINS.values())
    declared = [name for name in dict.fromkeys(r.name for part in parts for r in part.records) if name in present]
    return declared + sorted(present - set(declared))


def _shown(records: Mapping[str, Any], limit: int = 200) -> str:
    text = repr(dict(records))
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class RunRecord:
    """A run as stored, with how many episodes it has finished."""

    run_id: str
    run_name: str | None
    dataset: str
    method: str
    backbone: str
    pretrained: str
    ways: int
    shots: int
    queries: int
    seed: int
    config: dict[str, Any]
    created_at: str
    episodes: int
    recipe: str | None = None

    @property
    def label(self) -> str:
        """One line naming the run: method, run name, dataset, shots, backbone and id."""
        name = f" {self.run_name}" if self.run_name else ""
        return f"{self.method}{name} on {self.dataset}, {self.shots}-shot, {self.backbone} (run {self.run_id})"

    def header(self) -> dict[str, Any]:
        """What names the run in a JSON output: id, name, method, recipe, backbone, dataset, shots."""
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "method": self.method,
            "recipe": self.recipe,
            "backbone": self.backbone,
            "dataset": self.dataset,
            "shots": self.shots,
        }


@dataclass(frozen=True)
class Holder:
    """One other owner's live claims on a run: `count` episodes between `first` and `last`, held by `owner`
    (`host:pid:token`, see `new_owner_id`) until Unix time `expires_at` unless its heartbeat renews them."""

    owner: str
    count: int
    first: int
    last: int
    expires_at: float

    @property
    def process(self) -> str:
        """The owner as a person reads it: `process PID on HOST` (or the raw id when it is not of that form)."""
        parts = self.owner.rsplit(":", 2)
        return f"process {parts[1]} on {parts[0]}" if len(parts) == 3 else self.owner


@dataclass(frozen=True)
class Pending:
    """Where a run stands among all processes: `stored` of its first episodes are stored, `claimed` more are held
    by live claims, and the earliest of those claims expires at Unix time `next_expiry` (None: no live claim).
    `holders`: the live claims per owner."""

    stored: int
    claimed: int
    next_expiry: float | None
    holders: tuple[Holder, ...] = ()


class ResultStore:
    """A SQLite file of runs and finished episodes. Use as a context manager or call `close()`.

    Args:
        path: the SQLite file; in read-write mode it is created when missing (its folder must exist).
        read_only: open without writing anything (see the module docstring); a missing file is a `StoreError`.
    """

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._columns: dict[str, set[str]] = {}
        self._db = self._open_read_only() if read_only else self._open_read_write()
        try:
            with self._guard():
                self._inspect()
                if not read_only:
                    self._prepare()
        except BaseException:
            self._db.close()
            raise

    # ------------------------------------------------------------------------------------------------------
    # opening

    def _connect(self, target: str | Path, uri: bool = False) -> sqlite3.Connection:
        with self._guard():
            return sqlite3.connect(target, timeout=_BUSY_TIMEOUT_S, isolation_level=None, uri=uri)

    def _open_read_write(self) -> sqlite3.Connection:
        folder = self.path.parent
        if not folder.is_dir():
            raise StoreError(f"cannot create result store {self.path}: folder {folder} does not exist")
        if self.path.exists():
            if not self.path.is_file():
                raise StoreError(f"result store {self.path} is not a file; pass a SQLite file with --db")
            if not os.access(self.path, os.W_OK):
                raise StoreError(self._read_only_message())
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(self._read_only_message())
        return self._connect(self.path)

    def _open_read_only(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise StoreError(f"no result store at {self.path}; run `cdfsl run` first or pass --db")
        if not self.path.is_file():
            raise StoreError(f"result store {self.path} is not a file; pass a SQLite file with --db")
        uri = self.path.resolve().as_uri() + "?mode=ro"
        db = self._connect(uri, uri=True)
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
            return db
        except sqlite3.Error as error:
            db.close()
            if _primary_code(error) not in (_SQLITE_READONLY, _SQLITE_CANTOPEN):
                raise self._store_error(error) from None
        # A WAL store in a folder this process cannot write: SQLite cannot create the `-shm` file it reads
        # through. Nobody can be writing it either, so read the file as it is, unless its `-wal` holds changes.
        wal = Path(f"{self.path}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(
                f"result store {self.path} has changes in {wal} that a reader of a read-only folder cannot see; "
                f"open it once with write access to {self.path.parent} (e.g. run `cdfsl report` as its owner) or "
                "copy the folder elsewhere"
            )
        db = self._connect(uri + "&immutable=1", uri=True)
        try:
            with self._guard():
                db.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
        except BaseException:
            db.close()
            raise
        return db

    def _inspect(self) -> None:
        """Read which tables and columns the file has; refuse another program's file; touch every table's and
        primary key's root page, so a damaged store fails on opening rather than halfway through a run."""
        objects = list(self._db.execute("SELECT type, name FROM sqlite_master"))
        tables = {name for kind, name in objects if kind == "table" and not name.startswith("sqlite_")}
        if tables and not tables & {"runs", "episodes"}:
            raise StoreError(
                f"{self.path} is not a cdfsl result store (it holds tables {', '.join(sorted(tables))}); pass a store "
                "written by `cdfsl run`, or a new file, with --db"
            )
        foreign = sorted((kind, name) for kind, name in objects if not _created_by_cdfsl(kind, name))
        if foreign:
            kind, name = foreign[0]
            more = f" and {len(foreign) - 1} more object(s)" if len(foreign) > 1 else ""
            raise StoreError(
                f"{self.path} holds {kind} {name!r}{more}, which cdfsl did not create (a trigger or view could change "
                "what is stored or read), so it is treated as another program's file; pass a store written by "
                "`cdfsl run`, or a new file, with --db"
            )
        self._columns = {}
        for table in _TABLES:
            if table in tables:
                self._columns[table] = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                missing = _REQUIRED_COLUMNS[table] - self._columns[table]
                if missing:
                    raise StoreError(
                        f"{self.path} is not a cdfsl result store (its table {table} lacks "
                        f"{', '.join(sorted(missing))}); pass a store written by `cdfsl run`, or a new file, with --db"
                    )
                key = "episode" if table != "runs" else "run_id"
                self._db.execute(f"SELECT * FROM {table} NOT INDEXED LIMIT 1").fetchall()
                self._db.execute(f"SELECT {key} FROM {table} WHERE run_id = '' LIMIT 1").fetchall()

    def _prepare(self) -> None:
        """Switch to WAL, create missing tables and columns, and check that the file can be written."""
        self._use_wal()
        with self._write() as db:
            for create in _TABLES.values():
                db.execute(create)
            for table, columns in _ADDED_COLUMNS.items():
                present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, sql_type in columns:
                    if name not in present:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
            # A write that changes nothing: SQLite refuses it at once when the file cannot be written.
            db.execute("DELETE FROM claims WHERE 0")
            self._columns = {table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")} for table in _TABLES}

    def _use_wal(self) -> None:
        """Put the file in WAL mode. Two processes opening a new store at once may both try: SQLite then answers one
        of them SQLITE_BUSY at once (each holds the shared lock the other must see go), so a busy answer is retried
        after a short random pause, until the file is in WAL mode or the busy timeout has passed."""
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:
                self._db.execute("PRAGMA journal_mode=WAL").fetchall()
                return  # switched, or a mode SQLite keeps here (as before: the store works in it)
            except sqlite3.OperationalError as error:
                if _primary_code(error) not in (_SQLITE_BUSY, _SQLITE_LOCKED) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.01, 0.05))

    # ------------------------------------------------------------------------------------------------------
    # errors and transactions

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn SQLite errors (and unreadable stored JSON) into a `StoreError` naming the file."""
        try:
            yield
        except sqlite3.Error as error:
            raise self._store_error(error) from None
        except json.JSONDecodeError as error:
            raise StoreError(self._damaged_message(f"unreadable stored config: {error}")) from None

    def _store_error(self, error: sqlite3.Error) -> StoreError:
        code = _primary_code(error)
        path = self.path
        if code == _SQLITE_READONLY:
            return StoreError(self._read_only_message())
        if code == _SQLITE_CORRUPT:
            return StoreError(self._damaged_message(str(error)))
        if code == _SQLITE_NOTADB:
            return StoreError(
                f"{path} is not a SQLite file ({error}); pass the result store `cdfsl run` wrote with --db"
            )
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return StoreError(
                f"result store {path} stayed locked by another process for {_BUSY_TIMEOUT_S:.0f} s ({error}); "
                "retry when it is done"
            )
        if code == _SQLITE_FULL:
            return StoreError(
                f"result store {path}: the disk is full; free space and run again (stored episodes are kept)"
            )
        if code == _SQLITE_CANTOPEN:
            return StoreError(
                f"cannot open result store {path} ({error}); check that it and its folder exist and are readable "
                "(and writable for `cdfsl run`)"
            )
        if code == _SQLITE_IOERR:
            return StoreError(f"cannot read or write result store {path} ({error}); check the disk and its filesystem")
        return StoreError(f"result store {path} failed: {error}")

    def _read_only_message(self) -> str:
        if self.path.exists() and not os.access(self.path, os.W_OK):
            return (
                f"result store {self.path} is read-only; make it writable (chmod u+w {self.path}) or pass another --db"
            )
        return (
            f"result store {self.path} is in a read-only folder (SQLite writes its journal beside it); make "
            f"{self.path.parent} writable or pass another --db"
        )

    def _damaged_message(self, detail: str) -> str:
        return (
            f"result store {self.path} is damaged ({detail}); restore it from a backup, or salvage its rows with "
            f"`sqlite3 {self.path} .recover | sqlite3 recovered.sqlite` and pass that file with --db"
        )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One `BEGIN IMMEDIATE` transaction: committed when the block ends, rolled back on any exception."""
        if self.read_only:
            raise StoreError(f"result store {self.path} was opened read-only; open it without read_only to write")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query in the block sees the same snapshot."""
        self._db.execute("BEGIN")
        try:
            yield self._db
        finally:
            if self._db.in_transaction:
                with suppress(sqlite3.Error):
                    self._db.execute("COMMIT")

    def _has(self, table: str, column: str | None = None) -> bool:
        return table in self._columns and (column is None or column in self._columns[table])

    def _rows(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._guard():
            return self._db.execute(sql, parameters).fetchall()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------------------------------------------
    # writing

    def register_run(self, run_id: str, config: dict[str, Any], identity: dict[str, Any]) -> None:
        """Record a run's configuration once; a later call with the same id only updates a given run name."""
        with self._guard(), self._write() as db:
            self._register(db, run_id, config, identity)

    @staticmethod
    def _register(db: sqlite3.Connection, run_id: str, config: dict[str, Any], identity: dict[str, Any]) -> None:
        db.execute(
            "INSERT OR IGNORE INTO runs (run_id, run_name, dataset, method, backbone, pretrained, ways, shots,"
            " queries, seed, config_json, identity_json, created_at, recipe)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                config.get("run_name"),
                config["dataset"],
                config["method"],
                config["backbone"],
                config["pretrained"],
                config["ways"],
                config["shots"],
                config["queries"],
                config["seed"],
                json.dumps(config, sort_keys=True),
                json.dumps(identity, sort_keys=True),
                _now(),
                config.get("recipe"),
            ),
        )
        if config.get("run_name"):
            db.execute("UPDATE runs SET run_name = ? WHERE run_id = ?", (config["run_name"], run_id))

    def add_episodes(
        self,
        run_id: str,
        results: Iterable[EpisodeResult],
        *,
        owner: str | None = None,
        config: dict[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
        device: str | None = None,
    ) -> int:
        """Store finished episodes in one transaction; an episode already stored is kept as it was. Returns how
        many rows were added (the episodes not stored before).

        With `config` and `identity`, the run is registered (as `register_run`) in the same transaction. With
        `owner`, the rows record it as `trained_by` and the owner's claims on these episodes are deleted. `device`:
        the model of the device that trained them (`engine.reproducibility.device_model`), read by `episode_devices`.
        """
        finished = _now()
        results = list(results)
        rows = [
            (
                run_id,
                r.episode,
                r.correct,
                r.total,
                r.accuracy,
                r.seconds,
                finished,
                owner,
                r.queries.to_json() if r.queries is not None else None,
                json.dumps(r.curves, separators=(",", ":")) if r.curves else None,
                records_json(r.records, f"run {run_id} episode {r.episode}"),
                device,
            )
            for r in results
        ]  # encoded before the transaction: a record that cannot be stored stores nothing of the batch
        with self._guard(), self._write() as db:
            if config is not None and identity is not None:
                self._register(db, run_id, config, identity)
            added = db.executemany(
                "INSERT OR IGNORE INTO episodes (run_id, episode, correct, total, accuracy, seconds, finished_at,"
                " trained_by, queries_json, curves_json, records_json, device)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if owner is not None:
                db.executemany(
                    "DELETE FROM claims WHERE run_id = ? AND episode = ? AND owner = ?",
                    [(run_id, r.episode, owner) for r in results],
                )
        return max(added.rowcount, 0)

    def claim_episodes(
        self, run_id: str, below: int, count: int, owner: str, lease_seconds: float, start: int = 0
    ) -> tuple[list[int], int]:
        """Claim up to `count` episodes in `[start, below)`, ascending, that are neither stored nor held by a live
        claim (expired claims are taken over), for `lease_seconds` from now, in one transaction.

        Returns the claimed episodes and where to continue: every episode in `[start, next)` is now stored or
        claimed. Reading is windowed, so a scan costs time linear in the episodes it passes and memory bounded by
        `max(count, 65536)` indices.
        """
        claimed: list[int] = []
        position = start
        window = max(count, 64)
        with self._guard(), self._write() as db:
            now = time.time()
            self._forget_gone_owners(db, run_id, now)
            while len(claimed) < count and position < below:
                end = min(below, position + window)
                window = min(window * 4, max(count, _MAX_WINDOW))
                stored_count = db.execute(
                    "SELECT COUNT(*) FROM episodes WHERE run_id = ? AND episode >= ? AND episode < ?",
                    (run_id, position, end),
                ).fetchone()[0]
                if stored_count == end - position:
                    position = end
                    continue
                taken = {
                    row[0]
                    for row in db.execute(
                        "SELECT episode FROM episodes WHERE run_id = ? AND episode >= ? AND episode < ?"
                        " UNION SELECT episode FROM claims WHERE run_id = ? AND episode >= ? AND episode < ?"
                        " AND expires_at > ?",
                        (run_id, position, end, run_id, position, end, now),
                    )
                }
                while position < end and len(claimed) < count:
                    if position not in taken:
                        claimed.append(position)
                    position += 1
            db.executemany(
                "INSERT OR REPLACE INTO claims (run_id, episode, owner, expires_at) VALUES (?, ?, ?, ?)",
                [(run_id, episode, owner, now + lease_seconds) for episode in claimed],
            )
        return claimed, position

    @staticmethod
    def _forget_gone_owners(db: sqlite3.Connection, run_id: str, now: float) -> None:
        """Delete the claims of owners on this host whose process is gone (killed by SIGKILL or out of memory): their
        episodes are free at once rather than when the lease runs out."""
        owners = [
            row[0]
            for row in db.execute(
                "SELECT DISTINCT owner FROM claims WHERE run_id = ? AND expires_at > ?", (run_id, now)
            )
        ]
        db.executemany("DELETE FROM claims WHERE owner = ?", [(owner,) for owner in owners if owner_is_gone(owner)])

    def renew_claims(self, owner: str, lease_seconds: float) -> int:
        """Extend every claim of `owner` to `lease_seconds` from now; returns how many claims it holds."""
        with self._guard(), self._write() as db:
            return db.execute(
                "UPDATE claims SET expires_at = ? WHERE owner = ?", (time.time() + lease_seconds, owner)
            ).rowcount

    @contextmanager
    def keep_claims_alive(self, owner: str, lease_seconds: float) -> Iterator[None]:
        """While the block runs, a background thread renews `owner`'s claims every quarter lease (through its own
        connection), so a claim outlives a batch of any length while its process lives and lapses within
        `lease_seconds` once it does not."""
        heartbeat = _Heartbeat(self.path, owner, lease_seconds)
        heartbeat.start()
        try:
            yield
        finally:
            heartbeat.halt()

    def release_claims(self, run_id: str, owner: str) -> None:
        """Delete `owner`'s claims on the run's episodes, so other processes may train them at once."""
        with self._guard(), self._write() as db:
            db.execute("DELETE FROM claims WHERE run_id = ? AND owner = ?", (run_id, owner))

    def adopt_run(self, old_id: str, new_id: str, identity: dict[str, Any]) -> int:
        """Move the run stored as `old_id` (its row, episodes and claims) to `new_id` with `identity`, in one
        transaction, when `new_id` has no row yet: how a run stored under an earlier version's identity
        (`RunConfig.legacy_identity`) keeps serving its episodes. Returns the number of episodes moved (0 when there
        was nothing to adopt)."""
        with self._guard(), self._write() as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (new_id,)).fetchone() is not None:
                return 0
            if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (old_id,)).fetchone() is None:
                return 0
            columns = [row[1] for row in db.execute("PRAGMA table_info(runs)")]
            replaced = {"run_id": new_id, "identity_json": json.dumps(identity, sort_keys=True)}
            selected = ", ".join("?" if c in replaced else c for c in columns)
            db.execute(
                f"INSERT INTO runs ({', '.join(columns)}) SELECT {selected} FROM runs WHERE run_id = ?",
                (*(replaced[c] for c in columns if c in replaced), old_id),
            )
            moved = db.execute("UPDATE episodes SET run_id = ? WHERE run_id = ?", (new_id, old_id)).rowcount
            if self._has("claims"):
                db.execute("UPDATE claims SET run_id = ? WHERE run_id = ?", (new_id, old_id))
            db.execute("DELETE FROM runs WHERE run_id = ?", (old_id,))
        return moved

    # ------------------------------------------------------------------------------------------------------
    # reading

    def pending(self, run_id: str, below: int) -> Pending:
        """How many of episodes `0 … below−1` are stored, and how many more are held by live claims."""
        with self._guard(), self._read() as db:
            now = time.time()
            stored = db.execute(
                "SELECT COUNT(*) FROM episodes WHERE run_id = ? AND episode < ?", (run_id, below)
            ).fetchone()[0]
            holders: list[Holder] = []
            if self._has("claims"):
                rows = db.execute(
                    "SELECT c.owner, COUNT(*), MIN(c.episode), MAX(c.episode), MAX(c.expires_at) FROM claims c"
                    " WHERE c.run_id = ? AND c.episode < ? AND c.expires_at > ? AND NOT EXISTS"
                    " (SELECT 1 FROM episodes e WHERE e.run_id = c.run_id AND e.episode = c.episode)"
                    " GROUP BY c.owner ORDER BY MIN(c.episode)",
                    (run_id, below, now),
                ).fetchall()
                holders = [Holder(*row) for row in rows if not owner_is_gone(row[0])]
        next_expiry = min((h.expires_at for h in holders), default=None)
        return Pending(stored, sum(h.count for h in holders), next_expiry, tuple(holders))

    def accuracies_since(self, run_id: str, below: int, marker: int = 0) -> tuple[list[float], int]:
        """Accuracies of the run's episodes `< below` stored after `marker` (0: all), and the marker to pass next.

        The marker is the largest row id seen; rows are never deleted, so later rows have larger ids. Reading
        after a marker costs time in the rows added since, not in the rows stored before.
        """
        if not self._has("episodes"):
            return [], marker
        with self._guard(), self._read() as db:
            if marker == 0:
                rows = db.execute(
                    "SELECT accuracy FROM episodes WHERE run_id = ? AND episode < ?", (run_id, below)
                ).fetchall()
            else:  # `+` keeps SQLite on the row-id range rather than the (run_id, episode) index
                rows = db.execute(
                    "SELECT accuracy FROM episodes WHERE rowid > ? AND +run_id = ? AND +episode < ?",
                    (marker, run_id, below),
                ).fetchall()
            latest = db.execute("SELECT MAX(rowid) FROM episodes").fetchone()[0]
        return [row[0] for row in rows], max(marker, latest or 0)

    def finished_episodes(self, run_id: str) -> set[int]:
        """The run's stored episode indices."""
        if not self._has("episodes"):
            return set()
        return {row[0] for row in self._rows("SELECT episode FROM episodes WHERE run_id = ?", (run_id,))}

    def _per_episode(self, column: str, run_id: str, below: int | None) -> dict[int, Any]:
        if not self._has("episodes"):
            return {}
        value = column if self._has("episodes", column) else "NULL"
        if below is None:
            sql, parameters = "WHERE run_id = ?", (run_id,)
        else:
            sql, parameters = "WHERE run_id = ? AND episode < ?", (run_id, below)
        rows = self._rows(f"SELECT episode, {value} FROM episodes {sql} ORDER BY episode", parameters)
        return {episode: item for episode, item in rows}

    def episode_accuracies(self, run_id: str, below: int | None = None) -> dict[int, float]:
        """Episode index → accuracy in [0, 1], for every stored episode of the run (only those `< below`)."""
        return self._per_episode("accuracy", run_id, below)

    def episode_devices(self, run_id: str, below: int | None = None) -> dict[int, str | None]:
        """Episode index → the model of the device that trained it (`cpu: <processor>` or the GPU's name; None in
        rows stored before cdfsl recorded it), for every stored episode of the run (only those `< below`)."""
        return self._per_episode("device", run_id, below)

    def episode_records(self, run_id: str, below: int | None = None) -> dict[int, dict[str, Any]]:
        """Episode index → what the method recorded for it beyond accuracy, by name (empty: nothing recorded, or
        stored before cdfsl kept records), for every stored episode of the run (only those `< below`).

        A row of an older store with a value in its legacy `dlc_off_step` column and no records reads as
        `{"dlc_off_step": value}`. Raises `StoreError` naming the run and episode for a cell that is not a JSON
        object."""
        stored = self._per_episode("records_json", run_id, below)
        legacy = self._per_episode(_LEGACY_RECORD_COLUMN, run_id, below)
        found: dict[int, dict[str, Any]] = {}
        for episode, text in stored.items():
            try:
                records = json.loads(text) if text is not None else {}
                if not isinstance(records, dict):
                    raise ValueError(f"a JSON object of named records was expected, not {type(records).__name__}")
            except ValueError as error:
                raise StoreError(
                    f"{self.path}: run {run_id} episode {episode} has malformed records: {error}; the store was "
                    "changed outside cdfsl"
                ) from None
            if not records and legacy.get(episode) is not None:
                records = {_LEGACY_RECORD_COLUMN: legacy[episode]}
            found[episode] = records
        return found

    def episode_queries(self, run_id: str) -> dict[int, EpisodeQueries | None]:
        """Episode index → its per-query labels (None: stored before cdfsl kept them).

        Raises `StoreError` naming the run and episode when a stored record is malformed or disagrees with the
        episode's stored count of correct queries.
        """
        if not self._has("episodes"):
            return {}
        value = "queries_json" if self._has("episodes", "queries_json") else "NULL"
        rows = self._rows(
            f"SELECT episode, correct, total, {value} FROM episodes WHERE run_id = ? ORDER BY episode", (run_id,)
        )
        found: dict[int, EpisodeQueries | None] = {}
        for episode, correct, total, text in rows:
            if text is None:
                found[episode] = None
                continue
            try:
                queries = EpisodeQueries.from_json(text)
            except (ValueError, KeyError, TypeError) as error:
                raise StoreError(
                    f"{self.path}: run {run_id} episode {episode} has a malformed per-query record: {error}"
                ) from None
            if (queries.correct, len(queries.truth)) != (correct, total):
                raise StoreError(
                    f"{self.path}: run {run_id} episode {episode}: its per-query record gives {queries.correct} of "
                    f"{len(queries.truth)} correct, its row {correct} of {total}; the store was changed outside cdfsl"
                )
            found[episode] = queries
        return found

    def episode_curves(self, run_id: str) -> dict[int, dict[str, list[Any]] | None]:
        """Episode index → its training curves (None: a method that trains nothing, or stored before cdfsl kept
        them). Raises `StoreError` naming the run and episode for a record that is not a set of curves."""
        found: dict[int, dict[str, list[Any]] | None] = {}
        for episode, text in self._per_episode("curves_json", run_id, None).items():
            if text is None:
                found[episode] = None
                continue
            try:
                curves = json.loads(text)
                steps = curves["step"]
                if not all(isinstance(v, list) and len(v) == len(steps) for v in curves.values()):
                    raise ValueError("every curve must have one value per step")
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise StoreError(f"{self.path}: run {run_id} episode {episode} has malformed curves: {error}") from None
            found[episode] = curves
        return found

    def episode_seconds(self, run_id: str, below: int | None = None) -> dict[int, float]:
        """Episode index → wall seconds attributed to the episode."""
        return self._per_episode("seconds", run_id, below)

    def run_identity(self, run_id: str) -> dict[str, Any]:
        """The stored identity of run `run_id` (what its id hashes: `RunConfig.identity`); empty when unknown."""
        if not self._has("runs"):
            return {}
        rows = self._rows("SELECT identity_json FROM runs WHERE run_id = ?", (run_id,))
        return dict(json.loads(rows[0][0])) if rows else {}

    def runs(self) -> list[RunRecord]:
        """All runs with at least one stored episode, oldest first."""
        if not (self._has("runs") and self._has("episodes")):
            return []
        recipe = "r.recipe" if self._has("runs", "recipe") else "NULL"
        rows = self._rows(
            "SELECT r.run_id, r.run_name, r.dataset, r.method, r.backbone, r.pretrained, r.ways, r.shots,"
            f" r.queries, r.seed, r.config_json, r.created_at, COUNT(e.episode), {recipe}"
            " FROM runs r JOIN episodes e ON e.run_id = r.run_id"
            " GROUP BY r.run_id ORDER BY r.created_at, r.run_id"
        )
        with self._guard():
            return [
                RunRecord(*row[:10], config=json.loads(row[10]), created_at=row[11], episodes=row[12], recipe=row[13])
                for row in rows
            ]


class _Heartbeat(threading.Thread):
    """Renews one owner's claims every quarter lease until halted, through its own SQLite connection. A renewal
    that fails (a store locked for long) is skipped: the lease may then lapse and another process may train the same
    episodes, whose rows are identical (the first stored is kept), so only work is doubled."""

    def __init__(self, path: Path, owner: str, lease_seconds: float) -> None:
        super().__init__(name="cdfsl-claims-heartbeat", daemon=True)
        self._path, self._owner, self._lease = path, owner, lease_seconds
        self._halted = threading.Event()

    def run(self) -> None:
        interval = self._lease / 4
        with suppress(sqlite3.Error):
            db = sqlite3.connect(self._path, timeout=min(interval, _BUSY_TIMEOUT_S), isolation_level=None)
            try:
                while not self._halted.wait(interval):
                    with suppress(sqlite3.Error):
                        db.execute(
                            "UPDATE claims SET expires_at = ? WHERE owner = ?", (time.time() + self._lease, self._owner)
                        )
            finally:
                db.close()

    def halt(self) -> None:
        self._halted.set()
        self.join()


def new_owner_id() -> str:
    """A claim owner id unique to this process: `host:pid:token` (the random token tells apart a later process that
    reuses the pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_is_gone(owner: str) -> bool:
    """Whether `owner` (see `new_owner_id`) was a process of this host that no longer runs. Owners of other hosts,
    and ids of another form, are never judged gone: their claims lapse when their lease is not renewed."""
    parts = owner.rsplit(":", 2)
    if os.name != "posix" or len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's process, alive
        return False
    try:  # a killed process its parent has not reaped yet still answers signal 0
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _created_by_cdfsl(kind: str, name: str) -> bool:
    """Whether a `sqlite_master` entry is one cdfsl creates: its tables, their primary-key indexes, or SQLite's own
    statistics tables (`ANALYZE`). Triggers, views and any other table or index are not."""
    if kind == "table":
        return name in _TABLES or name.startswith("sqlite_stat")
    if kind == "index":
        return any(name.startswith(f"sqlite_autoindex_{table}_") for table in _TABLES)
    return False


def _primary_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF
    message = str(error).lower()  # errors raised before SQLite returned a code
    if "readonly" in message or "read-only" in message:
        return _SQLITE_READONLY
    if "malformed" in message:
        return _SQLITE_CORRUPT
    if "not a database" in message:
        return _SQLITE_NOTADB
    if "locked" in message:
        return _SQLITE_BUSY
    if "unable to open" in message:
        return _SQLITE_CANTOPEN
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
