"""The run context: the runner and the probes build the same episodes from one config; bad configs load nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import cdfsl.engine.context as context_module
from cdfsl.analysis.probe_setup import prepare
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.engine.context import LoadCache, build_context, resolve_device
from cdfsl.engine.runner import Runner
from cdfsl.errors import ConfigError, DatasetWarning
from digits_world import stored_run_config


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner()


def test_runner_and_probes_build_the_same_batches(
    runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = stored_run_config(tmp_path / "r.sqlite", 1, episodes=3, episode_batch=2)
    trained: list[EpisodeBatch] = []
    original = context_module.build_batch

    def recording(*args: Any, **kwargs: Any) -> EpisodeBatch:
        trained.append(original(*args, **kwargs))
        return trained[-1]

    with monkeypatch.context() as patch:
        patch.setattr(context_module, "build_batch", recording)
        result = runner.run(config)
    assert result.trained_episodes == 3
    probed = list(prepare(config, runner).batches(3, with_views=config.trains))
    assert [b.indices for b in trained] == [b.indices for b in probed] == [[0, 1], [2]]
    for ran, seen in zip(trained, probed, strict=True):
        assert ran.episodes == seen.episodes and ran.class_names == seen.class_names
        for name in ("support", "support_labels", "query", "query_labels"):
            assert torch.equal(getattr(ran, name), getattr(seen, name)), name
    assert trained[0].support.shape[1] == 5 * 5  # episode 0: 5 support images x 5 views, as the run trains on


@pytest.mark.parametrize(
    "changes",
    [{"method": "finetune"}, {"ways": 0}, {"device": "tpu"}, {"dataset": "mnist"}, {"train__precision": "fp8"}],
)
def test_a_bad_config_is_refused_before_anything_is_loaded(
    changes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("loaded before the config was checked")

    for name in ("load_index", "load_backbone", "build_sampler", "ImageCache"):
        monkeypatch.setattr(context_module, name, must_not_load)
    config = stored_run_config(tmp_path / "r.sqlite", 1, **changes)
    with pytest.raises(ConfigError):
        build_context(config)
    with pytest.raises(ConfigError):
        build_context(config, load_data=False)
    with pytest.raises(ConfigError):
        Runner().run(config)
    with pytest.raises(ConfigError):
        prepare(config)
    assert not (tmp_path / "r.sqlite").exists()


def test_the_backbone_is_loaded_on_first_use_and_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    original = context_module.load_backbone

    def counting(*args: Any, **kwargs: Any) -> Any:
        loaded.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(context_module, "load_backbone", counting)
    loads = LoadCache()
    config = stored_run_config(Path("unused.sqlite"), 1)
    context = build_context(config, loads, load_data=False)
    assert (context.index, context.sampler) == (None, None)
    assert context.config == config.resolved() and context.precision == "fp32" and context.autocast_dtype is None
    assert loaded == []
    with pytest.raises(RuntimeError, match="without its dataset"):
        context.batch([0])
    assert loaded == []  # refused before it loaded anything
    assert build_context(config, loads).backbone is context.backbone
    assert loaded == ["tiny"]


def test_a_stored_run_loads_no_backbone(runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = stored_run_config(tmp_path / "r.sqlite", 1, episodes=1)
    first = runner.run(config)

    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a run with every episode stored loaded its backbone")

    monkeypatch.setattr(context_module, "load_backbone", must_not_load)
    again = Runner().run(config)
    assert again.trained_episodes == 0 and again.per_episode == first.per_episode


def test_classes_too_small_for_an_episode_are_named_in_a_warning() -> None:
    config = stored_run_config(Path("unused.sqlite"), 1, queries=176)  # digits: one class has 174 images, others 177+
    with pytest.warns(DatasetWarning, match=r"shots \+ queries = 177 images cannot appear in episodes: \w+$"):
        context = build_context(config)
    assert len(context.data()[1].excluded_classes) == 1


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_names_accepted(device: str) -> None:
    """Kept as given, and each name but `auto` is one torch reads as that very device."""
    assert RunConfig(device=device).validate().device == device
    if device == "auto":
        assert resolve_device(device).type in ("cuda", "cpu")
    else:
        assert str(torch.device(device)) == device


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "cuda:-1", "cuda:１", "gpu"])
def test_device_names_refused(device: str) -> None:
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, cuda:N"):
        RunConfig(device=device).validate()


def test_devices_that_are_not_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"--device {name} was asked for but no CUDA GPU"):
            resolve_device(name)
    with pytest.raises(ConfigError, match="Metal backend is not available"):
        resolve_device("mps")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 … cuda:1"):
        resolve_device("cuda:2")
