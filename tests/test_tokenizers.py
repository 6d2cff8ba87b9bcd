"""Tokenizers: open_clip's BPE or a local Hugging Face tokenizer (`--tokenizer DIR`, SigLIP2's kind), word positions
found for any tokenizer, the run identity of a tokenizer folder, the offline hub error, and the image normalization
of checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
from typer.testing import CliRunner

from cdfsl.backbone.factory import image_normalization, load_backbone
from cdfsl.backbone.tokenizers import load_tokenizer, tokenizer_identity
from cdfsl.cli import app
from cdfsl.data.readers import DIGIT_NAMES
from cdfsl.errors import BackboneError

pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "X", ".", "satellite", *DIGIT_NAMES]


def write_tokenizer(folder: Path, start_token: bool) -> Path:
    """A word-level Hugging Face tokenizer: `[BOS]` (if `start_token`) words `[EOS]`, padded with `[PAD]`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocabulary = {token: i for i, token in enumerate(specials + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "[BOS] $A [EOS]" if start_token else "$A [EOS]"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("[BOS]", vocabulary["[BOS]"]), ("[EOS]", vocabulary["[EOS]"])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )
    wrapped.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("start_token", [False, True])
def test_word_positions_hold_for_a_hugging_face_tokenizer(tmp_path: Path, start_token: bool) -> None:
    folder = write_tokenizer(tmp_path / "tok", start_token)
    backbone = load_backbone("small-siglip2", "none", tokenizer=str(folder))
    tokens = backbone.tokenize(["a photo of a X ."])
    assert tokens.shape == (1, 32)
    assert backbone.text_start == int(start_token)
    assert backbone.content_length("a photo of a") == 4 and backbone.content_length("") == 0
    full, position = backbone.placeholder_position("a photo of a {} .", "X")
    assert position == int(start_token) + 4 and int(full[0, position]) == int(backbone.content_tokens("X")[0])


def test_word_positions_of_the_bpe_tokenizer() -> None:
    backbone = load_backbone("small-pe-core", "none")
    assert backbone.text_start == 1 and backbone.content_length("a photo of a") == 4
    assert backbone.placeholder_position("a photo of a {}.", "X")[1] == 5


def test_a_run_with_a_local_tokenizer(tmp_path: Path) -> None:
    folder = write_tokenizer(tmp_path / "tok", start_token=False)
    db = tmp_path / "r.sqlite"
    args = [
        "run", "--dataset", "digits", "--method", "tir+vtt", "--backbone", "small-siglip2", "--pretrained", "none",
        "--device", "cpu", "--episodes", "1", "--queries", "2", "--tokenizer", str(folder), "--db", str(db),
        "--set", "train.iterations=2", "--set", "train.template=a photo of a {} .", "--json", str(tmp_path / "s.json"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["config"]["tokenizer"] == str(folder)
    first_id = summary["run_id"]
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text() + " ")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads((tmp_path / "s.json").read_text())["run_id"] != first_id


def test_a_tokenizer_folder_is_identified_by_its_content(tmp_path: Path) -> None:
    first = write_tokenizer(tmp_path / "a", start_token=False)
    copied = write_tokenizer(tmp_path / "b", start_token=False)
    other = write_tokenizer(tmp_path / "c", start_token=True)
    assert tokenizer_identity(str(first)) == tokenizer_identity(str(copied)) != tokenizer_identity(str(other))
    assert tokenizer_identity(None) is None


def test_bad_tokenizers_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="not a folder holding a Hugging Face tokenizer"):
        load_backbone("small-siglip2", "none", tokenizer=str(tmp_path / "empty"))
    folder = write_tokenizer(tmp_path / "tok", start_token=False)
    with pytest.raises(BackboneError, match="text tower knows 3"):
        load_tokenizer("small-siglip2", {"context_length": 8, "vocab_size": 3}, str(folder))
    result = CliRunner().invoke(
        app, ["run", "--dataset", "digits", "--method", "lora", "--backbone", "tiny", "--tokenizer", "/nowhere"]
    )
    assert result.exit_code == 2 and "--tokenizer /nowhere" in result.output
    empty = CliRunner().invoke(app, ["run", "--dataset", "digits", "--method", "lora", "--set", "tokenizer= "])
    assert empty.exit_code == 2 and "tokenizer must be a folder path" in empty.output
    with pytest.raises(BackboneError, match="not a folder holding"):
        tokenizer_identity(str(tmp_path))  # never a digest of an arbitrary folder's tree


def test_a_hub_tokenizer_offline_fails_at_once_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    started = time.perf_counter()
    result = CliRunner().invoke(
        app, ["run", "--dataset", "digits", "--method", "zeroshot", "--backbone", "ViT-B-16-SigLIP2", "--pretrained",
              "none", "--device", "cpu", "--episodes", "1"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "timm/ViT-B-16-SigLIP2" in result.output and "--tokenizer" in result.output
    assert time.perf_counter() - started < 10  # refused before the model is built, without the hub's retries


def test_checkpoints_are_normalized_as_their_family_was_trained(tmp_path: Path) -> None:
    model = SimpleNamespace(visual=SimpleNamespace(preprocess_cfg={"mean": open_clip.OPENAI_DATASET_MEAN,
                                                                   "std": open_clip.OPENAI_DATASET_STD}))  # fmt: skip
    checkpoint = tmp_path / "weights.safetensors"
    half = (0.5, 0.5, 0.5)
    assert image_normalization("PE-Core-B-16", checkpoint, model) == (half, half)
    assert image_normalization("ViT-B-16-SigLIP2", checkpoint, model) == (half, half)
    assert image_normalization("ViT-B-16", checkpoint, model)[0] == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert image_normalization("PE-Core-B-16", None, model)[0] == tuple(open_clip.OPENAI_DATASET_MEAN)  # as built
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {}, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}})
    )
    assert image_normalization("PE-Core-B-16", checkpoint, model) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))


def test_a_saved_classifier_carries_its_tokenizer(tmp_path: Path) -> None:
    """Fitted with `--tokenizer DIR`, saved, the original folder deleted: the saved folder still loads and predicts the
    same, from its own copy; an edited copy is refused."""
    import shutil

    import numpy as np
    from PIL import Image

    from cdfsl.classifier import FewShotClassifier
    from cdfsl.errors import ConfigError

    folder = write_tokenizer(tmp_path / "tok", start_token=True)
    images = tmp_path / "images"
    generator = np.random.default_rng(0)
    for name in ("one", "two"):
        (images / name).mkdir(parents=True)
        for k in range(2):
            pixels = generator.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / name / f"{k}.png")
    settings = {"train.iterations": 2, "train.template": "a photo of a {} .", "tokenizer": str(folder)}
    classifier = FewShotClassifier("lora", "small-siglip2", "none", device="cpu", settings=settings).fit(images)
    paths = sorted(images.rglob("*.png"))
    expected = classifier.predict_proba(paths)
    classifier.save(tmp_path / "model")
    shutil.rmtree(folder)
    loaded = FewShotClassifier.load(tmp_path / "model", device="cpu")
    np.testing.assert_allclose(loaded.predict_proba(paths), expected, rtol=1e-4, atol=1e-6)
    config = tmp_path / "model" / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(ConfigError, match="tokenizer/ folder was changed"):
        FewShotClassifier.load(tmp_path / "model", device="cpu")


def test_a_tokenizer_that_cannot_tell_words_apart_is_refused() -> None:
    import torch

    from cdfsl.backbone.adapter import ClipAdapter

    real = load_backbone("small-clip", "none")
    blind = ClipAdapter(
        real.model, lambda texts: torch.zeros(len(texts), 32, dtype=torch.long), (0.5,) * 3, (0.5,) * 3, "x"
    )
    with pytest.raises(BackboneError, match="same tokens for '' and 'a'"):
        blind.placeholder_position("a photo of a {}.", "X")


def test_a_tokenizer_rebuilt_at_the_same_path_is_loaded_afresh(tmp_path: Path) -> None:
    import shutil

    import torch

    from cdfsl.config import RunConfig
    from cdfsl.engine.context import LoadCache

    folder = write_tokenizer(tmp_path / "tok", start_token=False)
    config = RunConfig(
        dataset="digits", method="lora", backbone="small-siglip2", pretrained="none", tokenizer=str(folder)
    )
    loads = LoadCache()
    assert loads.backbone(config, torch.device("cpu")).text_start == 0
    shutil.rmtree(folder)
    write_tokenizer(folder, start_token=True)
    assert loads.backbone(config, torch.device("cpu")).text_start == 1
