"""The result store: one SQLite row per finished episode, so runs resume and reports read only data.

Schema (bound parameters only; names and config values are data, never SQL):

- `runs(run_id PK, run_name, dataset, method, backbone, pretrained, ways, shots, queries, seed, config_json,
  identity_json, created_at, recipe)`; `config_json` is the resolved config (every recipe value filled in).
- `episodes(run_id, episode, correct, total, accuracy, seconds, finished_at, dlc_off_step, PK(run_id, episode))`,
  accuracy in [0, 1]; `dlc_off_step` is the training step at which VtT's DGSO switched `L_VtT` off (NULL: never, or
  not VtT).

Stores written before a column existed gain it when opened (NULL for their rows). WAL mode and a busy timeout let
several worker processes append to one file.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cdfsl.errors import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
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
);
CREATE TABLE IF NOT EXISTS episodes (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    episode INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    total INTEGER NOT NULL,
    accuracy REAL NOT NULL,
    seconds REAL NOT NULL,
    finished_at TEXT NOT NULL,
    dlc_off_step INTEGER,
    PRIMARY KEY (run_id, episode)
);
"""
# Columns added after the first release, per table: (name, SQL type), appended to older stores when opened.
_ADDED_COLUMNS = {"runs": (("recipe", "TEXT"),), "episodes": (("dlc_off_step", "INTEGER"),)}


@dataclass(frozen=True)
class EpisodeResult:
    """One finished episode: `correct` of `total` queries right, `seconds` of wall time attributed to it, and the
    step at which VtT's DGSO switched `L_VtT` off (None: never, or not VtT)."""

    episode: int
    correct: int
    total: int
    seconds: float
    dlc_off_step: int | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


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


class ResultStore:
    """A SQLite file of runs and finished episodes. Use as a context manager or call `close()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise StoreError(f"cannot create result store {self.path}: folder {self.path.parent} does not exist")
        try:
            self._db = sqlite3.connect(self.path, timeout=60.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
        except sqlite3.DatabaseError as error:
            raise StoreError(f"cannot open result store {self.path}: {error} (is it a cdfsl SQLite file?)") from None

    def _add_missing_columns(self) -> None:
        with self._db:
            for table, columns in _ADDED_COLUMNS.items():
                present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for name, sql_type in columns:
                    if name not in present:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db:
            yield self._db

    def register_run(self, run_id: str, config: dict[str, Any], identity: dict[str, Any]) -> None:
        """Record a run's configuration once; a later call with the same id only updates a given run name."""
        with self._transaction() as db:
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

    def finished_episodes(self, run_id: str) -> set[int]:
        rows = self._db.execute("SELECT episode FROM episodes WHERE run_id = ?", (run_id,))
        return {row[0] for row in rows}

    def add_episodes(self, run_id: str, results: Iterable[EpisodeResult]) -> None:
        """Store finished episodes in one transaction; an episode already stored is kept as it was."""
        finished = _now()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO episodes (run_id, episode, correct, total, accuracy, seconds, finished_at,"
                " dlc_off_step) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (run_id, r.episode, r.correct, r.total, r.accuracy, r.seconds, finished, r.dlc_off_step)
                    for r in results
                ],
            )

    def episode_accuracies(self, run_id: str) -> dict[int, float]:
        """Episode index → accuracy in [0, 1], for every stored episode of the run."""
        rows = self._db.execute("SELECT episode, accuracy FROM episodes WHERE run_id = ? ORDER BY episode", (run_id,))
        return {episode: accuracy for episode, accuracy in rows}

    def episode_dlc_off_steps(self, run_id: str) -> dict[int, int | None]:
        """Episode index → the step at which DGSO switched `L_VtT` off (None: never, or not VtT)."""
        rows = self._db.execute(
            "SELECT episode, dlc_off_step FROM episodes WHERE run_id = ? ORDER BY episode", (run_id,)
        )
        return {episode: step for episode, step in rows}

    def episode_seconds(self, run_id: str) -> dict[int, float]:
        rows = self._db.execute("SELECT episode, seconds FROM episodes WHERE run_id = ? ORDER BY episode", (run_id,))
        return {episode: seconds for episode, seconds in rows}

    def runs(self) -> list[RunRecord]:
        """All runs with at least one stored episode, oldest first."""
        rows = self._db.execute(
            "SELECT r.run_id, r.run_name, r.dataset, r.method, r.backbone, r.pretrained, r.ways, r.shots,"
            " r.queries, r.seed, r.config_json, r.created_at, COUNT(e.episode), r.recipe"
            " FROM runs r JOIN episodes e ON e.run_id = r.run_id"
            " GROUP BY r.run_id ORDER BY r.created_at, r.run_id"
        )
        return [
            RunRecord(*row[:10], config=json.loads(row[10]), created_at=row[11], episodes=row[12], recipe=row[13])
            for row in rows
        ]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
