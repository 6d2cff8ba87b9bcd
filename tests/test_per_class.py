"""`cdfsl report --per-class`: per-query labels stored with each episode, pooled into per-class accuracy and a
confusion matrix (checked by hand), older stores read as they are, tampered records refused, the CLI's formats."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cdfsl.analysis.per_class import per_class_results
from cdfsl.cli import app
from cdfsl.engine.runner import Runner
from cdfsl.engine.store import EpisodeQueries, EpisodeResult, ResultStore
from cdfsl.errors import StoreError
from digits_world import stored_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

# Two episodes over classes a, b, c (and d): truth and predictions written out so the counts can be done by hand.
EPISODE_0 = EpisodeQueries(("a", "b", "c"), (0, 0, 1, 1, 2, 2), (0, 1, 1, 1, 2, 0))  # a→a, a→b, b→b ×2, c→c, c→a
EPISODE_1 = EpisodeQueries(("c", "d", "a"), (0, 1, 2, 2), (1, 1, 2, 0))  # c→d, d→d, a→a, a→c


def add_run(store: ResultStore, run_id: str = "aaaa111122223333", with_queries: bool = True) -> None:
    config = {
        "dataset": "digits", "method": "lora", "backbone": "tiny", "pretrained": "none", "ways": 3, "shots": 1,
        "queries": 2, "seed": 0, "run_name": "hand",
    }  # fmt: skip
    store.register_run(run_id, config, {"dataset": "digits", "seed": 0})
    results = [
        EpisodeResult(i, q.correct, len(q.truth), 0.1, queries=q if with_queries else None)
        for i, q in enumerate((EPISODE_0, EPISODE_1))
    ]
    store.add_episodes(run_id, results)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        add_run(store)
    return path


def test_confusion_and_accuracy_by_hand(db: Path) -> None:
    with ResultStore(db, read_only=True) as store:
        (result,) = per_class_results(store)
    assert result.classes == ["a", "b", "c", "d"]
    expected = np.array(
        [
            [2, 1, 1, 0],  # a: a→a (ep 0), a→b (ep 0), a→a (ep 1), a→c (ep 1)
            [0, 2, 0, 0],  # b: b→b twice
            [1, 0, 1, 1],  # c: c→c, c→a (ep 0), c→d (ep 1)
            [0, 0, 0, 1],  # d: d→d
        ]
    )
    np.testing.assert_array_equal(result.confusion, expected)
    np.testing.assert_allclose(result.accuracy, [2 / 4, 1.0, 1 / 3, 1.0])
    assert result.most_confused(0) in (("b", 0.25), ("c", 0.25))
    assert result.most_confused(1) is None
    assert (result.episodes, result.missing) == (2, 0)


def test_a_real_run_stores_every_query(tmp_path: Path) -> None:
    """The runner's per-query labels agree with each episode's stored count, and the pooled matrix holds every
    query of every episode."""
    config = stored_run_config(tmp_path / "r.sqlite", iterations=1, method="zeroshot", episodes=3)
    Runner().run(config)
    with ResultStore(tmp_path / "r.sqlite", read_only=True) as store:
        stored = store.episode_queries(store.runs()[0].run_id)
        (result,) = per_class_results(store)
        accuracies = store.episode_accuracies(store.runs()[0].run_id)
    assert sorted(stored) == [0, 1, 2] and all(q is not None for q in stored.values())
    for episode, queries in stored.items():
        assert queries is not None and len(queries.classes) == 5 and len(queries.truth) == 5 * config.queries
        assert queries.correct / len(queries.truth) == pytest.approx(accuracies[episode])
    assert int(result.confusion.sum()) == 3 * 5 * config.queries
    assert int(np.trace(result.confusion)) == sum(q.correct for q in stored.values() if q is not None)


def test_a_store_from_before_per_query_labels_reads_as_it_is(tmp_path: Path) -> None:
    """A store whose episodes table lacks the column: read-only, the episodes are counted as missing, the file is
    not changed."""
    path = tmp_path / "old.sqlite"
    with ResultStore(path) as store:
        add_run(store, with_queries=False)
    with sqlite3.connect(path) as connection:
        connection.execute("ALTER TABLE episodes DROP COLUMN queries_json")
    before = path.read_bytes()
    with ResultStore(path, read_only=True) as store:
        (result,) = per_class_results(store)
    assert (result.episodes, result.missing, result.classes) == (0, 2, [])
    assert path.read_bytes() == before
    shown = CliRunner().invoke(app, ["report", "--db", str(path), "--per-class", "--format", "markdown"])
    assert shown.exit_code == 0 and "2 episodes stored before per-query labels were kept" in shown.output


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("{not json", "malformed per-query record"),
        ('{"classes": ["a"], "truth": [0, 3], "predicted": [0, 0]}', "malformed per-query record"),
        ('{"classes": ["a", "b"], "truth": [0, 1, 0, 1, 0, 1], "predicted": [1, 0, 1, 0, 1, 0]}', "gives 0 of 6"),
    ],
)
def test_a_tampered_record_is_refused(db: Path, record: str, message: str) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE episodes SET queries_json = ? WHERE episode = 0", (record,))
    with ResultStore(db, read_only=True) as store, pytest.raises(StoreError, match=f"episode 0.*{message}"):
        per_class_results(store)
    result = CliRunner().invoke(app, ["report", "--db", str(db), "--per-class"])
    assert result.exit_code != 0 and "episode 0" in result.output


def test_cli_formats_and_plot(db: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["report", "--db", str(db), "--per-class"])
    assert shown.exit_code == 0, shown.output
    assert "most confused with" in shown.output and "1 a" in shown.output
    as_json = runner.invoke(app, ["report", "--db", str(db), "--per-class", "--format", "json"])
    (run,) = json.loads(as_json.output)
    assert run["confusion"][2] == [1, 0, 1, 1] and run["queries"] == [4, 2, 3, 1]
    as_csv = runner.invoke(app, ["report", "--db", str(db), "--per-class", "--format", "csv", "--run", "hand"])
    lines = as_csv.output.strip().splitlines()
    assert len(lines) == 1 + 16 and lines[1].endswith(",a,a,2")
    figures = tmp_path / "figures"
    plotted = runner.invoke(app, ["report", "--db", str(db), "--per-class", "--plot", str(figures)])
    assert plotted.exit_code == 0 and [p.name for p in figures.iterdir()] == [
        "confusion_lora_digits_1shot_aaaa111122223333.png"
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--per-class", "--format", "latex"], "--per-class comes as table, markdown, csv, json"),
        (["--run", "hand"], "--run picks the run of --per-class"),
        (["--per-class", "--paired", "lora"], "separate reports"),
        (["--per-class", "--run", "nope"], "no run 'nope'"),
    ],
)
def test_bad_per_class_requests_are_refused(db: Path, arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["report", "--db", str(db), *arguments])
    assert result.exit_code != 0 and message in result.output
