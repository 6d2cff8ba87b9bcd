"""`FewShotClassifier` and `cdfsl fit / predict / evaluate` on the tiny model: learning on held-out `digits` images,
save → load giving identical probabilities, the same episode from a folder or from paths, reproducible shots, and
each bad input failing with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from cdfsl.classifier import FewShotClassifier
from cdfsl.cli import app
from cdfsl.errors import ConfigError, DatasetError, DatasetWarning

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["zero", "one", "two", "three", "four"]
FAST = {"train.iterations": 40}


def write_digits(folder: Path, per_class: int, offset: int) -> list[tuple[Path, str]]:
    """`per_class` digits images of each of NAMES (from position `offset` in each class) as PNG class folders."""
    digits = load_digits()
    written = []
    for label, name in enumerate(NAMES):
        (folder / name).mkdir(parents=True)
        positions = np.flatnonzero(digits.target == label)[offset : offset + per_class]
        for k, position in enumerate(positions):
            path = folder / name / f"{k:02d}.png"
            Image.fromarray((digits.images[position] * 255 / 16).astype(np.uint8)).convert("RGB").save(path)
            written.append((path, name))
    return written


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Path, str]]]:
    root = tmp_path_factory.mktemp("own")
    write_digits(root / "train", per_class=5, offset=0)
    test = write_digits(root / "test", per_class=12, offset=40)
    return root, test


@pytest.fixture(scope="module")
def fitted(data: tuple[Path, list[tuple[Path, str]]]) -> FewShotClassifier:
    root, _ = data
    return FewShotClassifier("lora", backbone="tiny", device="cpu", settings=FAST).fit(root / "train")


def accuracy(classifier: FewShotClassifier, test: list[tuple[Path, str]]) -> float:
    predicted = classifier.predict([path for path, _ in test])
    return float(np.mean([p == truth for p, (_, truth) in zip(predicted, test, strict=True)]))


def test_fitting_beats_zero_shot_on_held_out_images(data, fitted: FewShotClassifier) -> None:
    root, test = data
    zero_shot = FewShotClassifier("zeroshot", backbone="tiny", device="cpu").fit(root / "train")
    assert fitted.classes_ == sorted(NAMES) and fitted.class_names_ == sorted(NAMES)
    assert accuracy(fitted, test) > accuracy(zero_shot, test) + 0.05


def test_save_and_load_give_the_same_probabilities(data, fitted: FewShotClassifier, tmp_path: Path) -> None:
    _, test = data
    paths = [path for path, _ in test]
    fitted.save(tmp_path / "model")
    loaded = FewShotClassifier.load(tmp_path / "model", device="cpu")
    mine, theirs = loaded.predict_proba(paths), fitted.predict_proba(paths)
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-7)  # float rounding only
    assert (mine.argmax(axis=1) == theirs.argmax(axis=1)).all()
    assert loaded.classes_ == fitted.classes_
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert (meta["method"], meta["backbone"], meta["format"]) == ("lora", "tiny", 1)


def test_paths_and_labels_are_the_same_episode_as_the_folder(data, fitted: FewShotClassifier) -> None:
    root, test = data
    pairs = sorted((root / "train").glob("*/*.png"))
    from_paths = FewShotClassifier("lora", backbone="tiny", device="cpu", settings=FAST)
    from_paths.fit(pairs, [p.parent.name for p in pairs])
    paths = [path for path, _ in test[:10]]
    np.testing.assert_allclose(from_paths.predict_proba(paths), fitted.predict_proba(paths), rtol=1e-5, atol=1e-6)


def test_shots_are_drawn_by_the_seed(data) -> None:
    from cdfsl.classifier import _draw_shots
    from cdfsl.data.readers import read_imagefolder

    index = read_imagefolder(data[0] / "train")
    first, again, other = _draw_shots(index, 2, 0), _draw_shots(index, 2, 0), _draw_shots(index, 2, 1)
    assert first.items == again.items and first.items != other.items and first.counts() == [2] * 5
    with pytest.raises(ConfigError, match="has 5 images, fewer than --shots 6"):
        _draw_shots(index, 6, 0)


def test_bad_inputs_fail_clearly(data, fitted: FewShotClassifier, tmp_path: Path) -> None:
    root, _ = data
    classifier = FewShotClassifier("lora", backbone="tiny", device="cpu", settings=FAST)
    with pytest.raises(ConfigError, match="not found"):
        fitted.predict([root / "nope.png"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        fitted.predict(empty)
    with pytest.raises(ConfigError, match="not fitted yet"):
        classifier.predict([root / "train" / "one" / "00.png"])
    with pytest.raises(ConfigError, match="3 images but 2 labels"):
        classifier.fit(sorted((root / "train").glob("one/*.png"))[:3], ["one", "two"])
    lonely = tmp_path / "lonely"
    write_digits(lonely, per_class=1, offset=0)
    (lonely / "empty_class").mkdir()
    with pytest.raises(ConfigError, match="none for empty_class"):
        classifier.fit(lonely)
    broken = tmp_path / "broken"
    write_digits(broken, per_class=2, offset=0)
    (broken / "one" / "bad.png").write_bytes(b"not an image")
    with pytest.warns(DatasetWarning, match="bad.png"):
        FewShotClassifier("zeroshot", backbone="tiny", device="cpu").fit(broken)
    with pytest.raises(DatasetError, match="at least 2 class folders"):
        classifier.fit(tmp_path / "lonely" / "one")


def test_a_saved_model_that_does_not_fit_is_refused(fitted: FewShotClassifier, tmp_path: Path) -> None:
    folder = fitted.save(tmp_path / "model")
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ConfigError, match=r"format 99.*upgrade cdfsl"):
        FewShotClassifier.load(folder)
    (folder / "model.json").write_text(json.dumps({**meta, "config": {**meta["config"], "lora": {"rank": 4}}}))
    with pytest.raises(ConfigError, match="cannot restore the trained state"):
        FewShotClassifier.load(folder, device="cpu")
    with pytest.raises(ConfigError, match="not a saved cdfsl classifier"):
        FewShotClassifier.load(tmp_path)


def test_a_changed_checkpoint_is_refused(data, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from cdfsl.backbone.factory import load_backbone

    checkpoint = tmp_path / "tiny.safetensors"
    state = {k: v.contiguous() for k, v in load_backbone("tiny", "none").model.state_dict().items()}
    save_file(state, str(checkpoint))
    classifier = FewShotClassifier("zeroshot", backbone="tiny", pretrained=str(checkpoint), device="cpu")
    folder = classifier.fit(data[0] / "train").save(tmp_path / "model")
    state["logit_scale"] = state["logit_scale"] + 1
    save_file(state, str(checkpoint))
    with pytest.raises(ConfigError, match="now holds other bytes"):
        FewShotClassifier.load(folder)


def test_cli_fit_predict_evaluate(data, tmp_path: Path) -> None:
    root, test = data
    runner = CliRunner()
    model = tmp_path / "model"
    fit = runner.invoke(
        app, ["fit", "--data", str(root / "train"), "--out", str(model), "--backbone", "tiny", "--device", "cpu",
              "--set", "train.iterations=40", "--shots", "3"],
    )  # fmt: skip
    assert fit.exit_code == 0, fit.output
    predicted = runner.invoke(
        app, ["predict", str(model), str(root / "test" / "one"), "--top-k", "2", "--format", "json"]
    )
    rows = json.loads(predicted.output)
    assert len(rows) == 12 and all(len(r["top"]) == 2 and r["top"][0][1] >= r["top"][1][1] for r in rows)
    as_csv = runner.invoke(app, ["predict", str(model), str(test[0][0]), "--format", "csv"])
    assert as_csv.output.splitlines()[0] == "image,rank,class,probability"
    numbers = tmp_path / "eval.json"
    evaluated = runner.invoke(app, ["evaluate", str(model), "--data", str(root / "test"), "--json", str(numbers)])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(numbers.read_text())
    assert result["images"] == 60 and np.trace(np.array(result["confusion"])) == round(result["accuracy"] * 60 / 100)
    wrong = tmp_path / "other"
    write_digits(wrong, per_class=1, offset=0)
    (wrong / "seven").mkdir()
    Image.new("RGB", (8, 8)).save(wrong / "seven" / "x.png")
    refused = runner.invoke(app, ["evaluate", str(model), "--data", str(wrong)])
    assert refused.exit_code != 0 and "seven" in refused.output


@pytest.mark.parametrize(("method", "backbone"), [("lora", "tiny"), ("coop+lora", "tiny"), ("lora", "small-pe-core")])
def test_merged_export_predicts_like_the_classifier_in_plain_open_clip(
    data, tmp_path: Path, method: str, backbone: str
) -> None:
    """The exported weights through open_clip's own `encode_image`, against the exported class text features, give
    the classifier's probabilities (`coop+lora`: LoRA on both towers and a learned context, folded into the texts;
    `small-pe-core`: LoRA merged into a timm trunk's packed q/k/v)."""
    import open_clip
    import torch

    from cdfsl.classifier import _batch, _path_index

    root, test = data
    settings = {**FAST, "lora.towers": "both"} if method == "coop+lora" else FAST
    pretrained = "openai" if backbone == "tiny" else "none"
    classifier = FewShotClassifier(method, backbone, pretrained, device="cpu", settings=settings).fit(root / "train")
    weights, sidecar = classifier.export_merged(tmp_path / "merged.safetensors")
    exported = json.loads(sidecar.read_text())
    plain = open_clip.create_model(exported["open_clip_model"], pretrained=str(weights)).eval()
    paths = [path for path, _ in test[:15]]
    context, _ = classifier._fitted
    index = _path_index(paths, [0] * len(paths), ["?"], ["?"], checked=True)
    images = _batch(index, context, context.config, query=list(range(len(paths))), class_names=["?"]).query[0]
    with torch.no_grad():
        features = torch.nn.functional.normalize(plain.encode_image(images).float(), dim=-1)
    text = torch.tensor(exported["text_features"])
    probabilities = torch.softmax(exported["logit_scale"] * features @ text.T, dim=-1).numpy()
    order = [index.items.index(p.resolve().relative_to(index.root).as_posix()) for p in paths]
    np.testing.assert_allclose(probabilities[order], classifier.predict_proba(paths), rtol=1e-3, atol=1e-5)


def test_export_refuses_what_plain_weights_cannot_do(data, tmp_path: Path) -> None:
    tir = FewShotClassifier("lora+tir", backbone="tiny", device="cpu", settings={"train.iterations": 2})
    with pytest.raises(ConfigError, match=r"tir\.at_prediction=false"):
        tir.fit(data[0] / "train").export_merged(tmp_path / "x.safetensors")
