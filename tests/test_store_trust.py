"""A stored number is never silently wrong and nothing a user does loses finished episodes.

Read-only opening for reports (read-only folders, other programs' SQLite files, stores older than a column), clear
errors for read-only, damaged and foreign files, runs registered only with their first episode, and claims that let
two processes share one run's episodes, each trained once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

import cdfsl.engine.context as context_module
from cdfsl.analysis.report import build_report
from cdfsl.config import RunConfig
from cdfsl.engine.runner import Progress, Runner, RunResult
from cdfsl.engine.store import EpisodeResult, ResultStore
from cdfsl.errors import BackboneError, CdfslError, StoreError
from digits_world import stored_run_config

EPISODES = 4
TOTAL = 75  # 5 ways x 15 queries


def make_config(db: Path, **changes: Any) -> RunConfig:
    """digits, lora, tiny with random weights, 5-way 1-shot, 4 episodes of 2 iterations."""
    return stored_run_config(db, 2, **changes)


def run_config(method: str, dataset: str = "digits", shots: int = 1) -> dict[str, Any]:
    """A stored run's config, as `register_run` takes it."""
    return {
        "dataset": dataset, "method": method, "backbone": "tiny", "pretrained": "none", "ways": 5, "shots": shots,
        "queries": 15, "seed": 0, "run_name": None, "train": {"lr": 2e-4, "iterations": 5},
    }  # fmt: skip


def fill(db: Path, episodes: int = 20) -> None:
    """Two runs (zeroshot and lora on digits 1-shot) of `episodes` episodes each."""
    with ResultStore(db) as store:
        for offset, method in enumerate(("zeroshot", "lora")):
            results = [EpisodeResult(i, (7 * i + 30 * offset) % TOTAL, TOTAL, 0.01) for i in range(episodes)]
            store.add_episodes(method, results, config=run_config(method), identity={"run": method})


def contents(db: Path) -> dict[str, Any]:
    """What reports read: every run with its episodes' accuracies and records."""
    with ResultStore(db, read_only=True) as store:
        return {
            run.run_id: (run, store.episode_accuracies(run.run_id), store.episode_records(run.run_id))
            for run in store.runs()
        }


def snapshot(db: Path) -> tuple[str, list[Any], str]:
    """The file's bytes (hashed), its schema and its journal mode."""
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    with closing(sqlite3.connect(db)) as connection:
        schema = sorted(connection.execute("SELECT type, name, sql FROM sqlite_master"))
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    return digest, schema, mode


def table_rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(db)) as connection:
        return list(connection.execute(f"SELECT * FROM {table}"))


@contextmanager
def permissions(path: Path, mode: int) -> Iterator[bool]:
    """Set `path`'s permission bits for the block; yields whether they bind this process (not root)."""
    before = stat.S_IMODE(path.stat().st_mode)
    path.chmod(mode)
    try:
        yield not os.access(path, os.W_OK)
    finally:
        path.chmod(before)


def tables(db: Path) -> set[str]:
    with closing(sqlite3.connect(db)) as connection:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# ----------------------------------------------------------------------------------------------------------
# read-only opening


def test_report_reads_a_store_in_a_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    db = folder / "results.sqlite"
    fill(db)
    expected = contents(db)
    before = snapshot(db)
    listing = sorted(os.listdir(folder))
    with permissions(folder, 0o555) as binding:
        if not binding:
            pytest.skip("running as root: folder permissions do not bind")
        assert contents(db) == expected
        with ResultStore(db, read_only=True) as store:
            report = build_report(store)
        assert len(report.cells) == 2
        # Writing needs the folder (SQLite's journal lives beside the file): a clear error, not a traceback.
        with pytest.raises(StoreError, match=r"read-only folder.*make .* writable"):
            ResultStore(db)
    assert snapshot(db) == before
    assert sorted(os.listdir(folder)) == listing


def test_read_only_folder_with_unmerged_changes_is_refused(tmp_path: Path) -> None:
    """A `-wal` holding changes in a folder the reader cannot write: SQLite could only read around them."""
    db = tmp_path / "results.sqlite"
    fill(db)
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("UPDATE episodes SET accuracy = 0.5")
    writer.commit()
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("results.sqlite", "results.sqlite-wal"):  # as copied without its `-shm`
        (folder / name).write_bytes((tmp_path / name).read_bytes())
    writer.close()
    assert (folder / "results.sqlite-wal").stat().st_size > 0
    with permissions(folder, 0o555) as binding:
        if not binding:
            pytest.skip("running as root: folder permissions do not bind")
        with pytest.raises(StoreError, match=r"has changes in .*results.sqlite-wal"):
            ResultStore(folder / "results.sqlite", read_only=True)
    with ResultStore(folder / "results.sqlite", read_only=True) as store:  # a writable folder: the changes are read
        assert set(store.episode_accuracies("lora").values()) == {0.5}


def test_another_programs_sqlite_file_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    db = tmp_path / "notes.sqlite"
    with closing(sqlite3.connect(db)) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        connection.execute("INSERT INTO notes (text) VALUES ('keep me')")
        connection.commit()
    before = snapshot(db)
    assert before[2] == "delete"
    for read_only in (True, False):
        with pytest.raises(StoreError, match=r"is not a cdfsl result store \(it holds tables notes\)"):
            ResultStore(db, read_only=read_only)
        assert snapshot(db) == before
        assert tables(db) == {"notes"}
    with pytest.raises(StoreError, match="is not a cdfsl result store"):
        Runner().run(make_config(db, method="zeroshot"))
    assert snapshot(db) == before


def test_a_table_named_runs_of_another_program_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.sqlite"
    with closing(sqlite3.connect(db)) as connection:
        connection.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, distance REAL)")
        connection.commit()
    before = snapshot(db)
    for read_only in (True, False):
        with pytest.raises(StoreError, match=r"its table runs lacks backbone"):
            ResultStore(db, read_only=read_only)
    assert snapshot(db) == before


OLD_SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, run_name TEXT, dataset TEXT NOT NULL, method TEXT NOT NULL, backbone TEXT NOT NULL,
    pretrained TEXT NOT NULL, ways INTEGER NOT NULL, shots INTEGER NOT NULL, queries INTEGER NOT NULL,
    seed INTEGER NOT NULL, config_json TEXT NOT NULL, identity_json TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE episodes (
    run_id TEXT NOT NULL REFERENCES runs(run_id), episode INTEGER NOT NULL, correct INTEGER NOT NULL,
    total INTEGER NOT NULL, accuracy REAL NOT NULL, seconds REAL NOT NULL, finished_at TEXT NOT NULL,
    PRIMARY KEY (run_id, episode)
);
"""


def old_store(db: Path) -> dict[str, dict[int, float]]:
    """A store of the first release (no `recipe`, records, `trained_by` or claims) in rollback mode."""
    accuracies: dict[str, dict[int, float]] = {}
    with closing(sqlite3.connect(db)) as connection:
        connection.executescript(OLD_SCHEMA)
        for offset, method in enumerate(("zeroshot", "vtt")):
            config = run_config(method)
            connection.execute(
                "INSERT INTO runs VALUES (?, NULL, 'digits', ?, 'tiny', 'none', 5, 1, 15, 0, ?, '{}', ?)",
                (method, method, json.dumps(config), f"2024-01-0{offset + 1}T00:00:00+00:00"),
            )
            accuracies[method] = {}
            for i in range(10):
                correct = (11 * i + 20 * offset) % TOTAL
                accuracies[method][i] = correct / TOTAL
                connection.execute(
                    "INSERT INTO episodes VALUES (?, ?, ?, ?, ?, 0.1, '2024-01-01T00:00:00+00:00')",
                    (method, i, correct, TOTAL, correct / TOTAL),
                )
        connection.commit()
    return accuracies


def test_old_schema_store_reads_without_being_altered(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    accuracies = old_store(db)
    before = snapshot(db)
    assert before[2] == "delete"
    with ResultStore(db, read_only=True) as store:
        runs = store.runs()
        assert [(run.run_id, run.recipe, run.episodes) for run in runs] == [("zeroshot", None, 10), ("vtt", None, 10)]
        for run_id, expected in accuracies.items():
            assert store.episode_accuracies(run_id) == expected
            assert store.episode_records(run_id) == {i: {} for i in range(10)}
            assert store.episode_accuracies(run_id, below=3) == {i: expected[i] for i in range(3)}
        report = build_report(store, paired="zeroshot")
        assert len(report.cells) == 2
        with pytest.raises(StoreError, match="opened read-only"):
            store.add_episodes("vtt", [EpisodeResult(10, 1, TOTAL, 0.1)])
    assert snapshot(db) == before  # same bytes, schema and journal mode: no table, column or WAL switch
    # Opening it for writing upgrades it in place and keeps every row.
    with ResultStore(db) as store:
        assert {run: store.episode_accuracies(run) for run in accuracies} == accuracies
        assert store.episode_records("vtt") == {i: {} for i in range(10)}
    assert tables(db) == {"runs", "episodes", "claims"}


def test_read_only_missing_file_and_non_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(StoreError, match=r"no result store at .*missing.sqlite; run `cdfsl run` first"):
        ResultStore(missing, read_only=True)
    assert not missing.exists()
    text = tmp_path / "notes.txt"
    text.write_text("not a database, but somebody's notes\n" * 200)
    before = text.read_bytes()
    for read_only in (True, False):
        with pytest.raises(StoreError, match=r"notes.txt is not a SQLite file"):
            ResultStore(text, read_only=read_only)
    with pytest.raises(StoreError, match=r"notes.txt is not a SQLite file"):
        Runner().run(make_config(text, method="zeroshot"))
    assert text.read_bytes() == before


def test_read_only_mode_reads_a_live_store(tmp_path: Path) -> None:
    """A report while a run writes: read-only sees what is committed and does not disturb the writer."""
    db = tmp_path / "live.sqlite"
    fill(db, episodes=5)
    with ResultStore(db) as writer, ResultStore(db, read_only=True) as reader:
        assert len(reader.episode_accuracies("lora")) == 5
        writer.add_episodes("lora", [EpisodeResult(5, 10, TOTAL, 0.1)])
        assert len(reader.episode_accuracies("lora")) == 6
        assert {run.run_id: run.episodes for run in reader.runs()} == {"zeroshot": 5, "lora": 6}


# ----------------------------------------------------------------------------------------------------------
# broken stores


def test_zeroed_page_is_reported_as_damaged(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    fill(db)
    data = bytearray(db.read_bytes())
    data[4096 : 2 * 4096] = bytes(4096)  # the second page
    db.write_bytes(bytes(data))
    for read_only in (True, False):
        with pytest.raises(StoreError, match=r"results.sqlite is damaged .*restore it from a backup"):
            ResultStore(db, read_only=read_only).runs()
    with pytest.raises(StoreError, match=r"results\.sqlite is damaged"):
        Runner().run(make_config(db, method="zeroshot"))
    assert db.read_bytes() == bytes(data)


def test_any_zeroed_page_fails_loudly_or_changes_nothing(tmp_path: Path) -> None:
    """Zero each page of a store in turn: every read either raises `StoreError` or returns the true rows."""
    db = tmp_path / "results.sqlite"
    fill(db, episodes=400)
    expected = contents(db)
    original = db.read_bytes()
    pages = len(original) // 4096
    assert pages > 10
    loud = 0
    for page in range(1, pages):
        data = bytearray(original)
        data[page * 4096 : (page + 1) * 4096] = bytes(4096)
        broken = tmp_path / f"page{page}.sqlite"
        broken.write_bytes(bytes(data))
        try:
            seen = contents(broken)
        except StoreError as error:
            assert f"page{page}.sqlite is damaged" in str(error)
            loud += 1
        else:
            assert seen == expected, f"page {page + 1} zeroed changed the rows read"
    assert loud >= pages - 2  # all but free pages


def test_read_only_file_used_by_a_run(tmp_path: Path) -> None:
    """chmod 444: a clear error naming the file, also when nothing is left to train; the store is unchanged."""
    db = tmp_path / "results.sqlite"
    done = Runner().run(make_config(db, method="zeroshot"))
    before = snapshot(db)
    with permissions(db, 0o444) as binding:
        if not binding:
            pytest.skip("running as root: file permissions do not bind")
        for episodes in (EPISODES, EPISODES + 2):  # nothing left to train, then two more episodes
            with pytest.raises(StoreError, match=r"results.sqlite is read-only; make it writable \(chmod u\+w"):
                Runner().run(make_config(db, method="zeroshot", episodes=episodes))
        with ResultStore(db, read_only=True) as store:  # reports still read it
            assert store.episode_accuracies(done.run_id) == {i: a / 100 for i, a in done.per_episode}
    assert snapshot(db) == before


def test_errors_are_one_line_store_errors(tmp_path: Path) -> None:
    """Every failure above is a `CdfslError` the CLI prints on one line (no traceback)."""
    folder = tmp_path / "no" / "such"
    with pytest.raises(CdfslError) as caught:
        ResultStore(folder / "results.sqlite")
    assert "\n" not in str(caught.value) and "does not exist" in str(caught.value)
    directory = tmp_path / "a-folder.sqlite"
    directory.mkdir()
    for read_only in (True, False):
        with pytest.raises(StoreError, match="is not a file"):
            ResultStore(directory, read_only=read_only)


# ----------------------------------------------------------------------------------------------------------
# registration


def count_rows(db: Path, table: str) -> int:
    if not db.exists() or table not in tables(db):
        return 0
    return len(table_rows(db, table))


def test_a_run_that_fails_before_its_first_episode_leaves_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "results.sqlite"
    with pytest.raises(BackboneError, match="not found"):
        Runner().run(make_config(db, pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(CdfslError, match="backbone"):
        Runner().run(make_config(db, backbone="no-such-backbone"))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("image cache on a full disk")

    monkeypatch.setattr(context_module, "build_batch", broken)  # fails after claiming its first batch
    with pytest.raises(OSError, match="full disk"):
        Runner().run(make_config(db))
    for table in ("runs", "episodes", "claims"):
        assert count_rows(db, table) == 0, table


def test_run_row_arrives_with_the_first_episodes(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    seen: list[tuple[int, int]] = []

    def look(progress: Progress) -> None:
        seen.append((count_rows(db, "runs"), count_rows(db, "episodes")))

    Runner(progress=look).run(make_config(db, method="zeroshot", episode_batch=2))
    assert seen == [(1, 2), (1, 4)]


# ----------------------------------------------------------------------------------------------------------
# claims


def claim_rows(db: Path) -> list[tuple[Any, ...]]:
    return table_rows(db, "claims")


def add_claim(db: Path, run_id: str, episode: int, owner: str, expires_at: float) -> None:
    with closing(sqlite3.connect(db)) as connection:
        connection.execute("INSERT INTO claims VALUES (?, ?, ?, ?)", (run_id, episode, owner, expires_at))
        connection.commit()


def trained_by(db: Path) -> dict[int, str]:
    with closing(sqlite3.connect(db)) as connection:
        return dict(connection.execute("SELECT episode, trained_by FROM episodes ORDER BY episode"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """The uninterrupted single-process run every shared run must reproduce."""
    return Runner().run(make_config(tmp_path_factory.mktemp("reference") / "results.sqlite"))


def test_claims_skip_stored_and_live_claims_and_take_over_expired(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    with ResultStore(db) as store:
        store.add_episodes("r", [EpisodeResult(i, 1, TOTAL, 0.1) for i in (0, 2)])
        now = time.time()
        add_claim(db, "r", 3, "alive", now + 3600)
        add_claim(db, "r", 4, "killed", now - 1)
        assert store.claim_episodes("r", 8, 3, "me", 60.0) == ([1, 4, 5], 6)
        assert store.claim_episodes("r", 8, 3, "me", 60.0, start=6) == ([6, 7], 8)
        assert store.claim_episodes("r", 8, 3, "me", 60.0, start=8) == ([], 8)
        assert store.claim_episodes("r", 8, 3, "other", 60.0) == ([], 8)
        owners = {episode: owner for _, episode, owner, _ in claim_rows(db)}
        assert owners == {1: "me", 3: "alive", 4: "me", 5: "me", 6: "me", 7: "me"}
        pending = store.pending("r", 8)
        assert (pending.stored, pending.claimed) == (2, 6)
        assert pending.next_expiry is not None and pending.next_expiry <= time.time() + 60
        store.add_episodes("r", [EpisodeResult(i, 1, TOTAL, 0.1) for i in (1, 4)], owner="me")
        store.release_claims("r", "me")
        assert [(episode, owner) for _, episode, owner, _ in claim_rows(db)] == [(3, "alive")]
        assert store.claim_episodes("r", 8, 10, "other", 60.0) == ([5, 6, 7], 8)


def test_claim_scans_a_large_store_in_windows(tmp_path: Path) -> None:
    """200,000 stored episodes with gaps across the scan windows: found in order, without one row per claim."""
    db = tmp_path / "results.sqlite"
    total = 200_000
    gaps = [0, 64, 65_600, 199_999]
    ResultStore(db).close()
    with closing(sqlite3.connect(db)) as connection:
        connection.executemany(
            "INSERT INTO episodes (run_id, episode, correct, total, accuracy, seconds, finished_at)"
            " VALUES ('r', ?, 1, 2, 0.5, 0.0, '')",
            ((i,) for i in range(total) if i not in gaps),
        )
        connection.commit()
    with ResultStore(db) as store:
        started = time.perf_counter()
        assert store.claim_episodes("r", total, 2, "me", 60.0) == ([0, 64], 65)
        assert store.claim_episodes("r", total, 2, "me", 60.0, start=65) == ([65_600, 199_999], total)
        assert time.perf_counter() - started < 10
        assert store.pending("r", total).stored == total - len(gaps)
        accuracies, marker = store.accuracies_since("r", total)
        assert len(accuracies) == total - len(gaps) and marker == total - len(gaps)
        store.add_episodes("r", [EpisodeResult(64, 1, 4, 0.0)], owner="me")
        assert store.accuracies_since("r", total, marker) == ([0.25], marker + 1)


def test_stale_claim_is_taken_over(reference: RunResult, tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    ResultStore(db).close()
    add_claim(db, reference.run_id, 1, "killed-process", time.time() - 5)
    runner = Runner(poll_seconds=0.1)
    result = runner.run(make_config(db))
    assert result.trained_episodes == EPISODES
    assert result.per_episode == reference.per_episode
    assert trained_by(db) == dict.fromkeys(range(EPISODES), runner.owner)
    assert claim_rows(db) == []


def test_live_claim_is_waited_on_and_taken_over_when_it_expires(reference: RunResult, tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    ResultStore(db).close()
    expiry = time.time() + 3.0
    add_claim(db, reference.run_id, 1, "never-finishes", expiry)
    reports: list[Progress] = []
    runner = Runner(progress=reports.append, lease_seconds=60.0, poll_seconds=0.2)
    result = runner.run(make_config(db))
    assert time.time() >= expiry
    assert result.trained_episodes == EPISODES
    assert result.per_episode == reference.per_episode
    assert trained_by(db) == dict.fromkeys(range(EPISODES), runner.owner)
    assert claim_rows(db) == []
    assert [r.done for r in reports] == [1, 2, 3, 4]  # episode 1, taken over, came last


def test_episodes_stored_by_another_process_count_and_are_not_retrained(reference: RunResult, tmp_path: Path) -> None:
    """While this runner waits on another owner's live claim, the other owner stores its episode."""
    db = tmp_path / "results.sqlite"
    ResultStore(db).close()
    add_claim(db, reference.run_id, 2, "other", time.time() + 600)
    other_accuracy = reference.per_episode[2][1] / 100
    correct = round(other_accuracy * TOTAL)

    def other_finishes() -> None:
        with ResultStore(db) as store:
            store.add_episodes(reference.run_id, [EpisodeResult(2, correct, TOTAL, 0.5)], owner="other")

    reports: list[Progress] = []
    timer = threading.Timer(1.0, other_finishes)
    timer.start()
    try:
        result = Runner(progress=reports.append, poll_seconds=0.1).run(make_config(db))
    finally:
        timer.join()
    assert result.trained_episodes == EPISODES - 1
    assert result.per_episode == reference.per_episode
    assert reports[-1].done == EPISODES and reports[-1].resumed == 0
    assert reports[-1].mean == pytest.approx(reference.mean_acc)
    assert reports[-1].ci95 == pytest.approx(reference.ci95)
    assert trained_by(db)[2] == "other"
    assert claim_rows(db) == []


def test_interrupt_hands_back_claims_and_stores_nothing_partial(
    reference: RunResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "results.sqlite"
    original = context_module.build_batch
    calls = 0

    def interrupt_second(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(context_module, "build_batch", interrupt_second)
        with pytest.raises(KeyboardInterrupt):
            Runner().run(make_config(db, episode_batch=2))
    assert [row[1] for row in table_rows(db, "episodes")] == [0, 1]
    assert claim_rows(db) == []
    resumed = Runner().run(make_config(db, episode_batch=2))
    assert resumed.trained_episodes == 2 and resumed.per_episode == reference.per_episode


WORKER = """
import json, pathlib, sys, time
import cdfsl.engine.context as context_module
import cdfsl.engine.runner as runner_module
from cdfsl.config import RunConfig

db, out, barrier, name = sys.argv[1:5]
trained, built = [], []
original = context_module.build_batch

def recording(episodes, *args, **kwargs):
    built.extend(episode.index for episode in episodes)  # built, maybe ahead of a claim (the fed pipeline's guess)
    if len(built) == len(episodes):  # first batch: wait until the other process holds a claim too
        pathlib.Path(barrier, name).touch()
        deadline = time.time() + 120
        while len(list(pathlib.Path(barrier).iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.02)
    return original(episodes, *args, **kwargs)

context_module.build_batch = recording
config = RunConfig(
    dataset="digits", method="lora", backbone="tiny", pretrained="none", shots=1, episodes=6, episode_batch=1,
    device="cpu", db=db,
)
config.train.iterations = 2
runner = runner_module.Runner(poll_seconds=0.2, on_stored=lambda _, results: trained.extend(r.episode for r in results))
result = runner.run(config)
pathlib.Path(out).write_text(json.dumps({
    "owner": runner.owner, "trained": trained, "trained_episodes": result.trained_episodes,
    "per_episode": result.per_episode,
}))
"""


def test_two_processes_share_one_run(tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    outputs = [tmp_path / f"worker{n}.json" for n in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(db), str(out), str(barrier), f"worker{n}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n, out in enumerate(outputs)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output
    done = [json.loads(out.read_text()) for out in outputs]
    trained = [set(d["trained"]) for d in done]
    assert all(trained) and not trained[0] & trained[1]
    assert trained[0] | trained[1] == set(range(6))
    assert [d["trained_episodes"] for d in done] == [len(t) for t in trained]
    assert [sorted(d["trained"]) for d in done] == [d["trained"] for d in done]  # ascending in each process
    assert done[0]["per_episode"] == done[1]["per_episode"]
    stored = trained_by(db)
    assert sorted(stored) == list(range(6))
    for d in done:
        assert {episode for episode, owner in stored.items() if owner == d["owner"]} == set(d["trained"])
    assert claim_rows(db) == []
    assert count_rows(db, "runs") == 1
    # The same numbers as one process alone.
    alone = make_config(tmp_path / "alone.sqlite", episodes=6, episode_batch=1)
    reference = Runner().run(alone)
    assert [list(pair) for pair in reference.per_episode] == done[0]["per_episode"]


def test_two_openers_of_a_new_store_both_get_wal(tmp_path: Path) -> None:
    """Two connections switching a new file to WAL at once: SQLite answers one of them SQLITE_BUSY at once (the
    deadlock it refuses to wait on); the store retries, so both open. 100 rounds of two threads at a barrier."""
    import threading

    for round_ in range(100):
        path = tmp_path / f"new{round_}.sqlite"
        barrier, errors = threading.Barrier(2), []

        def open_store(path: Path = path, barrier: threading.Barrier = barrier, errors: list = errors) -> None:  # type: ignore[type-arg]
            barrier.wait()
            try:
                ResultStore(path).close()
            except StoreError as error:
                errors.append(error)

        threads = [threading.Thread(target=open_store) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors


def test_a_busy_answer_to_the_wal_switch_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch answered SQLITE_BUSY twice (as in the race above, made certain): the third try succeeds."""
    answers = []

    class Busy:
        def __init__(self, connection: sqlite3.Connection) -> None:
            self.connection = connection

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql == "PRAGMA journal_mode=WAL" and len(answers) < 2:
                answers.append(sql)
                error = sqlite3.OperationalError("database is locked")
                error.sqlite_errorcode = 5  # type: ignore[attr-defined]
                raise error
            return self.connection.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(self.connection, name)

    original = ResultStore._connect
    monkeypatch.setattr(ResultStore, "_connect", lambda self, *a, **k: Busy(original(self, *a, **k)))
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(answers) == 2
