"""The classifier a user keeps: `cdfsl fit / predict / evaluate / export` and the saved folder.

Covers the restored `cdfsl export` (the documented command lines), outputs that would overwrite an input or the
model folder (refused, folder unchanged), `model.json` and `trained.safetensors` checked before use, `predict` over
a folder with a corrupt image, `evaluate`'s JSON (per-class fields, percent) and one-class test folders, the files'
modes under the umask, `fit --out` into an existing folder, what a merged export of the tiny model needs, `fit
--iterations`, `predict --out`'s format and no progress line before a refusal. Tiny model, 1 iteration.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cdfsl.classifier import FewShotClassifier
from cdfsl.cli import app
from cdfsl.errors import ConfigError
from layouts import make_imagefolder, noise_image
from test_cli_trust import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("ant", "bee", "cow")
TINY = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu"]
ONE_STEP = ["--set", "train.iterations=1"]
WIDE = {"COLUMNS": "200"}
Snapshot = dict[str, tuple[int, bytes | None]]


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args, env=WIDE)


def snapshot(root: Path) -> Snapshot:
    """Every file's and folder's mode and every file's bytes below (and including) `root`."""
    state: Snapshot = {".": (os.stat(root).st_mode, None)}
    for path in sorted(root.rglob("*")):
        mode = os.lstat(path).st_mode
        state[path.relative_to(root).as_posix()] = (mode, path.read_bytes() if stat.S_ISREG(mode) else None)
    return state


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`train/` and `test/` class folders of noise images (2 per class)."""
    root = tmp_path_factory.mktemp("own")
    make_imagefolder(root / "train", CLASSES, per_class=2)
    make_imagefolder(root / "test", CLASSES, per_class=2)
    return root


@pytest.fixture(scope="module")
def saved(images: Path) -> Path:
    """A lora classifier fitted by `cdfsl fit` (copy it before changing it)."""
    model = images / "saved"
    result = invoke(["fit", "--data", str(images / "train"), "--out", str(model), *TINY, *ONE_STEP])
    assert result.exit_code == 0, result.output
    return model


@pytest.fixture
def model(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "my_model"
    shutil.copytree(saved, copy)
    return copy


@pytest.fixture
def umask_0022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# ----------------------------------------------------------------------------------------------------
# 18a. `cdfsl export` exists, as documented


def test_export_command_lines_of_the_docs(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: `cdfsl export my_model/ --merged clip.safetensors`; docs/classifier.md: `cdfsl export MODEL --merged
    OUT.safetensors` with `OUT.classes.json` beside it. The tiny model's export says it needs cdfsl (item 11)."""
    monkeypatch.chdir(model.parent)
    result = invoke(["export", "my_model/", "--merged", "clip.safetensors"])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((model.parent / "clip.classes.json").read_text())
    assert sidecar["open_clip_model"] == "cdfsl-tiny" and sidecar["needs_cdfsl"] is True
    assert sidecar["classes"] == list(CLASSES) and len(sidecar["text_features"]) == 3
    assert (model.parent / "clip.safetensors").stat().st_size > 0
    said = " ".join(result.output.split())
    assert "clip.safetensors" in said and "import cdfsl" in said and "open_clip alone" in said


# ----------------------------------------------------------------------------------------------------
# 7. an output is never an input nor inside the model folder


OVERWRITES = {
    "predict --out an image": lambda m, img: ["predict", str(m), str(img), "--out", str(img)],
    "predict --out model.json": lambda m, img: ["predict", str(m), str(img), "--out", str(m / "model.json")],
    "evaluate --json weights": lambda m, img: [
        "evaluate", str(m), "--data", str(img.parent.parent), "--json", str(m / "trained.safetensors")],
    "export --merged weights": lambda m, img: ["export", str(m), "--merged", str(m / "trained.safetensors")],
    "export --merged in folder": lambda m, img: ["export", str(m), "--merged", str(m / "clip.safetensors")],
}  # fmt: skip


@pytest.mark.parametrize("case", list(OVERWRITES))
def test_an_output_that_is_an_input_is_refused(images: Path, model: Path, tmp_path: Path, case: str) -> None:
    test = tmp_path / "test"
    shutil.copytree(images / "test", test)
    image = test / "ant" / "img_000.png"
    before, data = snapshot(model), snapshot(test)
    assert_one_line_error(invoke(OVERWRITES[case](model, image)), "choose another" if "image" in case else "inside")
    assert snapshot(model) == before and snapshot(test) == data


def test_outputs_reached_through_symlinks_are_refused(images: Path, model: Path, tmp_path: Path) -> None:
    image = images / "test" / "bee" / "img_001.png"
    link_to_image, link_to_model = tmp_path / "out.csv", tmp_path / "linked"
    link_to_image.symlink_to(image)
    link_to_model.symlink_to(model, target_is_directory=True)
    before, picture = snapshot(model), image.read_bytes()
    assert_one_line_error(invoke(["predict", str(model), str(image), "--out", str(link_to_image)]), "input")
    assert_one_line_error(invoke(["predict", str(link_to_model), str(image), "--out", str(model / "p.csv")]))
    assert_one_line_error(invoke(["evaluate", str(model), "--data", str(images / "test"),
                                  "--json", str(link_to_model / "model.json")]))  # fmt: skip
    assert snapshot(model) == before and image.read_bytes() == picture


def test_python_export_into_the_model_folder_is_refused(model: Path) -> None:
    classifier = FewShotClassifier.load(model, device="cpu")
    before = snapshot(model)
    for name in ("trained.safetensors", "model.safetensors"):  # the second's sidecar would be model.classes.json
        with pytest.raises(ConfigError, match="inside"):
            classifier.export_merged(model / name)
    assert snapshot(model) == before


# ----------------------------------------------------------------------------------------------------
# 5, 12, 15. model.json and trained.safetensors are checked before use


def _edit_meta(model: Path, **changes: Any) -> None:
    meta = json.loads((model / "model.json").read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (model / "model.json").write_text(json.dumps(meta))


def _meta(model: Path) -> dict[str, Any]:
    return json.loads((model / "model.json").read_text())


MALFORMED = {
    "class_names cut": (lambda m: {"class_names": _meta(m)["class_names"][:2]}, '"class_names" 2'),
    "classes a string": (lambda m: {"classes": "abc"}, '"classes" must be a list'),
    "classes cut": (lambda m: {"classes": _meta(m)["classes"][:2]}, '"classes" has 2 entries'),
    "no pretrained": (lambda m: {"pretrained": None}, 'no "pretrained"'),
    "format a string": (lambda m: {"format": "1"}, '"format" must be a whole number'),
    "config pretrained differs": (
        lambda m: {"config": {**_meta(m)["config"], "pretrained": "openai"}}, '"config.pretrained"'),
    "tokenizer traversal": (
        lambda m: {"config": {**_meta(m)["config"], "tokenizer": "../../elsewhere"}}, '"config.tokenizer"'),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_model_json_is_one_line(images: Path, model: Path, case: str) -> None:
    changes, fragment = MALFORMED[case]
    _edit_meta(model, **changes(model))
    before = snapshot(model)
    line = assert_one_line_error(invoke(["predict", str(model), str(images / "test")]), fragment, "model.json")
    assert "upgrade" not in line and "--tokenizer" not in line
    assert snapshot(model) == before


def _pickled(path: Path) -> None:
    path.write_bytes(pickle.dumps({"vision_lora.a": [1.0, 2.0]}))


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_pickled, _truncated])
def test_an_unreadable_weights_file_is_one_line(images: Path, model: Path, damage: Any) -> None:
    damage(model / "trained.safetensors")
    assert_one_line_error(invoke(["predict", str(model), str(images / "test")]), "trained.safetensors", "safetensors")


def test_a_wrong_shape_tensor_is_named_with_both_shapes(images: Path, model: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(model / "trained.safetensors"))
    name = sorted(state)[0]
    expected = list(state[name].shape)
    state[name] = state[name][..., :1].contiguous()
    save_file(state, str(model / "trained.safetensors"))
    line = assert_one_line_error(invoke(["predict", str(model), str(images / "test")]), name)
    assert f"{[*expected[:-1], 1]}, not {expected}" in line


# ----------------------------------------------------------------------------------------------------
# 6. predict over a folder leaves a corrupt image out; a named one is refused


def test_predict_leaves_out_a_corrupt_image_in_a_folder(images: Path, model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "new"
    shutil.copytree(images / "test" / "ant", folder)
    (folder / "broken.png").write_bytes(b"not an image")
    result = invoke(["predict", str(model), str(folder), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "broken.png" in result.stderr and "warning" in result.stderr
    rows = json.loads(result.stdout)
    assert sorted(Path(r["image"]).name for r in rows) == ["img_000.png", "img_001.png"]
    assert_one_line_error(invoke(["predict", str(model), str(folder / "broken.png")]), "broken.png")


# ----------------------------------------------------------------------------------------------------
# 7n, 8. evaluate's JSON: percent and per-class fields; a one-class folder


def test_evaluate_json_has_per_class_numbers_in_percent(images: Path, model: Path, tmp_path: Path) -> None:
    numbers = tmp_path / "scores.json"
    result = invoke(["evaluate", str(model), "--data", str(images / "test"), "--json", str(numbers)])
    assert result.exit_code == 0, result.output
    scores = json.loads(numbers.read_text())
    per_class = scores["per_class"]
    assert [row["class"] for row in per_class] == list(CLASSES) and [row["images"] for row in per_class] == [2] * 3
    assert (
        scores["correct"]
        == sum(row["correct"] for row in per_class)
        == sum(scores["confusion"][i][i] for i in range(3))
    )
    assert scores["accuracy"] == pytest.approx(100 * scores["correct"] / 6)
    assert all(row["accuracy"] == pytest.approx(50 * row["correct"]) for row in per_class)
    assert f"{scores['accuracy']:.2f}% of 6 images" in result.stdout


def test_evaluate_on_one_class(images: Path, model: Path, tmp_path: Path) -> None:
    shutil.copytree(images / "test" / "bee", tmp_path / "one" / "bee")
    numbers = tmp_path / "one.json"
    result = invoke(["evaluate", str(model), "--data", str(tmp_path / "one"), "--json", str(numbers)])
    assert result.exit_code == 0, result.output
    scores = json.loads(numbers.read_text())
    assert scores["images"] == 2 and [row["images"] for row in scores["per_class"]] == [0, 2, 0]
    assert scores["per_class"][0]["accuracy"] is None


# ----------------------------------------------------------------------------------------------------
# 9. files cdfsl writes follow the umask


@pytest.mark.usefixtures("umask_0022")
def test_written_files_follow_the_umask(images: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    fitted = invoke(["fit", "--data", str(images / "train"), "--out", str(model), *TINY, *ONE_STEP])
    assert fitted.exit_code == 0, fitted.output
    outputs = [tmp_path / "p.csv", tmp_path / "scores.json", tmp_path / "clip.safetensors"]
    for args in (
        ["predict", str(model), str(images / "test"), "--out", str(outputs[0])],
        ["evaluate", str(model), "--data", str(images / "test"), "--json", str(outputs[1])],
        ["export", str(model), "--merged", str(outputs[2])],
    ):
        assert invoke(args).exit_code == 0
    files = [model / "model.json", model / "trained.safetensors", *outputs, tmp_path / "clip.classes.json"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}
    assert oct(stat.S_IMODE(model.stat().st_mode)) == "0o755"


# ----------------------------------------------------------------------------------------------------
# 10. fit --out into an existing folder


def test_fit_into_a_saved_classifier_needs_overwrite(images: Path, model: Path, tmp_path: Path) -> None:
    fit = ["fit", "--data", str(images / "train"), "--out", str(model), *TINY, *ONE_STEP]
    before = snapshot(model)
    assert_one_line_error(invoke([*fit, "--method", "zeroshot"]), "--overwrite")
    assert snapshot(model) == before
    (model / "stray.txt").write_text("left from before")
    replaced = invoke([*fit, "--method", "zeroshot", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert _meta(model)["method"] == "zeroshot" and not (model / "stray.txt").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    kept = snapshot(other)
    assert_one_line_error(invoke([*fit[:4], str(other), *TINY, "--overwrite"]), "not a saved classifier")
    assert snapshot(other) == kept


# ----------------------------------------------------------------------------------------------------
# 13. fit --iterations; predict --out's format; no progress line before a refusal


def test_a_refused_fit_prints_no_progress_line(tmp_path: Path) -> None:
    one_class = tmp_path / "one"
    noise_image(one_class / "ant" / "a.png", side=16)
    args = ["fit", "--data", str(one_class), "--out", str(tmp_path / "m"), *TINY, *ONE_STEP]
    assert_one_line_error(invoke(args), "2 class folders")  # the whole output: no `fit lora ━━ 0/?` line
    assert not (tmp_path / "m").exists()


def test_fit_takes_iterations(images: Path, tmp_path: Path) -> None:
    fitted = invoke(["fit", "--data", str(images / "train"), "--out", str(tmp_path / "m"), *TINY, "--iterations", "1"])
    assert fitted.exit_code == 0, fitted.output
    assert _meta(tmp_path / "m")["config"]["train"]["iterations"] == 1


def test_predict_out_format_follows_the_suffix(images: Path, model: Path, tmp_path: Path) -> None:
    image = str(images / "test" / "cow" / "img_000.png")
    as_text = invoke(["predict", str(model), image, "--out", str(tmp_path / "p.txt")])
    assert as_text.exit_code == 0 and "as csv" in as_text.output
    assert (tmp_path / "p.txt").read_text().startswith("image,rank,class,probability")
    as_json = invoke(["predict", str(model), image, "--out", str(tmp_path / "p.json")])
    assert as_json.exit_code == 0 and "as json" in as_json.output
    assert json.loads((tmp_path / "p.json").read_text())[0]["image"] == image
    assert_one_line_error(invoke(["predict", str(model), image, "--format", "table", "--out", str(tmp_path / "t")]))


# ----------------------------------------------------------------------------------------------------
# Found in review: the classifier's own images follow the configured pre-resize; a too-deep model.json is one line


def test_the_classifier_decodes_with_the_configured_pre_resize(images: Path) -> None:
    """`pre_resize` is a run setting (ChestX's 256 under vtt-release); a classifier given it must decode its images
    with it, as the runner does (zero-shot, so the probabilities differ only through the pixels)."""
    test_images = sorted((images / "test").rglob("*.png"))

    def probabilities(**settings: Any) -> Any:
        classifier = FewShotClassifier("zeroshot", "tiny", "none", device="cpu", settings=settings)
        return classifier.fit(images / "train").predict_proba(test_images)

    plain, pre_resized = probabilities(), probabilities(pre_resize=7)
    assert plain.shape == pre_resized.shape and not (plain == pre_resized).all()


def test_a_model_json_nested_too_deeply_is_one_line(images: Path, model: Path) -> None:
    (model / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    before = snapshot(model)
    assert_one_line_error(invoke(["predict", str(model), str(images / "test")]), "model.json", "deeper")
    assert snapshot(model) == before
