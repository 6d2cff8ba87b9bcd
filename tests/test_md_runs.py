"""Every registered method on Meta-Dataset-style variable episodes: a digits-derived source (`md-digits`, its ten
classes in two alphabets) under Meta-Dataset's sampler with small limits (2-4 ways, 1-3 shots per class, up to 8
supports, 2 queries per class), through fit, the store, resume, `run --json` and `report --meta-dataset`; and the
fixed-shape variant selected by typed `--ways/--shots/--queries`."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdfsl.analysis.md_table import build_md_report, render_md_report
from cdfsl.config import METHODS, RunConfig
from cdfsl.data import md_sampler
from cdfsl.data.benchmarks import DATASETS, Benchmark
from cdfsl.data.md_sampler import ClassGroups, EpisodeLimits, MetaDatasetSampler
from cdfsl.data.protocols import PROTOCOLS, EpisodeProtocol, EpisodeSettings
from cdfsl.engine.context import build_context
from cdfsl.engine.runner import Runner, run_identity
from cdfsl.engine.store import ResultStore

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE = "md-digits"
SMALL = "md-small"
LIMITS = EpisodeLimits(min_ways=2, max_ways=4, max_queries=2, max_support=8, max_support_per_class=3)
ALPHABETS = {"low": ("0", "1", "2", "3", "4"), "high": ("5", "6", "7", "8", "9")}


def small_sampler(index, settings: EpisodeSettings, seed: int) -> MetaDatasetSampler:  # type: ignore[no-untyped-def]
    return MetaDatasetSampler(index, seed, md_sampler.class_groups_of(index), LIMITS)


@pytest.fixture
def md_digits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`md-digits`: the digits under Meta-Dataset's rules at small limits, its classes in two alphabets."""
    protocol = EpisodeProtocol(
        SMALL, small_sampler, column=lambda _: "variable 2-4-way", largest=lambda _: LIMITS.largest, varies_shots=True
    )
    monkeypatch.setitem(PROTOCOLS, SMALL, protocol)
    source = Benchmark(SOURCE, "digits", "digits", protocol=SMALL, episodes=600, episodes_by_shots=())
    monkeypatch.setitem(DATASETS, SOURCE, source)
    monkeypatch.setitem(md_sampler.CLASS_GROUPS, SOURCE, lambda index: ClassGroups(alphabets=ALPHABETS))
    yield


def small_config(method: str, db: Path) -> RunConfig:
    """Two episodes of one shape (3 classes, 5 supports, 6 queries) whose shots per class differ: [2, 2, 1] and
    [1, 2, 2] at seed 18, trained as one batch."""
    config = RunConfig(
        dataset=SOURCE, method=method, backbone="tiny", pretrained="none", episodes=2, episode_batch=2, seed=18,
        device="cpu", db=str(db),
    )  # fmt: skip
    config.train.iterations = 1
    config.augment.views = ("plain",)
    config.maple.epochs, config.maple.warmup_epochs, config.maple.batch_size = 1, 0, 4
    config.vtt.state, config.vtt.window = 4, 1
    return config


def stored_totals(db: Path, run_id: str) -> list[int]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT total FROM episodes WHERE run_id = ? ORDER BY episode", (run_id,)).fetchall()
    return [total for (total,) in rows]


def test_every_method_fits_stores_resumes_and_reports_variable_episodes(md_digits: None, tmp_path: Path) -> None:
    db = tmp_path / "md.sqlite"
    context = build_context(small_config("zeroshot", db))
    index, sampler = context.data()
    episodes = sampler.episodes([0, 1])
    assert [[len(s) for s in e.support] for e in episodes] == [[2, 2, 1], [1, 2, 2]]
    for episode in episodes:
        names = {index.class_keys[c] for c in episode.classes}
        assert any(names <= set(members) for members in ALPHABETS.values())  # one alphabet
    assert run_identity(context)[1]["protocol"] == SMALL
    runner = Runner()
    means = []
    for method in METHODS:
        result = runner.run(small_config(method, db))
        means.append(round(sum(a for _, a in result.per_episode) / 2, 6))
        assert result.trained_episodes == 2, method
        assert stored_totals(db, result.run_id) == [sum(len(q) for q in e.query) for e in episodes], method
        again = runner.run(small_config(method, db))
        assert (again.run_id, again.trained_episodes, again.per_episode) == (result.run_id, 0, result.per_episode)
    with ResultStore(db, read_only=True) as store:
        report = build_md_report(store)
    (table,) = report.tables
    assert (table.kind, table.sources, len(table.methods)) == ("variable 2-4-way", [SOURCE], len(METHODS))
    assert all(cell.episodes == 2 for cell in table.cells.values())
    assert sorted(round(cell.mean, 6) for cell in table.cells.values()) == sorted(means)
    assert all(table.overall(method) == (table.cells[(SOURCE, method)].mean, 1) for method in table.methods)
    as_json = json.loads(render_md_report(report, "json"))
    assert [len(t["cells"]) for t in as_json["tables"]] == [len(METHODS)]
    assert len(render_md_report(report, "csv").splitlines()) == 1 + len(METHODS)
    from cdfsl.cli import app

    shown = CliRunner().invoke(app, ["report", "--db", str(db), "--meta-dataset", "--format", "markdown"])
    assert shown.exit_code == 0, shown.output
    assert f"| {SOURCE} |" in shown.output and "overall (mean of sources)" in shown.output
    assert render_md_report(report, "markdown") in shown.output
    for fmt in ("csv", "json"):
        shown = CliRunner().invoke(app, ["report", "--db", str(db), "--meta-dataset", "--format", fmt])
        assert shown.exit_code == 0 and render_md_report(report, fmt) in shown.output, shown.output
    refused = CliRunner().invoke(app, ["report", "--db", str(db), "--meta-dataset", "--format", "latex"])
    assert refused.exit_code == 2 and "--meta-dataset comes as" in refused.output


def test_run_json_lists_each_episode_and_typed_shape_selects_fixed_way(md_digits: None, tmp_path: Path) -> None:
    from cdfsl.cli import app

    db, summary = tmp_path / "cli.sqlite", tmp_path / "run.json"
    common = ["run", "--dataset", SOURCE, "--method", "zeroshot", "--backbone", "tiny", "--pretrained", "none"]
    common += ["--episodes", "3", "--seed", "18", "--device", "cpu", "--db", str(db), "--json", str(summary)]
    done = CliRunner().invoke(app, common)
    assert done.exit_code == 0, done.output
    written = json.loads(summary.read_text())
    index, sampler = build_context(small_config("zeroshot", db)).data()
    for entry, episode in zip(written["per_episode"], sampler.episodes([0, 1, 2]), strict=True):
        assert entry["ways"] == episode.ways
        assert entry["shots"] == [len(s) for s in episode.support]
        assert entry["queries"] == [len(q) for q in episode.query] == [entry["queries"][0]] * episode.ways
        assert entry["classes"] == [index.class_names[c] for c in episode.classes]

    done = CliRunner().invoke(app, [*common, "--ways", "3", "--queries", "2"])
    assert done.exit_code == 0, done.output
    fixed = json.loads(summary.read_text())
    assert fixed["config"]["protocol"] == "fixed-way"
    assert fixed["run_id"] != written["run_id"]
    assert all((e["ways"], e["shots"], e["queries"]) == (3, [1] * 3, [2] * 3) for e in fixed["per_episode"])
    with ResultStore(db, read_only=True) as store:
        kinds = [table.kind for table in build_md_report(store).tables]
    assert kinds == ["variable 2-4-way", "3-way 1-shot"]


def test_protocol_field_selects_and_resolves(md_digits: None) -> None:
    config = RunConfig(dataset=SOURCE)
    assert config.episode_protocol == SMALL
    assert config.select_protocol(["method"]).protocol == "episodic"
    assert config.select_protocol(["shots"]).protocol == "fixed-way"
    assert config.episode_protocol == "fixed-way"
    assert RunConfig(dataset="digits").select_protocol(["ways"]).protocol == "episodic"  # its own is fixed-way
    assert RunConfig(dataset="digits", protocol="meta-dataset").episode_protocol == "meta-dataset"
    assert dataclasses.replace(config, protocol="all-way").episode_protocol == "all-way"

    from cdfsl.cli.options import config_from_options

    options = {"dataset": SOURCE, "method": "zeroshot"}
    assert config_from_options(options, ["shots=5"]).protocol == "fixed-way"  # --set counts as given
    assert config_from_options(options, ["seed=3"]).protocol == "episodic"
    from_file = RunConfig(dataset=SOURCE, method="zeroshot", ways=3)  # a config file's ways are not typed
    assert config_from_options({"ways": 5}, [], base=from_file, typed=()).protocol == "episodic"
    assert config_from_options({"ways": 4}, [], base=from_file, typed=("ways",)).protocol == "fixed-way"


def test_what_reads_the_shape_follows_the_episodes(md_digits: None) -> None:
    """TIR's alpha check against the fewest ways, the tir-release logit scale, labels, episode counts and the cost
    step's synthetic episode under a protocol of varying shape."""
    import torch

    from cdfsl.analysis.cost import synthetic_batch
    from cdfsl.backbone.factory import load_backbone
    from cdfsl.errors import ConfigError
    from cdfsl.labels import episode_ways, variant_text

    varied = RunConfig(dataset="digits", method="lora+tir", protocol="meta-dataset", ways=3)
    varied.tir.alpha = 4.5
    assert varied.validated().fewest_ways() == 5  # 4.5 < 5 ways, whatever `ways` says
    varied.tir.alpha = 5.0
    with pytest.raises(ConfigError, match="alpha < ways = 5"):
        varied.validated()
    fixed = RunConfig(dataset="digits", method="lora+tir", ways=3)
    fixed.tir.alpha = 3.0
    with pytest.raises(ConfigError, match="alpha < ways = 3"):
        fixed.validated()

    def scale(**fields: object) -> float:
        return RunConfig(method="lora+tir", recipe="tir-release", **fields).validated().train.logit_scale  # type: ignore[arg-type, return-value]

    assert (scale(shots=1), scale(shots=5), scale(shots=1, protocol="meta-dataset")) == (2.0, 4.0, 4.0)

    assert episode_ways({"ways": 7, "dataset": "digits", "protocol": "meta-dataset"}) is None
    assert episode_ways({"ways": 7, "dataset": SOURCE, "protocol": "episodic"}) is None
    assert episode_ways({"ways": 7, "dataset": SOURCE, "protocol": "fixed-way"}) == 7
    assert episode_ways(RunConfig(dataset="digits", ways=3)) == 3
    assert (variant_text(None, {}), variant_text(3, {})) == (None, "3-way")
    assert RunConfig(dataset=SOURCE).resolved_episodes() == 600
    assert RunConfig(dataset="digits").resolved_episodes() == 800

    config = RunConfig(dataset="digits", method="lora", backbone="tiny", pretrained="none", protocol="meta-dataset")
    config = config.validated()
    batch = synthetic_batch(config, load_backbone("tiny", "none", torch.device("cpu")))
    views = len(config.augment.views)
    assert len(batch.class_names[0]) == 50 and batch.support.shape[1] == 500 * views
    assert torch.bincount(batch.support_labels[0]).tolist() == [10 * views] * 50


def test_the_warning_names_the_samplers_own_minimum() -> None:
    from cdfsl.data.index import ImageIndex
    from cdfsl.engine.context import _warn_excluded
    from cdfsl.errors import DatasetWarning

    sizes = [1, 3, 3, 3, 3, 3]
    labels = tuple(c for c, n in enumerate(sizes) for _ in range(n))
    items = tuple(f"{c}/{i}" for c, n in enumerate(sizes) for i in range(n))
    index = ImageIndex("toy", tuple("abcdef"), tuple("abcdef"), items, labels, str)
    with pytest.warns(DatasetWarning, match="classes with fewer than 2 images cannot appear in episodes: a$"):
        _warn_excluded(RunConfig(), MetaDatasetSampler(index, 0))
