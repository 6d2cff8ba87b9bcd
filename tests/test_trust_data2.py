"""Data trust, second round: a file changed during a run is refused and never poisons the image cache, two classes
with one prompt are refused, EXIF orientation is applied, `datasets check --deep` fails for scripts when images do
not decode, and folder class names become prompt names by one rule at every entry point."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cdfsl.data.images as images_module
from cdfsl.cli import app
from cdfsl.data.images import ImageCache, cache_folder
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers import load_index
from cdfsl.errors import DatasetError
from layouts import make_imagefolder
from test_cli_trust import assert_one_line_error
from test_data_trust import private_cache  # noqa: F401  (autouse: each test its own digest cache)

TINY = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu"]


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def load_quietly(dataset: str, root: Path | None) -> ImageIndex:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_index(dataset, root)


def cached_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.npy") if ".tmp" not in p.name)


# 1. a file changed during a run ---------------------------------------------------------------------------------


def test_file_changed_after_the_fingerprint_is_refused_and_not_cached(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    cache = tmp_path / "cache"
    key = "a/img_000.png"
    original = (root / key).read_bytes()
    index = load_quietly("imagefolder", root)
    index.fingerprint()  # the run starts: its identity covers the original bytes
    Image.new("RGB", (12, 12), (255, 0, 255)).save(root / key)
    with pytest.raises(DatasetError, match=rf"{key} changed since the run started.*re-run"):
        ImageCache(index, 16, cache, workers=1).get([0, 1])
    assert not (cache_folder(cache, index, 16) / f"{index.item_digest(0)}.npy").exists()

    # A later run on the changed data, and one on the original data again, see through the shared cache exactly
    # what a fresh cache decodes.
    for _ in ("changed", "original"):
        shared = ImageCache(load_quietly("imagefolder", root), 16, cache).get([0, 1, 2, 3])
        fresh_cache = tmp_path / f"fresh-{_}"
        fresh = ImageCache(load_quietly("imagefolder", root), 16, fresh_cache).get([0, 1, 2, 3])
        assert np.array_equal(shared.numpy(), fresh.numpy())
        (root / key).write_bytes(original)


def run_args(root: Path, db: Path, cache: Path) -> list[str]:
    return [
        "run", "--dataset", "imagefolder", "--data-root", str(root), "--method", "zeroshot", *TINY,
        "--ways", "2", "--shots", "1", "--queries", "2", "--episodes", "2", "--db", str(db), "--cache-dir", str(cache),
        "--json", str(db.with_suffix(".json")),
    ]  # fmt: skip


def accuracies(db: Path) -> list[float]:
    return [episode["acc"] for episode in json.loads(db.with_suffix(".json").read_text())["per_episode"]]


def test_run_with_a_file_changed_mid_run_stops_and_later_runs_match_a_fresh_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=3)
    cache = tmp_path / "cache"
    originals = {path: path.read_bytes() for path in root.rglob("*.png")}
    get = ImageCache.get

    def change_then_get(self: ImageCache, positions: list[int], **options: Any) -> Any:
        # after the run fingerprinted the data, before the first decode: every image becomes another one
        for n, path in enumerate(originals):
            Image.new("RGB", (12, 12), (255, 20 * n, 0)).save(path)
        return get(self, positions, **options)

    monkeypatch.setattr(images_module.ImageCache, "get", change_then_get)
    assert_one_line_error(invoke(run_args(root, tmp_path / "a.sqlite", cache)), "changed since the run started")
    monkeypatch.setattr(images_module.ImageCache, "get", get)
    assert not cached_files(cache)

    for path, content in originals.items():  # the data as it was: the shared cache holds nothing of the swap
        path.write_bytes(content)
    assert invoke(run_args(root, tmp_path / "shared.sqlite", cache)).exit_code == 0
    assert invoke(run_args(root, tmp_path / "fresh.sqlite", tmp_path / "fresh")).exit_code == 0
    assert accuracies(tmp_path / "shared.sqlite") == accuracies(tmp_path / "fresh.sqlite")


# 3. two classes, one prompt -------------------------------------------------------------------------------------

CAFE_NFC, CAFE_NFD = "caf\u00e9", "cafe\u0301"


@pytest.mark.parametrize(
    ("folders", "classnames", "fragments"),
    [
        (("cat", "Cat", "dog"), None, ["'cat'", "'Cat'", "read as 'cat'"]),
        ((CAFE_NFC, CAFE_NFD, "tea"), None, [repr(CAFE_NFC), repr(CAFE_NFD)]),
        (
            ("a", "b", "c"),
            {"a": "red square", "b": "Red  Square"},
            ["'a' (prompt 'red square')", "read as 'red square'"],
        ),
    ],
    ids=["case", "nfc-nfd", "classnames.json"],
)
def test_classes_sharing_a_prompt_are_refused(
    tmp_path: Path, folders: tuple[str, ...], classnames: dict[str, str] | None, fragments: list[str]
) -> None:
    root = make_imagefolder(tmp_path / "data", classes=folders, per_class=2, classnames=classnames)
    with pytest.raises(DatasetError, match="share a prompt name") as error:
        load_index("imagefolder", root)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_refused_at_every_entry_point(tmp_path: Path) -> None:
    from cdfsl.classifier import FewShotClassifier

    root = make_imagefolder(tmp_path / "data", classes=("cat", "Cat"), per_class=2)
    run = invoke([*run_args(root, tmp_path / "r.sqlite", tmp_path / "cache")])
    assert_one_line_error(run, "share a prompt name", "'Cat' and 'cat'")
    assert not (tmp_path / "r.sqlite").exists()
    fit = invoke(["fit", "--data", str(root), "--method", "zeroshot", *TINY, "--out", str(tmp_path / "model")])
    assert_one_line_error(fit, "share a prompt name")
    check = invoke(["datasets", "check", "--dataset", "imagefolder", "--data-root", str(root)])
    assert_one_line_error(check, "share a prompt name")

    classifier = FewShotClassifier("zeroshot", backbone="tiny", pretrained="none", device="cpu")
    paths = sorted(root.rglob("*.png"))
    with pytest.raises(DatasetError, match="share a prompt name"):
        classifier.fit(paths, [p.parent.name for p in paths])
    distinct = make_imagefolder(tmp_path / "distinct", classes=("a", "b"), per_class=1)
    with pytest.raises(DatasetError, match="'a' \\(prompt 'Dog'\\) and 'b' \\(prompt 'dog'\\)"):
        classifier.fit(distinct, class_names={"a": "Dog", "b": "dog"})


def test_the_comparison_is_the_tokenizers() -> None:
    """Names read alike exactly when open_clip's BPE tokenizer gives them the same token ids."""
    import itertools

    from open_clip.tokenizer import SimpleTokenizer

    from cdfsl.data.classnames import tokenizer_words

    tokenizer = SimpleTokenizer()
    names = [
        "cat", "Cat", " CAT ", "cats", CAFE_NFC, CAFE_NFD, "cafe", "blue-square", "blue - square", "blue square",
        "a &amp; b", "a & b", "a&b", "x-ray", "X Ray", "ﬁsh", "fish", "R2D2", "r2 d2", "it's", "it 's", "über", "Über",
    ]  # fmt: skip
    for first, second in itertools.combinations(names, 2):
        same_tokens = tokenizer.encode(first) == tokenizer.encode(second)
        assert (tokenizer_words(first) == tokenizer_words(second)) == same_tokens, (first, second)


# 15b. EXIF orientation -------------------------------------------------------------------------------------------

OLD_TAG = "bilinear-aa.chestx256.wide8"  # the decode rule before EXIF orientation was applied


def sideways_photo(path: Path) -> Path:
    """A 40x20 JPEG (left half red, right half blue) whose EXIF says: turn it 90° clockwise to view it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=1)
    sideways_photo(root / "a" / "photo.jpg")
    index = load_quietly("imagefolder", root)
    image = index.open(index.items.index("a/photo.jpg"))
    assert image.size == (20, 40)  # upright: portrait
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # red on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60  # blue below
    cached = ImageCache(index, 16).get([index.items.index("a/photo.jpg")])[0].permute(1, 2, 0).numpy().astype(int)
    assert cached[2, 8, 0] > 200 and cached[13, 8, 2] > 200


def test_decodes_cached_before_exif_orientation_are_not_reused(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=1)
    sideways_photo(root / "a" / "photo.jpg")
    index = load_quietly("imagefolder", root)
    position = index.items.index("a/photo.jpg")
    assert cache_folder(tmp_path, index, 16).name != f"16-{OLD_TAG}"
    stale = tmp_path / "imagefolder" / f"16-{OLD_TAG}" / f"{index.item_digest(position)}.npy"
    stale.parent.mkdir(parents=True)
    np.save(stale, np.zeros((16, 16, 3), dtype=np.uint8))  # what an older version left: never read back
    decoded = ImageCache(index, 16, tmp_path).get([position])
    assert decoded.float().mean() > 50


# 17. datasets check --deep fails for scripts ---------------------------------------------------------------------


def test_deep_check_exits_1_with_the_count_when_images_fail(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=3)
    for key in ("a/img_001.png", "b/img_002.png"):  # header and IEND kept: only decoding finds the damage
        data = (root / key).read_bytes()
        (root / key).write_bytes(data[: len(data) // 2] + data[-12:])
    result = invoke(["datasets", "check", "--dataset", "imagefolder", "--data-root", str(root), "--deep"])
    assert result.exit_code == 1, result.output
    assert "2 of 6 images failed to decode" in result.stdout
    assert "Traceback" not in result.output

    shallow = invoke(["datasets", "check", "--dataset", "imagefolder", "--data-root", str(root)])
    assert shallow.exit_code == 0, shallow.output  # without --deep the damage is not looked for
    clean = make_imagefolder(tmp_path / "clean", classes=("a", "b"), per_class=3)
    ok = invoke(["datasets", "check", "--dataset", "imagefolder", "--data-root", str(clean), "--deep"])
    assert ok.exit_code == 0 and "all 6 images decode" in ok.stdout, ok.output


# 27.4. one naming rule for folder classes ------------------------------------------------------------------------


def test_folder_names_become_prompts_by_one_rule(tmp_path: Path) -> None:
    folders = ("blue_square", "red__ circle_", "plain")
    index = load_quietly("imagefolder", make_imagefolder(tmp_path / "data", classes=folders, per_class=1))
    assert dict(zip(index.class_keys, index.class_names, strict=True)) == {
        "blue_square": "blue square",
        "red__ circle_": "red circle",
        "plain": "plain",
    }
    named = make_imagefolder(tmp_path / "named", classes=("a_b", "c_d"), per_class=1, classnames={"a_b": "a_b  x"})
    assert load_quietly("imagefolder", named).class_names == ("a_b  x", "c d")  # classnames.json is taken as written


def test_separators_alone_do_not_make_two_classes(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("ice_cream", "ice__cream", "tea"), per_class=1)
    with pytest.raises(DatasetError, match="'ice__cream' \\(prompt 'ice cream'\\) and 'ice_cream'"):
        load_index("imagefolder", root)


def test_folder_fit_and_paths_fit_prompt_alike(tmp_path: Path) -> None:
    from cdfsl.classifier import FewShotClassifier

    root = make_imagefolder(tmp_path / "data", classes=("blue_square", "red_circle"), per_class=1)
    settings = {"device": "cpu"}
    by_folder = FewShotClassifier("zeroshot", backbone="tiny", pretrained="none", settings=settings).fit(root)
    paths = sorted(root.rglob("*.png"))
    by_paths = FewShotClassifier("zeroshot", backbone="tiny", pretrained="none", settings=settings).fit(
        paths, [p.parent.name for p in paths]
    )
    assert by_folder.class_names_ == by_paths.class_names_ == ["blue square", "red circle"]
    assert np.array_equal(by_folder.predict_proba(paths), by_paths.predict_proba(paths))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [('{"cat": {"name": "cat"}, "dog": "dog"}', "non-empty strings"), ("[" * 100_000 + "]" * 100_000, "deeper")],
    ids=["nested-object", "nested-too-deeply"],
)
def test_a_nested_classnames_json_is_one_line(tmp_path: Path, content: str, fragment: str) -> None:
    make_imagefolder(tmp_path / "data", ("cat", "dog"), per_class=3)
    (tmp_path / "data" / "classnames.json").write_text(content)
    args = ["datasets", "check", "--dataset", "imagefolder", "--data-root", str(tmp_path / "data")]
    assert_one_line_error(invoke(args), "classnames.json", fragment)
