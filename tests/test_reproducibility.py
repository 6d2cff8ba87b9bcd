"""`--deterministic` and the device model stored with each episode (docs/protocol.md, "Reproducibility")."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cdfsl.cli import app
from cdfsl.engine.reproducibility import CUBLAS_WORKSPACE, deterministic_mode, device_model
from cdfsl.engine.runner import Runner
from cdfsl.engine.store import ResultStore
from digits_world import stored_run_config
from layouts import make_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_deterministic_mode_sets_every_switch_and_restores_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    with deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    assert torch.backends.cuda.flash_sdp_enabled()
    with deterministic_mode(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_a_deterministic_cpu_run_is_the_same_run_and_stores_its_device(tmp_path: Path) -> None:
    """On the CPU the switch changes nothing: one run id, the same accuracies; each episode records the processor."""
    db = tmp_path / "runs.sqlite"
    args = ["run", "--dataset", "digits", "--method", "lora", "--backbone", "tiny", "--pretrained", "none",
            "--shots", "1", "--episodes", "1", "--queries", "3", "--iterations", "1", "--device", "cpu",
            "--db", str(db), "--deterministic", "--json", str(tmp_path / "run.json")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["config"]["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    plain = Runner().run(stored_run_config(tmp_path / "plain.sqlite", 1, episodes=1, queries=3))
    assert summary["run_id"] == plain.run_id
    assert [(e["episode"], e["acc"]) for e in summary["per_episode"]] == [
        (i, round(a, 4)) for i, a in plain.per_episode
    ]
    with ResultStore(db, read_only=True) as store:
        devices = store.episode_devices(summary["run_id"])
    assert devices == {0: device_model(torch.device("cpu"))}
    assert devices[0].startswith("cpu: ") and len(devices[0]) > len("cpu: ")


def test_the_device_model_names_the_processor_or_the_gpu() -> None:
    name = device_model(torch.device("cpu"))
    assert name.startswith("cpu: ") and (platform.machine() in name or len(name) > 10)
    assert device_model(torch.device("meta")) == "meta"
    if torch.cuda.is_available():
        assert device_model(torch.device("cuda")) == torch.cuda.get_device_name(0)


def test_fit_takes_the_switch_and_leaves_the_settings_as_they_were(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "train", ("cat", "dog"), per_class=2)
    args = ["fit", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "model"), "--backbone", "tiny",
            "--pretrained", "none", "--device", "cpu", "--set", "train.iterations=1", "--deterministic"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model").is_dir() and not torch.are_deterministic_algorithms_enabled()


def test_a_sweep_file_sets_the_switch_for_its_runs(tmp_path: Path) -> None:
    from cdfsl.engine.sweep import load_sweep

    path = tmp_path / "sweep.toml"
    path.write_text(
        f'[sweep]\ndb = "{tmp_path / "r.sqlite"}"\ndevice = "cpu"\n'
        '[grid]\nmethod = ["zeroshot", "lora"]\ndataset = "digits"\nbackbone = "tiny"\npretrained = "none"\n'
        "[set]\ndeterministic = true\n"
    )
    assert [run.config.deterministic for run in load_sweep(path).runs] == [True, True]
