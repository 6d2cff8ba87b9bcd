"""Episodes of different shapes in one run (issue 28): a toy protocol defined and registered here, whose episodes are
3-, 5- and 7-way in turn, goes through every registered method, the store and the report, without any edit outside
this module."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdfsl.analysis.report import build_report, render
from cdfsl.config import METHODS, RunConfig
from cdfsl.data import readers
from cdfsl.data.episodes import build_batch, group_by_shape
from cdfsl.data.index import Episode, ImageIndex
from cdfsl.data.protocols import (
    FIXED_WAY,
    PROTOCOLS,
    EpisodeProtocol,
    EpisodeSettings,
    EpisodeShape,
    build_sampler,
    protocol_of,
    register_protocol,
)
from cdfsl.engine.autobatch import largest_shape, synthetic_batch
from cdfsl.engine.context import build_context
from cdfsl.engine.runner import Runner, run_identity
from cdfsl.engine.store import ResultStore
from cdfsl.seeding import numpy_stream

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = "toy-varied"
WAYS = (3, 5, 7)


class ToySampler:
    """Episode i: WAYS[i % 3] classes of `shots` supports and `queries` queries, drawn from episode i's own stream."""

    def __init__(self, index: ImageIndex, settings: EpisodeSettings, seed: int) -> None:
        self.groups = [np.asarray(group) for group in index.items_by_class()]
        self.settings, self.seed = settings, seed
        self.excluded_classes: tuple[str, ...] = ()

    def episode(self, i: int) -> Episode:
        rng = numpy_stream(self.seed, i, "episode")
        shots, queries = self.settings.shots, self.settings.queries
        classes = rng.choice(len(self.groups), WAYS[i % len(WAYS)], replace=False)
        picks = [self.groups[c][rng.choice(len(self.groups[c]), shots + queries, replace=False)] for c in classes]
        support = tuple(tuple(int(p) for p in pick[:shots]) for pick in picks)
        query = tuple(tuple(int(p) for p in pick[shots:]) for pick in picks)
        return Episode(i, tuple(int(c) for c in classes), support, query)

    def episodes(self, indices: Iterable[int]) -> list[Episode]:
        return [self.episode(i) for i in indices]


TOY_PROTOCOL = EpisodeProtocol(
    TOY,
    ToySampler,
    column=lambda settings: f"3/5/7-way {settings.shots}-shot",
    largest=lambda s: EpisodeShape(max(WAYS), max(WAYS) * s.shots, max(WAYS) * s.queries),
)


@pytest.fixture
def toy_digits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The toy protocol registered, and `digits` naming it as its protocol, for the test only."""
    register_protocol(TOY_PROTOCOL)
    spec = readers.DATASETS["digits"]
    if "protocol" in {f.name for f in dataclasses.fields(spec)}:
        toy_spec = dataclasses.replace(spec, protocol=TOY)  # type: ignore[call-arg]
    else:
        toy_spec = dataclasses.replace(spec)
        object.__setattr__(toy_spec, "protocol", TOY)
    monkeypatch.setitem(readers.DATASETS, "digits", toy_spec)
    try:
        yield
    finally:
        del PROTOCOLS[TOY]


def test_a_protocol_name_is_registered_once(toy_digits: None) -> None:
    with pytest.raises(ValueError, match="registered already"):
        register_protocol(TOY_PROTOCOL)
    assert register_protocol(TOY_PROTOCOL, replace=True) is TOY_PROTOCOL


def small_config(method: str, db: Path, episodes: int = 3, episode_batch: int = 3) -> RunConfig:
    config = RunConfig(
        dataset="digits", method=method, backbone="tiny", pretrained="none", shots=1, queries=2, episodes=episodes,
        episode_batch=episode_batch, device="cpu", db=str(db),
    )  # fmt: skip
    config.train.iterations = 1
    config.augment.views = ("plain",)
    config.maple.epochs, config.maple.warmup_epochs, config.maple.batch_size = 1, 0, 4
    config.vtt.state, config.vtt.window = 4, 1
    return config


def stored(db: Path, run_id: str) -> list[tuple[int, int, int, list[int]]]:
    """(episode, correct, total, predicted labels) of every stored episode of `run_id`."""
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "SELECT episode, correct, total, queries_json FROM episodes WHERE run_id = ? ORDER BY episode", (run_id,)
        ).fetchall()
    return [(e, c, t, json.loads(q)["predicted"]) for e, c, t, q in rows]


def test_the_protocol_comes_from_the_dataset_entry(toy_digits: None) -> None:
    assert protocol_of("digits") == TOY
    assert protocol_of("eurosat") == FIXED_WAY
    config = small_config("zeroshot", Path("unused.sqlite"))
    context = build_context(config)
    assert context.protocol == TOY
    assert [len(e.classes) for e in context.data()[1].episodes(range(6))] == [3, 5, 7, 3, 5, 7]
    _, identity = run_identity(context)
    assert identity["protocol"] == TOY
    assert largest_shape(context.config) == EpisodeShape(7, 7, 14)


def test_every_method_runs_varied_episodes_into_the_store_and_the_report(toy_digits: None, tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    runner = Runner()
    for method in METHODS:
        result = runner.run(small_config(method, db))
        rows = stored(db, result.run_id)
        assert [row[0] for row in rows] == [0, 1, 2], method
        assert [row[2] for row in rows] == [2 * w for w in WAYS], method  # queries: 2 per class
        for (_, correct, total, predicted), ways in zip(rows, WAYS, strict=True):
            assert len(predicted) == total and all(0 <= p < ways for p in predicted), method
            assert 0 <= correct <= total, method
        assert [round(a, 6) for _, a in result.per_episode] == [round(100 * r[1] / r[2], 6) for r in rows], method
    with ResultStore(db) as store:
        report = build_report(store)
    toy_columns = [column for column in report.columns if column.protocol == TOY]
    assert [column.label for column in toy_columns] == ["digits 3/5/7-way 1-shot"]
    assert len(report.columns) == 1  # no fixed-way column, no mean
    assert {row.method for row in report.rows if report.cell(row, toy_columns[0])} == set(METHODS)
    assert all(report.cell(row, toy_columns[0]).episodes == 3 for row in report.rows)  # type: ignore[union-attr]
    assert "digits 3/5/7-way 1-shot" in render(report, "markdown")

    from cdfsl.cli import app

    shown = CliRunner().invoke(app, ["report", "--db", str(db), "--format", "markdown"])
    assert shown.exit_code == 0, shown.output
    assert "digits 3/5/7-way 1-shot" in shown.output
    assert all(method in shown.output for method in ("zeroshot", "maple+tir+vtt", "coop+lora+tir+vtt"))
    csv_header = render(report, "csv").splitlines()[0]
    assert "digits/toy-varied/1-shot mean" in csv_header


def test_a_batch_grouped_by_shape_predicts_as_each_episode_alone(toy_digits: None, tmp_path: Path) -> None:
    together = Runner().run(small_config("lora+tir", tmp_path / "together.sqlite", episodes=6, episode_batch=6))
    alone = Runner().run(small_config("lora+tir", tmp_path / "alone.sqlite", episodes=6, episode_batch=1))
    assert together.run_id == alone.run_id
    assert stored(tmp_path / "together.sqlite", together.run_id) == stored(tmp_path / "alone.sqlite", alone.run_id)


def test_group_by_shape_keeps_order_and_build_batch_refuses_mixed_shapes(toy_digits: None) -> None:
    context = build_context(small_config("zeroshot", Path("unused.sqlite"), episodes=5, episode_batch=5))
    index, sampler = context.data()
    episodes = sampler.episodes([0, 1, 2, 3, 4])
    groups = group_by_shape(episodes)
    assert [[e.index for e in group] for group in groups] == [[0, 3], [1, 4], [2]]
    with pytest.raises(ValueError, match="one shape"):
        build_batch(episodes[:2], index, context.cache, context.config.augment, lambda x: x, 0, torch.device("cpu"))
    batches = context.shaped_batches([0, 1, 2, 3, 4], with_views=False)
    assert [tuple(b.query.shape[:2]) for b in batches] == [(2, 6), (2, 10), (1, 14)]
    assert [b.indices for b in context.batches(range(5), with_views=False)] == [
        [0, 3],
        [1, 4],
        [2],
    ]  # one chunk of 5, by shape


def test_fixed_way_builds_todays_sampler_and_a_synthetic_batch_of_any_shape() -> None:
    from cdfsl.data.readers import read_digits
    from cdfsl.data.sampler import EpisodeSampler

    index = read_digits()
    sampler = build_sampler(FIXED_WAY, index, EpisodeSettings(5, 1, 3), 0)
    assert isinstance(sampler, EpisodeSampler)
    assert sampler.episode(4) == EpisodeSampler(index, 5, 1, 3, 0).episode(4)
    config = RunConfig(dataset="digits", method="lora", ways=5, shots=2, queries=3)
    assert largest_shape(config) == EpisodeShape(5, 10, 15)
    batch = synthetic_batch(config, 2, 8, torch.device("cpu"), EpisodeShape(3, 5, 4))
    views = len(config.resolved().augment.views)  # the recipe's views
    assert batch.support.shape == (2, 5 * views, 3, 8, 8) and batch.query.shape == (2, 4, 3, 8, 8)
    assert batch.support_labels[0, ::views].tolist() == [0, 0, 1, 1, 2]  # supports spread over classes, first get more
    assert batch.query_labels[0].tolist() == [0, 0, 1, 2]
