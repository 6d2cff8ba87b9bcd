"""Training curves: the recorded steps, what each base and plug-in records (E episodes at once = each alone), the
sink share against TIR's own votes, the store round trip and `report --curves`, and `run --tensorboard`."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cdfsl.analysis.curves import run_curves
from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.cli import app
from cdfsl.config import TirConfig
from cdfsl.engine.runner import Runner
from cdfsl.engine.store import ResultStore
from cdfsl.errors import ConfigError, StoreError
from cdfsl.methods import build_method
from cdfsl.methods.tir.recalibration import TokenRecalibration, class_votes
from cdfsl.methods.training import Curves
from digits_world import DigitsWorld, stored_run_config, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny: ClipAdapter) -> DigitsWorld:
    return DigitsWorld.of(tiny)


@pytest.mark.parametrize(("steps", "recorded"), [(25, [1, 11, 21, 25]), (21, [1, 11, 21]), (1, [1]), (0, [])])
def test_recorded_steps(steps: int, recorded: list[int]) -> None:
    assert Curves(2, steps).steps == recorded


def test_records_are_per_episode_with_nan_as_null() -> None:
    curves = Curves(2, 12)
    curves.add(1, "loss_ce", torch.tensor([1.0, 2.0]))
    curves.add(5, "loss_ce", torch.tensor([9.0, 9.0]))  # not a recorded step: ignored
    curves.add(11, "loss_ce", torch.tensor([0.5, float("nan")]))
    curves.add(12, "loss_vtt", torch.tensor([-0.25, -0.5]))
    first, second = curves.records()
    assert first["curves"] == {"step": [1, 11, 12], "loss_ce": [1.0, 0.5, None], "loss_vtt": [None, None, -0.25]}
    assert second["curves"]["loss_ce"] == [2.0, None, None]


@pytest.mark.batching
def test_lora_tir_vtt_records_every_quantity_and_episodes_at_once_equal_each_alone(world: DigitsWorld) -> None:
    config = tiny_config(
        "lora+tir+vtt", train__iterations=12, vtt__window=3, vtt__beta=50.0, shots=1, queries=2, lora__dropout=0.0
    )
    batch = world.batch(config, [0, 1, 2, 3])
    together = build_method(config, world.backbone)
    together.fit(batch)
    records = together.episode_records()
    curves = records[0]["curves"]
    assert set(curves) == {"step", "loss_ce", "sink_share", "loss_vtt", "dgso_cos"} and curves["step"] == [1, 11, 12]
    assert all(0.0 <= v <= 1.0 for r in records for v in r["curves"]["sink_share"])
    for record in records:  # once DLC switched L_VtT off, its curve values are empty
        off = record["dlc_off_step"]
        for step, value in zip(record["curves"]["step"], record["curves"]["loss_vtt"], strict=True):
            assert (value is None) == (off is not None and step > off)
    assert any(r["dlc_off_step"] is not None for r in records)
    for position, episode in enumerate([0, 1, 2, 3]):
        alone = build_method(copy.deepcopy(config), world.backbone)
        alone.fit(world.batch(config, [episode]))
        mine, theirs = records[position]["curves"], alone.episode_records()[0]["curves"]
        for name in mine:
            np.testing.assert_allclose(
                np.array(mine[name], dtype=float), np.array(theirs[name], dtype=float), rtol=1e-4, atol=1e-5
            )


def test_maple_records_its_loss_at_its_own_steps(world: DigitsWorld) -> None:
    config = tiny_config("maple+tir", shots=1, queries=2, augment__views=("plain", "flip"), maple__epochs=2)
    method = build_method(config, world.backbone)
    method.fit(world.batch(config, [0]))
    curves = method.episode_records()[0]["curves"]
    assert curves["step"] == [1, 6] and set(curves) == {"step", "loss_ce", "sink_share"}  # 2 epochs of 3 batches


@torch.no_grad()
def test_sink_share_is_the_share_of_tokens_every_class_claims(tiny: ClipAdapter) -> None:
    tir = TokenRecalibration(TirConfig(), tiny)
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randn((2, 3, tiny.num_patches, tiny.vision_width), generator=generator)
    text = F.normalize(torch.randn((2, 5, tiny.embed_dim), generator=generator), dim=-1)
    tir.measure_sinks = True
    tir.weights(tokens, text)
    tir.weights(tokens[:, :, torch.randperm(tiny.num_patches, generator=generator)], text)  # same tokens, reordered
    share = tir.take_sink_share()
    projected = F.normalize(tiny.project_tokens(tokens).float(), dim=-1)
    votes = class_votes(torch.einsum("ebmc,ekc->ebkm", projected, text), TirConfig().ratio)
    expected = (votes == 5).float().mean(dim=(1, 2))
    torch.testing.assert_close(share, expected)
    assert tir.take_sink_share() is None  # forgotten once taken


def stored_curves_run(db: Path) -> None:
    config = stored_run_config(db, iterations=11, episodes=2, method="lora+tir")
    Runner().run(config)


def test_store_round_trip_and_report(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    stored_curves_run(db)
    with ResultStore(db, read_only=True) as store:
        run_id = store.runs()[0].run_id
        stored = store.episode_curves(run_id)
        (summary,) = run_curves(store)
    assert sorted(stored) == [0, 1] and all(c is not None and c["step"] == [1, 11] for c in stored.values())
    by_hand = np.mean([stored[0]["loss_ce"], stored[1]["loss_ce"]], axis=0)  # type: ignore[index]
    np.testing.assert_allclose(summary.quantities["loss_ce"].mean, by_hand)
    assert list(summary.quantities) == ["loss_ce", "sink_share"]
    shown = CliRunner().invoke(app, ["report", "--db", str(db), "--curves", "--format", "json"])
    (as_json,) = json.loads(shown.output)
    assert as_json["step"] == [1, 11] and as_json["quantities"]["loss_ce"]["episodes"] == [2, 2]
    figures = tmp_path / "figures"
    plotted = CliRunner().invoke(app, ["report", "--db", str(db), "--curves", "--plot", str(figures)])
    assert plotted.exit_code == 0 and [p.name for p in figures.iterdir()] == [
        f"curves_lora-tir_digits_1shot_{run_id}.png"
    ]


def test_malformed_curves_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    stored_curves_run(db)
    import sqlite3

    with sqlite3.connect(db) as connection:
        connection.execute(
            "UPDATE episodes SET curves_json = ? WHERE episode = 1", ('{"step": [1, 11], "loss_ce": [1]}',)
        )
    with ResultStore(db, read_only=True) as store, pytest.raises(StoreError, match="episode 1 has malformed curves"):
        run_curves(store)


def test_tensorboard_holds_what_the_store_holds(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    db, board = tmp_path / "r.sqlite", tmp_path / "board"
    arguments = [
        "run", "--dataset", "digits", "--method", "lora", "--backbone", "tiny", "--pretrained", "none", "--episodes",
        "2", "--queries", "3", "--db", str(db), "--set", "train.iterations=11", "--run-name", "tb", "--tensorboard",
        str(board),
    ]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    with ResultStore(db, read_only=True) as store:
        run_id = store.runs()[0].run_id
        accuracies, curves = store.episode_accuracies(run_id), store.episode_curves(run_id)
    top = EventAccumulator(str(board / "tb"))
    top.Reload()
    assert [(e.step, round(e.value, 4)) for e in top.Scalars("accuracy")] == [
        (i, round(100 * accuracies[i], 4)) for i in (0, 1)
    ]
    first = EventAccumulator(str(board / "tb" / "episode_0000"))
    first.Reload()
    stored = curves[0]
    assert stored is not None
    assert [(e.step, pytest.approx(e.value)) for e in first.Scalars("loss_ce")] == list(
        zip(stored["step"], stored["loss_ce"], strict=True)
    )


def test_tensorboard_missing_is_a_clear_error_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cdfsl.engine.tensorboard import require_tensorboard

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'cdfsl\[tensorboard\]'"):
        require_tensorboard()
    db = tmp_path / "r.sqlite"
    arguments = [
        "run",
        "--dataset",
        "digits",
        "--backbone",
        "tiny",
        "--db",
        str(db),
        "--tensorboard",
        str(tmp_path / "b"),
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code != 0 and "needs the tensorboard package" in result.output and not db.exists()
