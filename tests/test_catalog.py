"""`cdfsl backbones`: open_clip's models classified from their configs, in agreement with what the adapter accepts."""

from __future__ import annotations

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
    assert "timm vision trunk" in entries["PE-Core-B-16"].reason
    assert "timm vision trunk" in entries["ViT-B-16-SigLIP2"].reason
    assert "ModifiedResNet" in entries["RN50"].reason
    assert "Hugging Face text tower" in entries["roberta-ViT-B-32"].reason
    assert "CLS token" in entries["coca_ViT-B-32"].reason


def test_a_depth_without_a_square_grid_needs_the_scanning_fusion() -> None:
    config = {"embed_dim": 64, "vision_cfg": {"layers": 6, "width": 96}, "text_cfg": {"layers": 6, "width": 96}}
    assert not classify("six", config).vtt_release_fusion  # 2·6 + 1 = 13 is not a square


def test_the_adapter_agrees_on_models_cheap_to_build(entries) -> None:  # type: ignore[no-untyped-def]
    load_backbone("tiny", "none")  # supported: builds
    assert not entries["RN50"].supported
    with pytest.raises(BackboneError, match="not an open_clip ViT CLIP"):
        load_backbone("RN50", "none")


def test_the_command_lists_and_explains() -> None:
    runner = CliRunner(env={"COLUMNS": "200"})
    shown = runner.invoke(app, ["backbones"])
    assert shown.exit_code == 0 and "ViT-L-14" in shown.output and "--all" in shown.output
    everything = runner.invoke(app, ["backbones", "--all"])
    assert "PE-Core-B-16" in everything.output and "timm vision trunk" in everything.output
