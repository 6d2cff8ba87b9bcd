"""Protocol 2, all-way K-shot: the draw, the identity, streamed evaluation, runs of every method, resume and the CLI.

Datasets here are in-memory `digits` split trees (`allway_world`), put where the engine loads indexes
(`cdfsl.engine.context.load_index`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import cdfsl.engine.context as context_module
from allway_world import split_digits, twelve_classes
from cdfsl.cli import app
from cdfsl.config import METHODS, RunConfig
from cdfsl.data.allway import AllWaySampler, draw_all_way, listing_digest
from cdfsl.data.index import ImageIndex
from cdfsl.engine.context import build_context
from cdfsl.engine.runner import RunInterrupted, Runner, run_identity
from cdfsl.engine.store import ResultStore
from cdfsl.errors import DatasetError
from cdfsl.methods import build_method
from cdfsl.registry import split_method
from digits_world import configured

pytestmark = pytest.mark.usefixtures("one_thread")

# One short setting of every method (as tests/test_methods_registry.py): two steps, one view per support image.
TINY_SIZES = {
    "train__iterations": 2, "maple__epochs": 1, "maple__batch_size": 3, "augment__views": ("plain",),
    "vtt__state": 4,
}  # fmt: skip


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Callable[[ImageIndex], None]:
    """Serve an index as the `digits` dataset of every run context made in the test."""

    def serve(index: ImageIndex) -> None:
        monkeypatch.setattr(context_module, "load_index", lambda dataset, root, all_splits=False: index)

    return serve


def all_way(method: str = "lora", **changes: object) -> RunConfig:
    config = RunConfig(
        dataset="digits", method=method, backbone="tiny", pretrained="none", protocol="all-way", shots=2, seed=1,
        device="cpu",
    )  # fmt: skip
    return configured(config, **{**TINY_SIZES, **changes})


# ------------------------------------------------------------------------------------------------------ the draw
def test_draws_are_deterministic_disjoint_from_test_and_whole_test_split() -> None:
    index = split_digits(train=8, val=5, test=5)
    first, again = draw_all_way(index, 4, seed=1), draw_all_way(index, 4, seed=1)
    assert first == again
    assert draw_all_way(index, 4, seed=2).support != first.support
    assert draw_all_way(index, 2, seed=1).support != first.support
    test = {p for group in first.test for p in group}
    assert test == {p for p, split in enumerate(index.splits) if split == "test"}
    for label, group in enumerate(first.support):
        assert len(group) == len(set(group)) == 4  # without replacement: 8 train images per class
        assert all(index.splits[p] == "train" and index.labels[p] == label for p in group)
        assert not set(group) & test
    assert all(len(set(group)) == 4 and all(index.splits[p] == "val" for p in group) for group in first.val)
    assert first.repeated == ()


def test_replacement_only_for_a_class_short_of_train_images() -> None:
    index = split_digits(train=8, val=0, test=3, short={3: 2})
    draw = draw_all_way(index, 5, seed=0)
    assert draw.repeated == ("3",)
    assert len(draw.support[3]) == 5 and len(set(draw.support[3])) <= 2
    assert all(len(set(group)) == 5 for label, group in enumerate(draw.support) if label != 3)
    assert draw.val == ((),) * 10  # no val split: no validation draw


def test_a_dataset_without_splits_is_refused(served: Callable[[ImageIndex], None]) -> None:
    served(dataclasses.replace(split_digits(), splits=()))
    with pytest.raises(DatasetError, match=r"needs a dataset with train and test splits.*--protocol episodic"):
        build_context(all_way())


def test_every_method_sees_the_same_draw(served: Callable[[ImageIndex], None]) -> None:
    served(split_digits(train=6, test=3))
    episodes = {method: build_context(all_way(method)).data()[1].episode(0) for method in METHODS}
    assert len(set(episodes.values())) == 1


# -------------------------------------------------------------------------------------------------- the identity
class _Recording:
    """The digits loader, noting the keys whose content is asked for."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.asked = loader, set()

    def __call__(self, key: str) -> Any:
        return self.loader(key)

    def item_contents(self, keys: Any) -> Any:
        self.asked |= set(keys)
        return self.loader.item_contents(keys)


def test_identity_reads_the_listing_and_only_the_drawn_and_test_contents(served: Callable[[ImageIndex], None]) -> None:
    index = split_digits(train=8, val=1, test=2)
    recording = _Recording(index.loader)
    served(dataclasses.replace(index, loader=recording))
    context = build_context(all_way(shots=2))
    run_id, identity = run_identity(context)
    sampler = context.data()[1]
    assert isinstance(sampler, AllWaySampler)
    read = {
        index.items[p] for part in (sampler.draw.support, sampler.draw.val, sampler.draw.test) for g in part for p in g
    }
    assert recording.asked == read and len(read) == 10 * (2 + 1 + 2)
    assert identity["protocol"] == "all-way" and identity["shots"] == 2 and identity["seed"] == 1
    assert "ways" not in identity and "queries" not in identity and "episodes" not in identity
    for unread in ({"ways": 3}, {"queries": 7}, {"episodes": 9}):
        assert run_identity(build_context(all_way(shots=2, **unread)))[0] == run_id
    assert run_identity(build_context(all_way(shots=1)))[0] != run_id
    episodic = run_identity(build_context(dataclasses.replace(all_way(shots=2), protocol="episodic", queries=2)))
    assert episodic[0] != run_id and "protocol" not in episodic[1]
    renamed = dataclasses.replace(index, items=(index.items[0] + "x", *index.items[1:]))
    assert listing_digest(renamed) != listing_digest(index)  # the listing of every item counts, content or not


# -------------------------------------------------------------------------------------------- streamed evaluation
@pytest.mark.parametrize("method", ["lora+tir"])  # the final class features and TIR's hook at prediction
def test_streamed_evaluation_equals_predict(method: str, served: Callable[[ImageIndex], None], tiny: Any) -> None:
    served(split_digits(train=2, test=3))
    context = build_context(all_way(method, shots=1), eval_batch=7)
    context.__dict__["backbone"] = tiny
    model = build_method(context.spec, tiny)
    whole = context.batch([0])
    calls: list[int | None] = []
    original = model.class_features
    model.class_features = lambda names, layer=None: calls.append(layer) or original(names, layer)  # type: ignore[method-assign]
    model.fit(whole)
    expected = model.predict(whole)
    support = context.support_batch([0])
    assert support.query.shape[1] == 0 and support.support.shape == whole.support.shape
    parts = list(context.query_batches(support))
    assert [part.query.shape[1] for part in parts] == [7] * 4 + [2]  # 30 test images, 7 at a time
    streamed = torch.cat([model.predict(part) for part in parts], dim=1)
    torch.testing.assert_close(streamed, expected)
    assert torch.equal(torch.cat([part.query_labels for part in parts], dim=1), whole.query_labels)
    once = 2  # the final features and TIR's at its text layer, once per fit
    assert len(calls) == once
    model.fit(whole)  # a new fit forgets them
    model.predict(parts[0])
    assert len(calls) == 2 * once


# ------------------------------------------------------------------------------------------------------- runs
def test_an_all_way_run_learns_resumes_and_a_killed_one_stores_nothing(
    served: Callable[[ImageIndex], None], tmp_path: Path
) -> None:
    served(split_digits(train=8, test=10))
    db = str(tmp_path / "results.sqlite")
    shipped = {"pretrained": "openai", "shots": 4, "db": db}
    runner = Runner(eval_batch=32)
    killed = Runner(eval_batch=32, on_queries=_interrupt)
    with pytest.raises(RunInterrupted):
        killed.run(all_way("zeroshot", **shipped))
    with ResultStore(Path(db), read_only=True) as store:
        assert store.runs() == []  # the killed run left nothing
    zeroshot = runner.run(all_way("zeroshot", **shipped))
    trained = all_way("lora", train__iterations=10, train__lr=3e-3, **shipped)
    first = runner.run(trained)
    again = runner.run(trained)
    assert (first.trained_episodes, again.trained_episodes) == (1, 0) and again.mean_acc == first.mean_acc
    assert first.mean_acc >= zeroshot.mean_acc + 10.0  # measured: 68 vs 48 (10 classes, 100 test images)
    assert (first.classes, first.test_images) == (10, 100)
    per_class = first.records[0]["class_accuracy"]
    assert set(per_class) == set(split_digits().class_names)
    assert sum(per_class.values()) * 10 == pytest.approx(first.mean_acc)  # 10 test images per class
    summary = first.to_json()
    assert summary["protocol"] == "all-way" and summary["accuracy"] == round(first.mean_acc, 4)
    assert (summary["classes"], summary["test_images"], summary["episodes"]) == (10, 100, 1)
    assert "ways" not in summary and "queries" not in summary


def _interrupt(done: int, total: int) -> None:
    raise KeyboardInterrupt


def _every_method() -> list[Any]:
    """Every registered method; those that add no part of their own to the fast suite's run (a second plug-in, a
    plug-in on another base) are `slow`: each base alone and each plug-in once run in `make test`."""
    seen: set[str] = set()
    params = []
    for method in METHODS:
        base, plugins = split_method(method)
        parts = {base} if not plugins else set(plugins)
        new = len(parts) == 1 and not parts <= seen and (not plugins or base is None)
        seen |= parts if new else set()
        params.append(pytest.param(method, marks=() if new else pytest.mark.slow))
    return params


@pytest.mark.parametrize("method", _every_method())
def test_every_method_runs_one_all_way_fit_on_twelve_classes(
    method: str, served: Callable[[ImageIndex], None], tmp_path: Path, shared_runner: Runner
) -> None:
    served(twelve_classes(train=1, test=1))
    config = all_way(method, shots=1, train__iterations=1, maple__batch_size=12, db=str(tmp_path / "results.sqlite"))
    result = shared_runner.run(config)
    assert (result.classes, result.test_images, result.trained_episodes) == (12, 12, 1)
    assert len(result.records[0]["class_accuracy"]) == 12 and 0.0 <= result.mean_acc <= 100.0


@pytest.fixture(scope="module")
def shared_runner() -> Runner:
    return Runner(eval_batch=16)


# ---------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def split_cli(served: Callable[[ImageIndex], None]) -> Iterator[None]:
    served(split_digits(train=3, test=2))
    yield


def _cli(args: list[str]) -> Any:
    return CliRunner().invoke(app, args)


def test_cli_run_report_and_a_dataset_without_splits(split_cli: None, tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    common = ["run", "--dataset", "digits", "--method", "zeroshot", "--backbone", "tiny", "--pretrained", "none",
              "--protocol", "all-way", "--device", "cpu", "--db", str(db), "--eval-batch", "8"]  # fmt: skip
    for shots, seed in ((1, 1), (1, 2), (2, 1)):
        out = tmp_path / f"{shots}-{seed}.json"
        result = _cli([*common, "--shots", str(shots), "--seed", str(seed), "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert "(all-way" in result.output and "10 classes, 20 test images" in " ".join(result.output.split())
        summary = json.loads(out.read_text())
        assert (summary["protocol"], summary["classes"], summary["test_images"]) == ("all-way", 10, 20)
    accuracies = {}
    with ResultStore(db, read_only=True) as store:
        for run in store.runs():
            accuracies[(run.shots, run.seed)] = store.episode_accuracies(run.run_id)[0] * 100.0
    one = [accuracies[(1, 1)], accuracies[(1, 2)]]
    mean, std = sum(one) / 2, abs(one[0] - one[1]) / 2  # numpy's default std of two values
    table = _cli(["report", "--db", str(db)])
    assert table.exit_code == 0, table.output
    assert "1-shot" in table.output and "2-shot" in table.output and "Average" in table.output
    assert f"{mean:.2f} ± {std:.2f}" in table.output
    average = (mean + accuracies[(2, 1)]) / 2
    data = json.loads(_cli(["report", "--db", str(db), "--format", "json"]).output)
    (entry,) = data["all_way"]
    assert entry["datasets"]["digits"]["1"]["seeds"] == [1, 2]
    assert entry["datasets"]["digits"]["average"] == pytest.approx(average, abs=1e-3)
    for fmt, marker in (("markdown", "| digits |"), ("csv", "digits,1,"), ("latex", "\\pm")):
        shown = _cli(["report", "--db", str(db), "--format", fmt])
        assert shown.exit_code == 0 and marker in shown.output, shown.output
    episodic = [arg if arg != "all-way" else "episodic" for arg in common]
    with_episodic = _cli([*episodic, "--episodes", "1", "--queries", "2"])
    assert with_episodic.exit_code == 0, with_episodic.output
    both = _cli(["report", "--db", str(db), "--format", "markdown"]).output
    assert "digits 1-shot" in both and "| digits |" in both  # the episodic report, then the all-way table


def test_cli_refuses_all_way_on_a_dataset_without_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "results.sqlite"
    result = _cli(["run", "--dataset", "digits", "--method", "zeroshot", "--backbone", "tiny", "--pretrained", "none",
                   "--protocol", "all-way", "--device", "cpu", "--db", str(db)])  # fmt: skip
    assert result.exit_code == 2
    assert "needs a dataset with train and test splits" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not db.exists()
    bad = _cli(["run", "--dataset", "digits", "--method", "zeroshot", "--protocol", "all-way", "--eval-batch", "0"])
    assert bad.exit_code == 2 and "--eval-batch" in bad.output


def test_all_way_on_a_suite_tree_reads_every_split_and_episodes_only_the_test_split(tmp_path: Path) -> None:
    """On a CLIP few-shot suite dataset as downloaded (`dtd`), an all-way run draws from `train` and tests on the whole
    `test` split, while an episodic run sees the test split alone."""
    from cdfsl.data.benchmarks import DATASETS
    from suite_trees import make_split_tree

    root = make_split_tree(tmp_path / "dtd", ["banded", "dotted", "striped"], {"train": 3, "val": 1, "test": 2})
    db = tmp_path / "results.sqlite"
    common = ["run", "--dataset", "dtd", "--data-root", str(root), "--method", "zeroshot", "--backbone", "tiny",
              "--pretrained", "none", "--device", "cpu", "--db", str(db)]  # fmt: skip
    out = tmp_path / "all.json"
    result = _cli([*common, "--protocol", "all-way", "--shots", "2", "--seed", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert (summary["protocol"], summary["classes"], summary["test_images"]) == ("all-way", 3, 6)
    assert DATASETS["dtd"].read(root).split_names == ("test",)
    episodic = _cli([*common, "--ways", "3", "--shots", "1", "--queries", "1", "--episodes", "2"])
    assert episodic.exit_code == 0, episodic.output
