"""Trust: recipe values that decide images (ChestX's pre-resize), TIR's blocks on deep towers in the docs, backbone
tags resolved once, and the Python API's progress."""

from __future__ import annotations

import io
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cdfsl
from cdfsl.classifier import FewShotClassifier
from cdfsl.cli import app
from cdfsl.config import RunConfig, TirConfig
from cdfsl.data.images import PREPROCESSING
from cdfsl.engine.context import RunContext, build_context
from cdfsl.engine.runner import Progress, Runner, run_identity
from cdfsl.engine.store import ResultStore
from cdfsl.methods.tir.recalibration import resolve_blocks
from layouts import make_chestx, make_imagefolder
from test_cli_trust import assert_one_line_error

DOCS = Path(__file__).resolve().parents[1] / "docs"
TINY = {"backbone": "tiny", "pretrained": "none", "device": "cpu"}


@pytest.fixture(scope="module")
def chestx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ChestX layout whose first image is a 300x200 grey noise image (so a pre-resize changes its pixels)."""
    root = make_chestx(tmp_path_factory.mktemp("chestx"), per_class=2)
    first = sorted((root / "images").glob("*.png"))[0]
    noise = np.random.default_rng(0).integers(0, 256, (200, 300), dtype=np.uint8)
    Image.fromarray(noise).save(first)
    return root


def _context(root: Path, recipe: str | None, **changes: object) -> RunContext:
    config = RunConfig(dataset="chestx", data_root=str(root), method="tir", recipe=recipe, ways=2, queries=1, **TINY)
    for key, value in changes.items():
        setattr(config, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_context(config)


# ------------------------------------------------------------------------------------------- item 20: ChestX pre-resize


@pytest.mark.parametrize(
    ("recipe", "dataset", "side"),
    [
        ("tir-release", "chestx", 0),
        ("vtt-release", "chestx", 256),
        ("paper", "chestx", 256),
        ("vtt-release", "eurosat", 0),
    ],
)
def test_pre_resize_is_a_recipe_value(recipe: str, dataset: str, side: int) -> None:
    """The TIR release opens ChestX images as they are and resizes straight to 224; only the VtT loop pre-resizes."""
    config = RunConfig(dataset=dataset, data_root=".", method="tir", recipe=recipe).resolved()
    assert config.pre_resize == side


def test_tir_release_images_skip_the_pre_resize_and_vtt_release_images_keep_it(chestx_root: Path) -> None:
    tir = _context(chestx_root, None)  # tir's default recipe: tir-release
    vtt = _context(chestx_root, "vtt-release")
    size = tir.backbone.image_size
    key = tir.index.items[0]
    with Image.open(chestx_root / key) as opened:
        straight = np.asarray(opened.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        vtt_loader = opened.resize((256, 256)).convert("RGB")  # the VtT release's ChestX loader
        pre_resized = np.asarray(vtt_loader.resize((size, size), Image.Resampling.BILINEAR))
    assert not np.array_equal(straight, pre_resized)
    assert np.array_equal(tir.cache.get([0])[0].permute(1, 2, 0).numpy(), straight)
    assert np.array_equal(vtt.cache.get([0])[0].permute(1, 2, 0).numpy(), pre_resized)


def test_pre_resize_enters_the_run_identity_only_where_the_images_change(chestx_root: Path) -> None:
    """ChestX under tir-release (no pre-resize) is a new run; runs whose images did not change keep their ids."""
    tir_id, tir = run_identity(_context(chestx_root, None))
    vtt_id, vtt = run_identity(_context(chestx_root, "vtt-release"))
    override_id, _ = run_identity(_context(chestx_root, None, pre_resize=256))
    assert vtt["images"] == PREPROCESSING  # as before: ChestX pre-resized to 256
    assert tir["images"] == f"{PREPROCESSING}.pre0"
    assert override_id != tir_id and override_id != vtt_id
    config = RunConfig(dataset="digits", method="tir", ways=2, queries=1, **TINY)
    assert run_identity(build_context(config))[1]["images"] == PREPROCESSING


def test_pre_resize_set_by_hand_wins_and_is_checked() -> None:
    config = RunConfig(dataset="chestx", data_root=".", method="tir", pre_resize=256)
    assert config.resolved().pre_resize == 256
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--dataset",
            "digits",
            "--method",
            "lora",
            "--backbone",
            "tiny",
            "--pretrained",
            "none",
            "--set",
            "pre_resize=-1",
        ],
    )
    assert_one_line_error(result, "pre_resize must be")


def test_recipes_listing_shows_the_pre_resize_with_its_source() -> None:
    result = CliRunner().invoke(app, ["recipes", "--recipe", "tir-release", "--dataset", "chestx"])
    assert result.exit_code == 0, result.output
    assert "pre_resize" in result.output and "datamgr_aug.py" in result.output


# ------------------------------------------------------------------------------------------- item 21: TIR on 24 blocks


def test_tir_docs_list_the_blocks_on_deeper_towers_as_a_deviation() -> None:
    """The release hard-codes blocks 8 and 10; cdfsl counts -4, -2 from the end, which differs on 24-block towers."""
    twelve, deep = resolve_blocks(TirConfig().blocks, 12), resolve_blocks(TirConfig().blocks, 24)
    assert twelve == (8, 10) and deep == (20, 22)
    deviations = (DOCS / "tir.md").read_text().split("## Where the release is silent or broken")[1].split("\n## ")[0]
    rows = [line for line in deviations.splitlines() if line.startswith("|") and "24-block" in line]
    assert len(rows) == 1, deviations
    assert "i == 8 or i == 10" in rows[0] and f"blocks {deep[0]} and {deep[1]} of 24" in rows[0]


# ------------------------------------------------------------------------------------------- item 27.5: backbone tags


def test_tiny_tags_name_one_set_of_weights_and_one_run(tmp_path: Path) -> None:
    """`openai` (the default) and `shipped` load the same tiny weights: one run, recorded as `shipped`."""
    db = tmp_path / "r.sqlite"
    runner = Runner()
    ids = []
    for tag in ("openai", "shipped"):
        config = RunConfig(dataset="digits", method="zeroshot", backbone="tiny", pretrained=tag, episodes=1, db=str(db))
        result = runner.run(config)
        ids.append(result.run_id)
        assert result.config.pretrained == "shipped"
    assert ids[0] == ids[1]
    with ResultStore(db) as store:
        assert [run.config["pretrained"] for run in store.runs()] == ["shipped"]


@pytest.mark.parametrize(
    ("backbone", "tag"), [("tiny", "laion2b"), ("small-clip", "openai"), ("small-pe-core", "meta")]
)
def test_a_tag_the_backbone_does_not_have_is_refused(tmp_path: Path, backbone: str, tag: str) -> None:
    args = ["run", "--dataset", "digits", "--method", "zeroshot", "--backbone", backbone, "--pretrained", tag]
    result = CliRunner().invoke(app, [*args, "--episodes", "1", "--db", str(tmp_path / "r.sqlite")])
    assert_one_line_error(result, f"no pretrained tag {tag!r}")
    assert not (tmp_path / "r.sqlite").exists()


def test_model_json_records_the_weights_loaded(tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "train", classes=("a", "b"), per_class=2)
    classifier = FewShotClassifier(method="zeroshot", backbone="tiny", pretrained="openai").fit(folder)
    saved = classifier.save(tmp_path / "model")
    meta = json.loads((saved / "model.json").read_text())
    assert meta["pretrained"] == "shipped" and meta["weights"] == "shipped"


# ------------------------------------------------------------------------------------------- item 27.12: API progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("progress", "tty", "shown"), [(None, True, True), (None, False, False), (False, True, False)])
def test_api_shows_progress_on_a_terminal_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, progress: bool | None, tty: bool, shown: bool
) -> None:
    stderr = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    config = RunConfig(dataset="digits", method="zeroshot", backbone="tiny", episodes=2, db=str(tmp_path / "r.sqlite"))
    cdfsl.run(config, progress=progress)
    text = stderr.getvalue()
    assert ("2/2 episodes" in text and text.endswith("\n")) is shown, text
    assert shown or text == ""


def test_api_progress_callback_gets_every_batch(tmp_path: Path) -> None:
    reports: list[Progress] = []
    config = RunConfig(dataset="digits", method="zeroshot", backbone="tiny", episodes=2, db=str(tmp_path / "r.sqlite"))
    cdfsl.run(config, progress=reports.append)
    assert [r.done for r in reports] == [1, 2] and reports[-1].total == 2


def test_readme_python_example_says_where_results_go_and_how_long() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    section = readme[readme.index("From Python:") :].split("Other commands:")[0]
    assert "results.sqlite" in section and "db=" in section
    assert "progress" in section and re.search(r"\d+ s\b", section)
