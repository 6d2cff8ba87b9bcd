"""VtT as released: the 2L+1 sequence and its grid, the released fusion in the loop, and the ablation switches
(`vtt.tia`, `vtt.fusion=none`, `vtt.correction`, `vtt.dlc`), each removing exactly its piece; the stored switch-off
step."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cdfsl.cli import app
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.engine.runner import Runner
from cdfsl.engine.store import ResultStore
from cdfsl.errors import ConfigError
from cdfsl.methods import build_method
from cdfsl.methods.vtt.extension import VttExtension, release_grid, release_sequence
from cdfsl.methods.vtt.fusion import EpisodeLinear, ReleaseFusion
from digits_world import DigitsWorld, tiny_config


@pytest.fixture(scope="module")
def world(tiny) -> DigitsWorld:
    return DigitsWorld.of(tiny)


def vtt_config(**changes: object) -> RunConfig:
    return tiny_config("vtt", **{"lora__dropout": 0.0, **changes})


def batch_of(world: DigitsWorld, config: RunConfig, episodes: list[int]) -> EpisodeBatch:
    return world.batch(config, episodes)


# ------------------------------------------------------------------------------------------- sequence and grid


def test_release_sequence_by_hand() -> None:
    """L = 2: (f², t², f², t¹, f¹), text before vision in each pair."""
    vision = torch.tensor([10.0, 20.0]).view(2, 1, 1, 1)  # f¹ = 10, f² = 20
    text = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)  # t¹ = 1, t² = 2
    assert release_sequence(vision, text).flatten().tolist() == [20.0, 2.0, 20.0, 1.0, 10.0]


@pytest.mark.parametrize(("layers", "side"), [(12, 5), (24, 7), (4, 3)])
def test_release_grid(layers: int, side: int) -> None:
    assert release_grid(layers) == side


def test_release_grid_refuses_a_depth_that_is_not_square() -> None:
    with pytest.raises(ConfigError, match=r"vtt\.fusion=ssm"):
        release_grid(6)


def test_default_fusion_is_the_release_one(world) -> None:
    method = build_method(vtt_config(), world.backbone)
    batch = batch_of(world, vtt_config(), [0])
    method.start(batch)
    method.extension.start(batch, method.trained_tensors(), method.absorber())
    fusion = method.extension.fusion
    assert isinstance(fusion, ReleaseFusion) and fusion.grid == 5
    assert fusion.head is not None  # tiny: text width 96 ≠ joint width 64


# ------------------------------------------------------------------------------------------- ablation switches


def one_step(world, config: RunConfig):
    """Build, start and run the loss of one step by hand; returns (method, lora, output, labels, loss_ce, class
    layers)."""
    backbone = world.backbone
    batch = batch_of(world, config, [0])
    method = build_method(config, backbone)
    method.start(batch)
    method.extension.start(batch, method.trained_tensors(), method.absorber())
    lora = method._training_lora
    images, labels = batch.support[:, :10], batch.support_labels[:, :10]
    output = backbone.encode_images(images, lora, layer_features=True)
    text = method.class_features(batch.class_names)
    loss_ce = torch.nn.functional.cross_entropy(
        method.logits(output.features, text).transpose(1, 2), labels, reduction="none"
    ).mean(dim=1)
    return method, lora, output, labels, loss_ce, method._texts(batch.class_names)[2]


def test_tia_off_skips_the_text_encoder(world, monkeypatch: pytest.MonkeyPatch) -> None:
    config = vtt_config(vtt__tia=False)
    method, _, output, labels, _, layers = one_step(world, config)
    extension: VttExtension = method.extension

    def refuse(*_, **__):  # type: ignore[no-untyped-def]
        raise AssertionError("the text encoder ran with vtt.tia=false")

    monkeypatch.setattr(world.backbone, "encode_after_prefix", refuse)
    monkeypatch.setattr(world.backbone, "encode_text_tokens", refuse)
    loss = extension.vtt_loss(output, labels, layers)
    token = extension.absorption_token(output, labels, layers)
    assert token.shape[-1] == world.backbone.embed_dim  # compared with f directly, so of width C
    expected = -torch.nn.functional.cosine_similarity(token.float(), output.features.float(), dim=-1).mean(dim=1)
    torch.testing.assert_close(loss, expected)


def test_fusion_none_absorbs_the_final_feature(world) -> None:
    method, _, output, labels, _, layers = one_step(world, vtt_config(vtt__fusion="none"))
    extension = method.extension
    assert isinstance(extension.fusion, EpisodeLinear)  # only the C → W map of the tiny model's widths
    torch.testing.assert_close(
        extension.absorption_token(output, labels, layers), extension.fusion(output.features.float())
    )


def test_correction_off_steps_on_the_raw_combined_gradient(world) -> None:
    config = vtt_config(vtt__correction=False, vtt__beta=50.0)
    method, lora, output, labels, loss_ce, layers = one_step(world, config)
    combined = loss_ce + 50.0 * method.extension.vtt_loss(output, labels, layers)
    expected = torch.autograd.grad(combined.sum(), lora.tensors(), retain_graph=True)
    method.extension.backward(loss_ce, output, labels, layers)
    for tensor, raw in zip(lora.tensors(), expected, strict=True):
        torch.testing.assert_close(tensor.grad, raw)
    assert len(method.extension.switches[0].history) == 2  # DLC still sees the step's agreement


def test_correction_on_changes_conflicting_gradients(world) -> None:
    config = vtt_config(vtt__beta=50.0)
    method, lora, output, labels, loss_ce, layers = one_step(world, config)
    combined = loss_ce + 50.0 * method.extension.vtt_loss(output, labels, layers)
    raw = torch.autograd.grad(combined.sum(), lora.tensors(), retain_graph=True)
    method.extension.backward(loss_ce, output, labels, layers)
    assert any(not torch.allclose(t.grad, g) for t, g in zip(lora.tensors(), raw, strict=True))


def switching_config(**changes: object) -> RunConfig:
    """A setting where DLC switches off within a few steps on some of episodes 0-3 (window 3, beta 50)."""
    return vtt_config(train__iterations=12, vtt__window=3, vtt__beta=50.0, vtt__fusion="none", **changes)


def test_dlc_off_never_switches(world) -> None:
    batch = batch_of(world, switching_config(), [0, 1, 2, 3])
    on = build_method(switching_config(), world.backbone)
    on.fit(batch)
    assert any(r["dlc_off_step"] is not None for r in on.episode_records())
    off = build_method(switching_config(vtt__dlc=False), world.backbone)
    off.fit(batch)
    assert all(r["dlc_off_step"] is None for r in off.episode_records())
    assert all(switch.on and switch.history == [1.0] for switch in off.extension.switches)


def test_switch_off_step_follows_the_history_rule(world) -> None:
    config = switching_config()
    method = build_method(config, world.backbone)
    method.fit(batch_of(world, config, [0, 1, 2, 3]))
    for switch, record in zip(method.extension.switches, method.episode_records(), strict=True):
        step = record["dlc_off_step"]
        means = [
            sum(switch.history[: t + 1][-3:]) / len(switch.history[: t + 1][-3:]) for t in range(len(switch.history))
        ]
        first = next((t for t, m in enumerate(means) if m <= 0), None)
        assert step == first


def test_switch_off_step_is_stored_and_reported(world, tmp_path: Path) -> None:
    db = tmp_path / "v.sqlite"
    config = switching_config()
    config.backbone, config.pretrained, config.episodes, config.episode_batch = "tiny", "none", 4, 4
    config.db = str(db)
    result = Runner().run(copy.deepcopy(config))
    method = build_method(config, world.backbone)
    method.fit(batch_of(world, config, [0, 1, 2, 3]))
    expected = [r["dlc_off_step"] for r in method.episode_records()]
    assert [e["records"] for e in result.to_json()["per_episode"]] == [{"dlc_off_step": s} for s in expected]
    with ResultStore(db) as store:
        assert [r["dlc_off_step"] for r in store.episode_records(result.run_id).values()] == expected
    report = CliRunner().invoke(app, ["report", "--db", str(db), "--format", "json"])
    assert report.exit_code == 0, report.output
    rows = json.loads(report.output)["rows"]
    step = rows[0]["records"]["digits/1-shot"]["dlc_off_step"]
    assert step["per_episode"] == expected
    assert (step["present"], step["episodes"]) == (sum(s is not None for s in expected), 4)


def test_lora_runs_carry_no_switch_off_step(tmp_path: Path) -> None:
    config = tiny_config("lora", episodes=1, db=str(tmp_path / "l.sqlite"), train__iterations=1)
    assert "records" not in Runner().run(config).to_json()["per_episode"][0]
