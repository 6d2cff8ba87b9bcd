"""Diagnostic probes: linear CKA's invariances, and each probe end to end on the tiny model and digits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cdfsl.analysis.probe_setup import class_marks, prepare
from cdfsl.analysis.probes import cka_probe, linear_cka, lost_layers_probe, sink_probe
from cdfsl.config import RunConfig
from cdfsl.engine.runner import Runner
from cdfsl.errors import ConfigError
from cdfsl.methods.tir.recalibration import class_votes

LAYERS = 12  # the tiny model's vision and text depth


# ---------------------------------------------------------------------------------------------------- linear CKA


def random_features(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_of_a_set_with_itself_is_one() -> None:
    x = random_features(50, 7, 0)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    x = random_features(60, 8, 1)
    q, _ = torch.linalg.qr(random_features(8, 8, 2))
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, -0.2 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-12)  # centering removes the shift


def test_cka_of_independent_sets_is_small_and_symmetric() -> None:
    # For independent isotropic sets E[CKA] ≈ sqrt(d1 d2) / n = 0.05 here.
    values = [linear_cka(random_features(200, 10, 10 + s), random_features(200, 10, 100 + s)) for s in range(5)]
    assert max(values) < 0.2
    assert 0.01 < sum(values) / len(values) < 0.1
    x, y = random_features(40, 5, 3), random_features(40, 9, 4)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert 0.0 <= linear_cka(x, y) <= 1.0


def test_cka_rejects_different_sizes() -> None:
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.zeros(5, 2), torch.zeros(6, 2))


# ---------------------------------------------------------------------------------------------------- probes


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner()


def tiny_config(**changes: object) -> RunConfig:
    config = RunConfig(dataset="digits", backbone="tiny", pretrained="none", queries=2, device="cpu", **changes)
    config.train.iterations = 2
    return config


def read_json(path: Path) -> dict:
    assert path.is_file()
    return json.loads(path.read_text())


def assert_figures(out: Path, result: dict, names: list[str]) -> None:
    assert result["figures"] == names
    for name in names:
        assert (out / name).stat().st_size > 1000


def test_class_marks_sum_to_tirs_sum(runner: Runner) -> None:
    setup = prepare(tiny_config(), runner)
    patches = torch.randn(2, 3, setup.backbone.num_patches, setup.backbone.vision_width)
    text = torch.nn.functional.normalize(torch.randn(2, 5, setup.backbone.embed_dim), dim=-1)
    marks = class_marks(setup.backbone, patches, text, 0.3)
    projected = torch.nn.functional.normalize(setup.backbone.project_tokens(patches), dim=-1)
    similarity = torch.einsum("ebmc,ekc->ebkm", projected, text)
    assert torch.equal(marks.sum(dim=-2), class_votes(similarity, 0.3))


def test_sink_probe(tmp_path: Path, runner: Runner) -> None:
    result = sink_probe(
        tiny_config(), methods=("lora", "tir"), episodes=1, out=tmp_path, overlay_images=2, runner=runner
    )
    assert read_json(tmp_path / "sink.json") == result
    assert result["layers"] == LAYERS
    assert list(result["conditions"]) == ["before", "lora", "tir"]
    images, patches = 5 * 2, result["patch_tokens"]
    for stats in result["conditions"].values():
        for key in (
            "sum_counts",
            "sum_fraction",
            "mean_norm_by_sum",
            "mean_norm",
            "attention_top_share",
            "attention_entropy",
            "attention_on_sum_k",
        ):
            assert len(stats[key]) == LAYERS, key
        assert all(len(row) == 6 and sum(row) == images * patches for row in stats["sum_counts"])
        assert all(0.0 < share <= 1.0 for share in stats["attention_top_share"])
        assert all(0.0 < h <= result["max_entropy"] + 1e-6 for h in stats["attention_entropy"])
        assert 0.0 <= stats["accuracy"] <= 100.0
    marks = torch.tensor(result["overlays"]["marks"]["before"])
    assert marks.shape == (2, 5, patches)
    assert (marks.sum(dim=-1) == result["tokens_per_class"]).all()
    names = ["sink_sum_histogram.png", "sink_norm_by_sum.png", "sink_attention.png", "sink_overlays.png"]
    assert_figures(tmp_path, result, names)


def test_sink_probe_untrained_lora_equals_before(runner: Runner) -> None:
    config = tiny_config()
    config.train.iterations = 0  # LoRA's B factors stay zero: the fine-tuned model is the plain one
    result = sink_probe(config, methods=("lora",), episodes=1, runner=runner)
    before, lora = result["conditions"]["before"], result["conditions"]["lora"]
    assert before["sum_counts"] == lora["sum_counts"]
    assert before["mean_norm"] == pytest.approx(lora["mean_norm"], rel=1e-6)
    assert result["figures"] == []
    with pytest.raises(ConfigError, match="trained methods"):
        sink_probe(config, methods=("zeroshot",), episodes=1, runner=runner)


def test_lost_layers_probe(tmp_path: Path, runner: Runner) -> None:
    result = lost_layers_probe(tiny_config(), method="lora", episodes=1, out=tmp_path, runner=runner)
    assert read_json(tmp_path / "lost_layers.json") == result
    assert result["text_blocks"] == LAYERS
    assert list(result["conditions"]) == ["zeroshot", "lora"]
    for row in result["conditions"].values():
        for key in ("removed", "emphasized", "removed_delta", "emphasized_delta"):
            assert len(row[key]) == LAYERS
        assert len(row["per_episode"]["removed"]) == 1
    assert_figures(tmp_path, result, ["lost_layers.png"])


def test_lost_layers_with_gamma_one_is_the_unmodified_model(runner: Runner) -> None:
    result = lost_layers_probe(tiny_config(), method="lora+tir", gamma=1.0, episodes=2, runner=runner)
    for row in result["conditions"].values():
        assert row["emphasized"] == [row["unmodified"]] * LAYERS
        assert row["per_episode"]["emphasized"] == [[u] * LAYERS for u in row["per_episode"]["unmodified"]]


@pytest.mark.parametrize("method", ["coop", "maple"])
def test_lost_layers_varies_the_learned_prompts(method: str, runner: Runner) -> None:
    """A base that learns its class texts is scored against its own prompts with each block varied: with γ = 1 the
    emphasized rows equal the unmodified one, and the unmodified row is the method's own prediction accuracy."""
    config = tiny_config()
    config.train.iterations, config.maple.epochs, config.maple.batch_size = 2, 1, 25
    result = lost_layers_probe(config, method=method, gamma=1.0, episodes=2, runner=runner)
    row = result["conditions"][method]
    assert len(row["removed"]) == LAYERS
    assert row["per_episode"]["emphasized"] == [[u] * LAYERS for u in row["per_episode"]["unmodified"]]
    setup = prepare(dataclasses.replace(config, episode_batch=2), runner)
    batch = next(setup.batches(2))
    fitted = setup.method(method)
    fitted.fit(batch)
    predicted = (fitted.predict(batch).argmax(-1) == batch.query_labels).double().mean(dim=1) * 100.0
    assert row["per_episode"]["unmodified"] == pytest.approx(predicted.tolist())


def test_cka_probe_before_and_after(tmp_path: Path, runner: Runner) -> None:
    result = cka_probe(tiny_config(), episodes=1, out=tmp_path, runner=runner)
    assert read_json(tmp_path / "cka.json") == result
    assert result["layers"] == LAYERS and result["n"] == 5 * 2
    assert set(result["cka"]) == {"none", "sum_k", "sum_1"}
    for mask, values in result["cka"].items():
        assert len(values) == LAYERS
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in values), mask
        assert len(result["dropped_fraction"]["a"][mask]) == LAYERS
    assert result["dropped_fraction"]["a"]["none"] == [0.0] * LAYERS
    assert all(f > 0 for f in result["dropped_fraction"]["a"]["sum_k"])
    assert_figures(tmp_path, result, ["cka.png"])


def test_cka_probe_two_sets(runner: Runner) -> None:
    config = tiny_config(method="zeroshot")
    same = cka_probe(config, other=config, masks="none", episodes=1, runner=runner)
    assert same["cka"]["none"] == pytest.approx([1.0] * LAYERS, abs=1e-9)
    other = cka_probe(config, other=dataclasses.replace(config, seed=1), masks="sum_k", episodes=1, runner=runner)
    assert len(other["cka"]["sum_k"]) == LAYERS and other["sets"]["b"]["method"] == "zeroshot"
    with pytest.raises(ConfigError, match="trained method"):
        cka_probe(config, episodes=1, runner=runner)
    with pytest.raises(ConfigError, match="masks"):
        cka_probe(config, other=config, masks=("everything",), episodes=1, runner=runner)
