"""Backbone activation (GELU vs QuickGELU) and local checkpoints loaded through open_clip."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.factory import OPENAI_EXTRA_KEYS, load_backbone, resolve_activation, weights_identity
from cdfsl.backbone.tiny import CONFIG_PATH as TINY_CONFIG_PATH
from cdfsl.config import RunConfig
from cdfsl.engine.runner import Runner
from cdfsl.errors import BackboneError

TEXTS = ["a photo of a dog.", "a diagram"]


@dataclass(frozen=True)
class Reference:
    """A saved ViT-B-32 QuickGELU model and the features it gives."""

    state: dict[str, torch.Tensor]
    path: Path  # the state dict as safetensors, alone in its folder
    images: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor


@torch.no_grad()
def features(adapter: ClipAdapter, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return adapter.model.encode_image(images), adapter.model.encode_text(adapter.tokenize(TEXTS))


def activation_types(adapter: ClipAdapter) -> set[type]:
    blocks = list(adapter.model.visual.transformer.resblocks) + list(adapter.model.transformer.resblocks)
    return {type(block.mlp.gelu) for block in blocks}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    adapter = load_backbone("ViT-B-32-quickgelu", "none")
    assert activation_types(adapter) == {QuickGELU}
    state = {k: v.clone().contiguous() for k, v in adapter.model.state_dict().items()}
    path = tmp_path_factory.mktemp("plain") / "ViT-B-32.safetensors"
    save_file(state, str(path))
    images = torch.rand((2, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    image_features, text_features = features(adapter, images)
    return Reference(state, path, images, image_features, text_features)


def assert_same_features(adapter: ClipAdapter, ref: Reference) -> None:
    image_features, text_features = features(adapter, ref.images)
    torch.testing.assert_close(image_features, ref.image_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_features, ref.text_features, atol=1e-5, rtol=0)


def max_feature_diff(adapter: ClipAdapter, ref: Reference) -> float:
    image_features, text_features = features(adapter, ref.images)
    return max(
        (image_features - ref.image_features).abs().max().item(),
        (text_features - ref.text_features).abs().max().item(),
    )


def export_folder(tmp_path: Path, ref: Reference, quick_gelu: bool) -> Path:
    """open_clip's Hugging Face export layout: the weights with `open_clip_config.json` beside them."""
    path = tmp_path / "open_clip_model.safetensors"
    path.symlink_to(ref.path)  # as in the Hugging Face cache: the folder of the link decides, not the blob's
    model_cfg = open_clip.get_model_config("ViT-B-32")
    model_cfg["quick_gelu"] = quick_gelu
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    return path


# ------------------------------------------------------------------------------------------- checkpoints


def test_sibling_open_clip_config_decides(reference: Reference, tmp_path: Path) -> None:
    path = export_folder(tmp_path, reference, quick_gelu=True)
    assert resolve_activation("ViT-B-32", str(path)) == "quickgelu"
    loaded = load_backbone("ViT-B-32", str(path))
    assert activation_types(loaded) == {QuickGELU}
    assert_same_features(loaded, reference)


def test_sibling_config_saying_gelu(reference: Reference, tmp_path: Path) -> None:
    path = export_folder(tmp_path, reference, quick_gelu=False)
    assert resolve_activation("ViT-B-32", str(path)) == "gelu"


def test_unreadable_sibling_config(reference: Reference, tmp_path: Path) -> None:
    path = export_folder(tmp_path, reference, quick_gelu=True)
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(BackboneError, match=r"open_clip_config\.json"):
        resolve_activation("ViT-B-32", str(path))


def test_unknown_origin_is_refused(reference: Reference) -> None:
    with pytest.raises(BackboneError, match="quickgelu") as error:
        load_backbone("ViT-B-32", str(reference.path))
    message = str(error.value)
    assert str(reference.path) in message and "cannot be told" in message
    assert "ViT-B-16-quickgelu" in message and "activation=gelu" in message
    with pytest.raises(BackboneError, match="cannot be told"):
        resolve_activation("ViT-B-32", str(reference.path))


def test_explicit_quickgelu(reference: Reference) -> None:
    assert resolve_activation("ViT-B-32", str(reference.path), "quickgelu") == "quickgelu"
    loaded = load_backbone("ViT-B-32", str(reference.path), activation="quickgelu")
    assert activation_types(loaded) == {QuickGELU}
    assert_same_features(loaded, reference)


def test_explicit_gelu_drifts(reference: Reference) -> None:
    """The silent drift this guards against: QuickGELU weights run with GELU."""
    loaded = load_backbone("ViT-B-32", str(reference.path), activation="gelu")
    assert activation_types(loaded) == {torch.nn.GELU}
    assert max_feature_diff(loaded, reference) > 1e-3


def test_explicit_gelu_beats_a_quickgelu_name(reference: Reference) -> None:
    assert resolve_activation("ViT-B-32-quickgelu", str(reference.path), "gelu") == "gelu"
    loaded = load_backbone("ViT-B-32-quickgelu", str(reference.path), activation="gelu")
    assert activation_types(loaded) == {torch.nn.GELU}


def test_quickgelu_name(reference: Reference) -> None:
    assert resolve_activation("ViT-B-32-quickgelu", str(reference.path)) == "quickgelu"
    loaded = load_backbone("ViT-B-32-quickgelu", str(reference.path))
    assert activation_types(loaded) == {QuickGELU}
    assert_same_features(loaded, reference)


def test_openai_state_dict(reference: Reference, tmp_path: Path) -> None:
    """OpenAI's JIT state dict carries three extra scalar entries: they identify it and are dropped on loading."""
    state = dict(reference.state)
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    assert set(OPENAI_EXTRA_KEYS) <= state.keys()
    path = tmp_path / "ViT-B-32.pt"
    torch.save(state, path)
    assert resolve_activation("ViT-B-32", str(path)) == "quickgelu"
    loaded = load_backbone("ViT-B-32", str(path))
    assert activation_types(loaded) == {QuickGELU}
    assert_same_features(loaded, reference)
    safetensors_path = tmp_path / "ViT-B-32.safetensors"
    save_file(state, str(safetensors_path))
    assert resolve_activation("ViT-B-32", str(safetensors_path)) == "quickgelu"


def test_key_mismatch_is_refused(reference: Reference, tmp_path: Path) -> None:
    """open_clip loads non-strictly (to pass OpenAI's extra entries); any other mismatch is still an error."""
    state = {**reference.state, "surplus": torch.zeros(1)}
    state.pop("visual.proj")
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneError, match=r"cannot load checkpoint .*partial\.safetensors") as error:
        load_backbone("ViT-B-32-quickgelu", str(path))
    assert "missing keys: visual.proj" in str(error.value) and "unexpected keys: surplus" in str(error.value)


class CreatesAFile:
    """Unpickling this calls `open(marker, "w")`: a stand-in for arbitrary code in a pickled checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("activation", ["auto", "quickgelu"])
def test_pickled_object_is_refused(tmp_path: Path, activation: str) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": CreatesAFile(marker)}, path)
    with pytest.raises(BackboneError, match=r"cannot load checkpoint .*evil\.pt"):
        load_backbone("ViT-B-32", str(path), activation=activation)
    assert not marker.exists()


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("name", ["ViT-B-32", "tiny"])
@pytest.mark.parametrize("filename", ["ViT-B-32.pt", "model.bin"])
def test_torchscript_archive_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, filename: str
) -> None:
    path = tmp_path / filename
    torch.jit.save(torch.jit.script(Doubler()), str(path))

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive was opened with a loader")

    for module, attribute in ((torch, "load"), (torch.jit, "load"), (open_clip, "load_checkpoint")):
        monkeypatch.setattr(module, attribute, must_not_run)
    for activation in ("auto", "quickgelu"):
        with pytest.raises(BackboneError, match="TorchScript") as error:
            load_backbone(name, str(path), activation=activation)
        assert str(path) in str(error.value) and "safetensors" in str(error.value)
    with pytest.raises(BackboneError, match="TorchScript"):
        resolve_activation(name, str(path), "gelu")


# ------------------------------------------------------------------------------------------- resolve_activation


def test_resolve_tiny_follows_its_config() -> None:
    config = json.loads(TINY_CONFIG_PATH.read_text())
    expected = "quickgelu" if config.get("quick_gelu", False) else "gelu"
    assert resolve_activation("tiny", "openai") == expected
    assert resolve_activation("tiny", "none") == expected


@pytest.mark.parametrize(
    ("name", "pretrained", "expected"),
    [
        ("ViT-B-16", "none", "gelu"),
        ("ViT-B-16", "", "gelu"),
        ("ViT-B-16", "openai", "quickgelu"),  # open_clip's pretrained config for the tag; nothing is downloaded
        ("ViT-B-32", "laion2b_s34b_b79k", "gelu"),  # the tag says nothing: the model config
        ("ViT-B-16-quickgelu", "none", "quickgelu"),
        ("ViT-B-32-quickgelu", "openai", "quickgelu"),
    ],
)
def test_resolve_auto(name: str, pretrained: str, expected: str) -> None:
    assert resolve_activation(name, pretrained) == expected


@pytest.mark.parametrize("explicit", ["gelu", "quickgelu"])
@pytest.mark.parametrize(("name", "pretrained"), [("tiny", "openai"), ("ViT-B-16", "openai"), ("ViT-B-16", "none")])
def test_resolve_explicit(name: str, pretrained: str, explicit: str) -> None:
    assert resolve_activation(name, pretrained, explicit) == explicit


@pytest.mark.parametrize("bad", ["GELU", "relu", "", "quick_gelu"])
def test_resolve_bad_activation(bad: str) -> None:
    with pytest.raises(BackboneError, match="unknown activation"):
        resolve_activation("ViT-B-16", "none", bad)
    with pytest.raises(BackboneError, match="unknown activation"):
        load_backbone("tiny", "none", activation=bad)


def test_resolve_checks_name_and_tag() -> None:
    with pytest.raises(BackboneError, match="unknown backbone 'ViT-Q-99'"):
        resolve_activation("ViT-Q-99", "none")
    with pytest.raises(BackboneError, match="no pretrained tag 'nosuchtag'"):
        resolve_activation("ViT-B-32", "nosuchtag", "gelu")
    with pytest.raises(BackboneError, match="not found"):
        resolve_activation("ViT-B-32", "weights/missing.safetensors")


# ------------------------------------------------------------------------------------------- tiny


def test_tiny_shipped_weights() -> None:
    shipped = load_backbone("tiny", "openai")
    random = load_backbone("tiny", "none")
    assert not torch.equal(shipped.model.visual.proj, random.model.visual.proj)


def test_tiny_checkpoint_file(tmp_path: Path) -> None:
    shipped = load_backbone("tiny", "openai")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.clone().contiguous() for k, v in shipped.model.state_dict().items()}, str(path))
    loaded = load_backbone("tiny", str(path))
    images = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    for left, right in zip(features(loaded, images), features(shipped, images), strict=True):
        assert torch.equal(left, right)


def save_tiny(adapter: ClipAdapter, path: Path) -> Path:
    save_file({k: v.clone().contiguous() for k, v in adapter.model.state_dict().items()}, str(path))
    return path


def test_checkpoint_identity_is_its_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's identity is its bytes: the same file under another path reuses the stored run; a file rebuilt
    at the same path is a new run (and a freshly loaded model, even in the same runner)."""
    monkeypatch.setenv("CDFSL_CACHE_DIR", str(tmp_path / "cache"))
    shipped, random = load_backbone("tiny", "openai"), load_backbone("tiny", "none")
    first = save_tiny(shipped, tmp_path / "a.safetensors")
    copy = tmp_path / "copy" / "b.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    assert weights_identity(str(first)) == weights_identity(str(copy))
    assert weights_identity(str(first)).startswith("sha256:")
    assert weights_identity("openai") == "openai" and weights_identity("none") == "none"

    def run(pretrained: Path) -> tuple[int, float]:
        config = RunConfig(
            dataset="digits", method="zeroshot", backbone="tiny", pretrained=str(pretrained), shots=1, episodes=2,
            device="cpu", db=str(tmp_path / "results.sqlite"),
        )  # fmt: skip
        result = runner.run(config)
        return result.trained_episodes, result.mean_acc

    runner = Runner()
    trained, accuracy = run(first)
    assert trained == 2
    assert run(copy) == (0, accuracy)  # same bytes, other path: served from the store
    save_tiny(random, first)  # rebuilt in place
    retrained, other_accuracy = run(first)
    assert retrained == 2 and other_accuracy != accuracy


def test_tiny_explicit_activation() -> None:
    """An explicit activation on the tiny model: the same weights with the chosen activation."""
    default = load_backbone("tiny", "openai")
    other = "gelu" if resolve_activation("tiny", "openai") == "quickgelu" else "quickgelu"
    switched = load_backbone("tiny", "openai", activation=other)
    assert activation_types(switched) == {QuickGELU if other == "quickgelu" else torch.nn.GELU}
    assert activation_types(default) != activation_types(switched)
    for key, value in default.model.state_dict().items():
        assert torch.equal(value, switched.model.state_dict()[key]), key


# ------------------------------------------------------------------------------------ pretrained tags offline


@pytest.fixture
def no_model_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("open_clip.create_model ran although the download check should have answered")

    monkeypatch.setattr(open_clip, "create_model", refuse)


def test_unreachable_and_uncached_fails_at_once_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, no_model_build: None
) -> None:
    import huggingface_hub

    from cdfsl.backbone import downloads

    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: asked.append((repo, name)))
    monkeypatch.setattr(downloads, "reachable", lambda host, timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(BackboneError, match=r"huggingface\.co cannot be reached.*HF_HUB_OFFLINE=1.*--pretrained PATH"):
        load_backbone("ViT-B-32", "openai")
    assert asked == [("timm/vit_base_patch32_clip_224.openai", f) for f in downloads.WEIGHT_FILES]


def test_hf_hub_offline_is_answered_without_a_probe(monkeypatch: pytest.MonkeyPatch, no_model_build: None) -> None:
    import huggingface_hub

    from cdfsl.backbone import downloads

    def no_probe(host: str, timeout: float = 3.0) -> bool:
        raise AssertionError("probed the network with HF_HUB_OFFLINE set")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(downloads, "reachable", no_probe)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE is set"):
        load_backbone("ViT-B-16", "laion2b_s34b_b88k")


@pytest.mark.parametrize("cached", [True, False])
def test_cached_or_reachable_weights_go_to_open_clip(monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    """Cached weights load without a probe; uncached ones are left to open_clip when their host answers."""
    import huggingface_hub

    from cdfsl.backbone import downloads

    built: list[str] = []

    def create_model(name: str, pretrained: str | None = None, **_: object) -> None:
        built.append(f"{name}:{pretrained}")
        raise RuntimeError("stop here")  # the check passed; loading itself is open_clip's

    monkeypatch.setattr(open_clip, "create_model", create_model)
    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo, name: "/cache/w.safetensors" if cached else None
    )
    monkeypatch.setattr(downloads, "reachable", lambda host, timeout=3.0: not cached)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(BackboneError, match="could not load ViT-B-32 weights 'openai'"):
        load_backbone("ViT-B-32", "openai")
    assert built == ["ViT-B-32:openai"]
