"""`cdfsl backbones`: open_clip's models classified from their configs, in agreement with what the adapter accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdfsl.backbone.catalog import catalogue, classify
from cdfsl.backbone.factory import load_backbone
from cdfsl.cli import app
from cdfsl.errors import BackboneError


@pytest.fixture(scope="module")
def entries() -> dict[str, object]:
    return {e.name: e for e in catalogue()}


def test_clip_vits_run_and_other_towers_are_named(entries) -> None:  # type: ignore[no-untyped-def]
    for name in ("tiny", "ViT-B-16", "ViT-B-32", "ViT-L-14"):
        assert entries[name].supported and entries[name].vtt_release_fusion, name
    assert "openai" in entries["ViT-B-16"].tags and entries["ViT-L-14"].vision.startswith("24×1024")
    assert "ModifiedResNet" in entries["RN50"].reason
    assert "Hugging Face text tower" in entries["roberta-ViT-B-32"].reason
    assert "CLS token" in entries["coca_ViT-B-32"].reason


def test_the_papers_timm_families_run_with_their_diagnostics(entries) -> None:  # type: ignore[no-untyped-def]
    pe_core, siglip = entries["PE-Core-B-16"], entries["ViT-B-16-SigLIP2"]
    assert pe_core.supported and pe_core.family == "PE-Core" and pe_core.tags == ("meta",)
    assert pe_core.vision == "12×768, 224px/16" and pe_core.text == "24×1024" and pe_core.embed_dim == 1024
    assert pe_core.diagnostics == ("sink", "lost-layers", "cka") and pe_core.vtt_release_fusion
    assert siglip.supported and siglip.family == "SigLIP" and "bidirectional" in siglip.text
    assert siglip.diagnostics == ("lost-layers", "cka")  # no CLS token, no CLS attention
    for name in ("small-clip", "small-pe-core", "small-siglip2"):
        assert entries[name].supported, name
    assert "EvaAttention" in entries["EVA02-B-16"].reason
    assert "not one of timm's ViT or EVA models" in entries["convnext_base"].reason
    assert "pools by 'token'" in entries["MobileCLIP2-L-14"].reason


def test_a_depth_without_a_square_grid_needs_the_scanning_fusion() -> None:
    config = {"embed_dim": 64, "vision_cfg": {"layers": 6, "width": 96}, "text_cfg": {"layers": 6, "width": 96}}
    assert not classify("six", config).vtt_release_fusion  # 2·6 + 1 = 13 is not a square


def test_the_adapter_agrees_on_models_cheap_to_build(entries) -> None:  # type: ignore[no-untyped-def]
    for name in ("tiny", "small-pe-core", "small-siglip2"):
        load_backbone(name, "none")  # supported: builds
    assert not entries["RN50"].supported
    with pytest.raises(BackboneError, match="has a vision tower cdfsl cannot run"):
        load_backbone("RN50", "none")


def test_the_command_lists_and_explains() -> None:
    runner = CliRunner(env={"COLUMNS": "200"})
    shown = runner.invoke(app, ["backbones"])
    assert shown.exit_code == 0 and "ViT-L-14" in shown.output and "--all" in shown.output
    everything = runner.invoke(app, ["backbones", "--all"])
    assert "EVA02-B-16" in everything.output and "timm vision trunk" in everything.output
    assert "PE-Core-B-16" in shown.output and "lost-layers, cka" in shown.output


def test_trunk_shapes_are_remembered_for_one_timm_and_cdfsl_version(
    entries, private_digest_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from cdfsl.backbone.catalog import TRUNK_CACHE, _TrunkCache

    stored = json.loads((private_digest_cache / TRUNK_CACHE).read_text())  # written by the `entries` fixture
    assert stored["entries"]["vit_pe_core_base_patch16_224 map"]["family"] == "PE-Core"
    stored["entries"]["vit_pe_core_base_patch16_224 map"] = "a remembered answer"
    monkeypatch.setenv("CDFSL_CACHE_DIR", str(tmp_path))
    (tmp_path / TRUNK_CACHE).write_text(json.dumps(stored))
    assert {e.name: e for e in catalogue()}["PE-Core-B-16"].reason.endswith("a remembered answer")
    (tmp_path / TRUNK_CACHE).write_text(json.dumps({**stored, "versions": "timm 0.1, cdfsl 0.0"}))
    assert _TrunkCache().entries == {}  # another timm or cdfsl: measured afresh
    (tmp_path / TRUNK_CACHE).write_text("{not json")
    assert _TrunkCache().entries == {}
