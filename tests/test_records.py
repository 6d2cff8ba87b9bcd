"""Per-episode records stored generically: one JSON column of named values, refused when JSON cannot hold them, older
stores (VtT's `dlc_off_step` column) read as they are, and reports, `compare` and `--json` showing every record by
name, summarised by hand-computed numbers."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import torch

from cdfsl.analysis.compare import compare_runs, record_lines
from cdfsl.analysis.records import RecordSummary, summarise_records
from cdfsl.analysis.report import build_report, render
from cdfsl.config import RunConfig
from cdfsl.engine.runner import RunResult
from cdfsl.engine.store import EpisodeResult, ResultStore, record_names
from cdfsl.errors import StoreError

TOTAL = 75
IDENTITY = {"dataset": "digits", "index": "abc", "ways": 5, "shots": 1, "queries": 15, "seed": 0}

# The schema before `records_json` (cdfsl's store until per-episode records were stored generically): VtT's switch-off
# step had a column of its own, and every other record was dropped.
PREVIOUS_SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, run_name TEXT, dataset TEXT NOT NULL, method TEXT NOT NULL, backbone TEXT NOT NULL,
    pretrained TEXT NOT NULL, ways INTEGER NOT NULL, shots INTEGER NOT NULL, queries INTEGER NOT NULL,
    seed INTEGER NOT NULL, config_json TEXT NOT NULL, identity_json TEXT NOT NULL, created_at TEXT NOT NULL,
    recipe TEXT
);
CREATE TABLE episodes (
    run_id TEXT NOT NULL REFERENCES runs(run_id), episode INTEGER NOT NULL, correct INTEGER NOT NULL,
    total INTEGER NOT NULL, accuracy REAL NOT NULL, seconds REAL NOT NULL, finished_at TEXT NOT NULL,
    dlc_off_step INTEGER, trained_by TEXT, queries_json TEXT, curves_json TEXT,
    PRIMARY KEY (run_id, episode)
);
CREATE TABLE claims (
    run_id TEXT NOT NULL, episode INTEGER NOT NULL, owner TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (run_id, episode)
);
"""


def config_of(method: str) -> dict[str, Any]:
    return {
        "dataset": "digits", "method": method, "backbone": "tiny", "pretrained": "none", "ways": 5, "shots": 1,
        "queries": 15, "seed": 0, "run_name": None, "train": {"lr": 2e-4},
    }  # fmt: skip


def add_run(store: ResultStore, run_id: str, method: str, records: list[dict[str, Any]]) -> None:
    """A run of `method` whose episode i has 60 of 75 right and `records[i]`."""
    results = [EpisodeResult(i, 60, TOTAL, 0.1, records=r) for i, r in enumerate(records)]
    store.add_episodes(run_id, results, config=config_of(method), identity=IDENTITY)


MAPLE = [
    {"maple_first_epoch_loss": 2.5, "maple_last_epoch_loss": 0.5},
    {"maple_first_epoch_loss": 2.0, "maple_last_epoch_loss": 1.0},
    {"maple_first_epoch_loss": 1.5, "maple_last_epoch_loss": 0.25},
]
VTT = [{"dlc_off_step": 3}, {"dlc_off_step": None}, {"dlc_off_step": 10}, {"dlc_off_step": 5}]


def test_records_round_trip_by_name_beside_curves(tmp_path: Path) -> None:
    curves = {"step": [1, 2], "loss_ce": [1.0, 0.5]}
    nested = {"dlc_off_step": None, "losses": [1.0, 0.5], "tag": "a", "flags": {"on": True}}
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.add_episodes(
            "r",
            [EpisodeResult(0, 1, 2, 0.1, curves=curves, records=nested), EpisodeResult(1, 2, 2, 0.1)],
            config=config_of("lora"),
            identity=IDENTITY,
        )
        assert store.episode_records("r") == {0: nested, 1: {}}
        assert store.episode_records("r", below=1) == {0: nested}
        assert store.episode_curves("r") == {0: curves, 1: None}
    with closing(sqlite3.connect(tmp_path / "r.sqlite")) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(episodes)")}
        (text,) = connection.execute("SELECT records_json FROM episodes WHERE episode = 0").fetchone()
    assert "records_json" in columns and "dlc_off_step" not in columns  # a new store has no legacy column
    assert json.loads(text) == nested


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ({"loss": float("nan")}, "Out of range float"),
        ({"loss": [1.0, float("inf")]}, "Out of range float"),
        ({"loss": torch.tensor(1.0)}, "not JSON serializable"),
        ({"loss": object()}, "not JSON serializable"),
        ({3: 1.0}, "record names must be strings"),
    ],
)
def test_records_json_cannot_hold_are_refused_and_nothing_of_the_batch_is_stored(
    tmp_path: Path, records: dict[Any, Any], reason: str
) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        batch = [EpisodeResult(0, 1, 2, 0.1, records={"ok": 1}), EpisodeResult(1, 1, 2, 0.1, records=records)]
        with pytest.raises(StoreError, match=f"^run r episode 1: .*{reason}"):
            store.add_episodes("r", batch, config=config_of("lora"), identity=IDENTITY)
        assert store.episode_records("r") == {} and store.runs() == []


def previous_store(db: Path) -> None:
    """A store written before `records_json`: a VtT run (steps 7, never, 12) and a LoRA run (no step)."""
    with closing(sqlite3.connect(db)) as connection:
        connection.executescript(PREVIOUS_SCHEMA)
        for method, steps in (("vtt", [7, None, 12]), ("lora", [None, None, None])):
            connection.execute(
                "INSERT INTO runs VALUES (?, NULL, 'digits', ?, 'tiny', 'none', 5, 1, 15, 0, ?, ?, ?, NULL)",
                (method, method, json.dumps(config_of(method)), json.dumps(IDENTITY), f"2025-01-0{len(method)}"),
            )
            for episode, step in enumerate(steps):
                connection.execute(
                    "INSERT INTO episodes VALUES (?, ?, 60, 75, 0.8, 0.1, '2025-01-01', ?, NULL, NULL, NULL)",
                    (method, episode, step),
                )
        connection.commit()


def test_previous_store_reads_its_switch_off_step_as_vtts_record(tmp_path: Path) -> None:
    db = tmp_path / "previous.sqlite"
    previous_store(db)
    before = db.read_bytes()
    with ResultStore(db, read_only=True) as store:
        assert store.episode_records("vtt") == {0: {"dlc_off_step": 7}, 1: {}, 2: {"dlc_off_step": 12}}
        assert store.episode_records("lora") == {0: {}, 1: {}, 2: {}}
        report = build_report(store)
    assert db.read_bytes() == before  # read as it is
    (row,) = [row for row in report.to_dict()["rows"] if row["method"] == "vtt"]
    step = row["records"]["digits/1-shot"]["dlc_off_step"]
    assert step == {"episodes": 3, "present": 2, "median": 9.5, "mean": 9.5, "min": 7.0, "max": 12.0,
                    "per_episode": [7, None, 12]}  # fmt: skip
    assert "records" not in next(row for row in report.to_dict()["rows"] if row["method"] == "lora")
    # Opened for writing, it gains `records_json`; new rows store records there and nothing in the legacy column.
    with ResultStore(db) as store:
        store.add_episodes("vtt", [EpisodeResult(3, 60, 75, 0.1, records={"dlc_off_step": 4})])
        assert store.episode_records("vtt")[3] == {"dlc_off_step": 4}
        assert store.episode_records("vtt")[0] == {"dlc_off_step": 7}
    with closing(sqlite3.connect(db)) as connection:
        assert connection.execute("SELECT dlc_off_step FROM episodes WHERE episode = 3").fetchone() == (None,)


def test_records_json_wins_over_the_legacy_column_and_malformed_records_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "previous.sqlite"
    previous_store(db)
    with ResultStore(db) as store:  # adds records_json
        pass
    with closing(sqlite3.connect(db)) as connection:
        update = "UPDATE episodes SET records_json = ? WHERE run_id = ? AND episode = ?"
        connection.execute(update, ('{"dlc_off_step": 8}', "vtt", 0))
        connection.execute(update, ("[1, 2]", "lora", 1))
        connection.commit()
    with ResultStore(db, read_only=True) as store:
        assert store.episode_records("vtt")[0] == {"dlc_off_step": 8}
        with pytest.raises(StoreError, match="run lora episode 1 has malformed records: a JSON object"):
            store.episode_records("lora")


def test_summaries_by_hand() -> None:
    per_episode = {0: VTT[0] | {"tag": "x"}, 1: VTT[1], 2: VTT[2], 3: VTT[3] | {"tag": "y"}}
    step, tag = summarise_records(per_episode)  # alphabetical
    assert step == RecordSummary("dlc_off_step", (3, None, 10, 5), 3, median=5.0, mean=6.0, low=3.0, high=10.0)
    assert step.text() == "dlc_off_step: in 3 of 4 episodes, median 5, mean 6, range 3–10"
    assert tag == RecordSummary("tag", ("x", None, None, "y"), 2)
    assert tag.text() == "tag: in 2 of 4 episodes"
    (loss,) = summarise_records({0: {"loss": 0.125}, 1: {"loss": 0.5}})
    assert loss.text() == "loss: in 2 of 2 episodes, median 0.3125, mean 0.3125, range 0.125–0.5"
    (never,) = summarise_records({0: {"dlc_off_step": None}})
    assert never.text() == "dlc_off_step: in 0 of 1 episodes"
    assert summarise_records({0: {}, 1: {}}) == []
    assert RecordSummary.from_dict("dlc_off_step", step.to_dict()) == step
    assert record_names([{"b": 1}, {"a": 2, "b": 3}]) == ["a", "b"]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        add_run(store, "aaaa111122223333", "maple", MAPLE)
        add_run(store, "bbbb111122223333", "lora+vtt", VTT[:3])
        add_run(store, "cccc111122223333", "zeroshot", [{}, {}, {}])
    return path


def test_report_shows_every_record_by_name_in_every_format(db: Path) -> None:
    with ResultStore(db, read_only=True) as store:
        report = build_report(store)
    rows = {row["method"]: row for row in report.to_dict()["rows"]}
    maple = rows["maple"]["records"]["digits/1-shot"]
    assert list(maple) == ["maple_first_epoch_loss", "maple_last_epoch_loss"]
    assert maple["maple_first_epoch_loss"]["mean"] == pytest.approx(2.0)
    assert maple["maple_last_epoch_loss"]["median"] == pytest.approx(0.5)
    assert rows["lora+vtt"]["records"]["digits/1-shot"]["dlc_off_step"]["per_episode"] == [3, None, 10]
    assert "records" not in rows["zeroshot"]
    maple_line = "maple_first_epoch_loss: in 3 of 3 episodes, median 2, mean 2, range 1.5–2.5"
    vtt_line = "dlc_off_step: in 2 of 3 episodes, median 6.5, mean 6.5, range 3–10"
    assert any(line.endswith(f"digits 1-shot: {vtt_line}") for line in report.record_lines())
    for fmt in ("table", "markdown", "latex"):
        # The terminal table wraps its caption; markdown escapes `_` (a LaTeX comment needs no escape).
        text = " ".join(render(report, fmt).split()).replace("\\_", "_")
        assert maple_line in text and vtt_line in text, fmt
        assert "Per-episode records" in text
    table = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    by_method = {row["method"]: row for row in table}
    assert by_method["lora+vtt"]["digits/1-shot dlc_off_step present"] == "2"
    assert by_method["lora+vtt"]["digits/1-shot dlc_off_step median"] == "6.500000"
    assert by_method["maple"]["digits/1-shot maple_last_epoch_loss mean"] == f"{(0.5 + 1.0 + 0.25) / 3:.6f}"
    assert by_method["zeroshot"]["digits/1-shot dlc_off_step present"] == ""
    assert json.loads(render(report, "json"))["rows"] == report.to_dict()["rows"]


def test_compare_carries_each_sides_records(db: Path) -> None:
    with ResultStore(db, read_only=True) as store:
        result = compare_runs(store, "maple", "lora+vtt")
    assert result["a"]["records"]["maple_last_epoch_loss"]["per_episode"] == [0.5, 1.0, 0.25]
    assert result["b"]["records"]["dlc_off_step"]["present"] == 2
    assert record_lines(json.loads(json.dumps(result))) == [
        "A: maple_first_epoch_loss: in 3 of 3 episodes, median 2, mean 2, range 1.5–2.5",
        "A: maple_last_epoch_loss: in 3 of 3 episodes, median 0.5, mean 0.5833, range 0.25–1",
        "B: dlc_off_step: in 2 of 3 episodes, median 6.5, mean 6.5, range 3–10",
    ]
    with ResultStore(db, read_only=True) as store:
        assert compare_runs(store, "zeroshot", "maple")["a"]["records"] == {}


def test_run_json_gives_records_by_name_per_episode() -> None:
    config = RunConfig(method="maple", backbone="tiny", pretrained="none")
    records = {0: {"maple_last_epoch_loss": 0.5}, 1: {}, 2: {"maple_last_epoch_loss": 0.25, "other": "x"}}
    result = RunResult("r", config, 80.0, 1.0, [(0, 80.0), (1, 80.0), (2, 80.0)], 3, records=records)
    assert [entry["records"] for entry in result.to_json()["per_episode"]] == [
        {"maple_last_epoch_loss": 0.5, "other": None},
        {"maple_last_epoch_loss": None, "other": None},
        {"maple_last_epoch_loss": 0.25, "other": "x"},
    ]
    plain = RunResult("r", config, 80.0, 1.0, [(0, 80.0)], 1, records={0: {}})
    assert plain.to_json()["per_episode"] == [{"episode": 0, "acc": 80.0}]
