"""TIR and VtT on the bases whose text side learns (coop, coop+lora, maple): the absorption through the base's own
prompt against the frozen template where they coincide, where L_VtT's gradient goes, DGSO over every trained tensor,
and TIR leaving MaPLe's prompt tokens alone. (Every combination's fit, predict, E-at-once and resume checks run in
test_methods_registry.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.config import RunConfig, TirConfig
from cdfsl.methods import build_method
from cdfsl.methods.maple.method import EpisodePrompts, MapleMethod
from cdfsl.methods.text_side import TemplateAbsorber
from cdfsl.methods.tir.recalibration import TokenRecalibration
from cdfsl.methods.vtt.extension import VttExtension
from cdfsl.seeding import torch_stream
from digits_world import DigitsWorld, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"shots": 1, "queries": 2, "augment__views": ("plain", "flip")}


@pytest.fixture(scope="module")
def world(tiny: ClipAdapter) -> DigitsWorld:
    return DigitsWorld.of(tiny)


def config_of(method: str, **changes: object) -> RunConfig:
    return tiny_config(method, **{**SMALL, "lora__dropout": 0.0, **changes}).resolved()


def tokens(backbone: ClipAdapter, e: int = 2, b: int = 3) -> torch.Tensor:
    return torch.randn((e, b, backbone.text_width), generator=torch.Generator().manual_seed(7)) * 0.02


@torch.no_grad()
@pytest.mark.parametrize("method", ["coop+vtt", "coop+lora+vtt"])
def test_untrained_learned_absorption_is_the_template_absorption(world: DigitsWorld, method: str) -> None:
    """Context = "a photo of a" (its own embeddings), text LoRA B = 0: "{context} X." is "a photo of a X."."""
    backbone = world.backbone
    config = config_of(method, lora__towers="both" if method == "coop+lora+vtt" else "none")
    lora_method = build_method(config, backbone)
    lora_method.text_side.start(0, [0, 1])
    lora_method.text_side.train(False)
    learned = lora_method.text_side.absorber("X")
    frozen = TemplateAbsorber(backbone, "a photo of a {}.", "X")
    torch.testing.assert_close(learned(tokens(backbone)), frozen(tokens(backbone)), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_maple_absorption_at_depth_one_is_the_template_absorption(world: DigitsWorld) -> None:
    """At depth 1 MaPLe's only prompt is the context, initialised from the embeddings of "a photo": untrained, its
    absorption is the frozen "a photo of a X."."""
    backbone = world.backbone
    method = build_method(config_of("maple+vtt", maple__depth=1), backbone)
    assert isinstance(method, MapleMethod)
    generators = [torch_stream(0, i, "maple_init") for i in (0, 1)]
    prompts = EpisodePrompts(method.context_init, 1, backbone.vision_width, generators)
    absorbed = method._absorber(prompts)(tokens(backbone))
    expected = TemplateAbsorber(backbone, "a photo of a {}.", "X")(tokens(backbone))
    torch.testing.assert_close(absorbed, expected, atol=1e-5, rtol=1e-5)


def test_vtt_on_coop_reaches_the_context_through_the_absorption_only(world: DigitsWorld) -> None:
    """coop's vision tower is frozen: L_VtT moves the context through the absorbed prompt, not through the class
    texts in the fused sequence (taken as inputs)."""
    backbone = world.backbone
    config = config_of("coop+vtt")
    method = build_method(config, backbone)
    batch = world.batch(config, [0])
    method.start(batch)
    method.extension.start(batch, method.trained_tensors(), method.absorber())
    _, _, class_layers = method._texts(batch.class_names)
    class_layers = class_layers.detach().requires_grad_()
    images, labels = batch.support[:, :4], batch.support_labels[:, :4]
    output = backbone.encode_images(images, layer_features=True)
    loss = method.extension.vtt_loss(output, labels, class_layers)
    loss.sum().backward()
    context = method.text_side.context
    assert context is not None and context.grad is not None and context.grad.abs().sum() > 0
    assert class_layers.grad is None
    assert [p for _, p in method.extension.tensors] == [1]  # DGSO sees the context, as one parameter


def test_dgso_corrects_every_maple_tensor(world: DigitsWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """maple+vtt: the context, compound prompts and coupling maps are DGSO's tensors, one cosine per release
    parameter; a conflicting L_VtT (beta 50) changes some of their gradients from the raw combined gradient."""
    backbone = world.backbone
    config = config_of("maple+vtt", vtt__beta=50.0, maple__epochs=1)
    method = build_method(config, backbone)
    batch = world.batch(config, [0])
    seen: dict[str, object] = {}
    original = VttExtension.backward

    def spy(self, loss_ce, output, labels, class_layers):  # type: ignore[no-untyped-def]
        tensors = [t for t, _ in self.tensors]
        combined = loss_ce + 50.0 * self.vtt_loss(output, labels, class_layers)
        seen["raw"] = torch.autograd.grad(combined.sum(), tensors, retain_graph=True)
        for tensor in tensors:
            tensor.grad = None
        original(self, loss_ce, output, labels, class_layers)
        seen["corrected"] = [t.grad.clone() for t in tensors]
        seen["counts"] = [p for _, p in self.tensors]
        raise StopIteration  # one step is enough

    monkeypatch.setattr(VttExtension, "backward", spy)
    with pytest.raises(StopIteration):
        method.fit(batch)
    depth = config.maple.depth
    assert seen["counts"] == [1, depth - 1, depth, depth]
    changed = [not torch.allclose(r, c) for r, c in zip(seen["raw"], seen["corrected"], strict=True)]  # type: ignore[arg-type]
    assert any(changed)


@torch.no_grad()
def test_tir_reweights_patches_and_leaves_prompt_tokens(tiny: ClipAdapter) -> None:
    """Tokens `[E, B, 1 + M + P, D]`: the CLS and the P prompt tokens pass unchanged, the patches get exactly the
    weights they get without prompts."""
    tir = TokenRecalibration(TirConfig(), tiny)
    generator = torch.Generator().manual_seed(3)
    m, p = tiny.num_patches, 2
    x = torch.randn((1, 2, 1 + m + p, tiny.vision_width), generator=generator)
    text = F.normalize(torch.randn((1, 5, tiny.embed_dim), generator=generator), dim=-1)
    hook = tir.hook(text)
    block = tir.blocks[0]
    with_prompts = hook(block, x)
    without = hook(block, x[:, :, : 1 + m])
    torch.testing.assert_close(with_prompts[:, :, : 1 + m], without)
    torch.testing.assert_close(with_prompts[:, :, 1 + m :], x[:, :, 1 + m :])
    assert not torch.equal(without, x[:, :, : 1 + m])  # the rule did reweight some patches


class LayerFeatureSpy:
    """A training extension that trains nothing and records whether each step's vision output had per-layer
    features (the shared loop asks the base for them only when the extension `wants_layer_features`)."""

    role = "extension"
    cost_part = "spy"
    text_layers = (0,)

    def __init__(self, wants: bool) -> None:
        self.wants_layer_features = wants
        self.seen: list[bool] = []
        self.episodes = 0

    def start(self, batch, tensors, absorb):  # type: ignore[no-untyped-def]
        self.episodes = len(batch)
        return [{"params": []}]

    def backward(self, loss_ce, output, labels, class_layers):  # type: ignore[no-untyped-def]
        self.seen.append(output.layer_features is not None)
        loss_ce.sum().backward()
        return loss_ce

    def finish(self):  # type: ignore[no-untyped-def]
        return [{"spy_steps": len(self.seen)} for _ in range(self.episodes)]

    def step_values(self):  # type: ignore[no-untyped-def]
        return {}

    def trained_modules(self):  # type: ignore[no-untyped-def]
        return []


@pytest.mark.parametrize("base", ["lora", "maple"])
@pytest.mark.parametrize("wants", [False, True])
def test_every_base_honours_wants_layer_features(world: DigitsWorld, base: str, wants: bool) -> None:
    """One loop for every base: per-layer features are computed exactly when the extension wants them (MaPLe's own
    loop computed them for any extension), and the extension's records join the base's."""
    config = config_of(base, maple__epochs=1, train__iterations=2)
    spy = LayerFeatureSpy(wants)
    cls = MapleMethod if base == "maple" else type(build_method(config, world.backbone))
    method = cls(world.backbone, config, extension=spy)
    method.fit(world.batch(config, [0]))
    assert spy.seen and set(spy.seen) == {wants}
    assert method.episode_records()[0]["spy_steps"] == len(spy.seen)


@pytest.mark.parametrize("method", ["lora+tir+vtt", "maple+tir", "coop+vtt"])
def test_plug_ins_are_attached_at_construction(world: DigitsWorld, method: str) -> None:
    built = build_method(config_of(method), world.backbone)
    spec = config_of(method).spec
    assert isinstance(built.recalibration, TokenRecalibration) == spec.uses("tir")
    assert isinstance(built.extension, VttExtension) == spec.uses("vtt")


def test_export_refusals_come_from_the_base_and_its_plug_ins(world: DigitsWorld) -> None:
    backbone = world.backbone
    assert build_method(config_of("lora"), backbone).export_refusal() is None
    assert build_method(config_of("lora+tir", tir__at_prediction=False), backbone).export_refusal() is None
    assert "tir.at_prediction=false" in (build_method(config_of("lora+tir"), backbone).export_refusal() or "")
    assert "MaPLe's prompts" in (build_method(config_of("maple"), backbone).export_refusal() or "")
    assert "TIR reweights" in (build_method(config_of("maple+tir"), backbone).export_refusal() or "")
