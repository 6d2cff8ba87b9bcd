"""A base and a plug-in defined and registered here, in the test, run through everything a built-in part runs
through — fit and predict, a stored run (its records, its identity, resume), the report (Python and `cdfsl report`),
the cost of a training step, and a classifier's save, load and export — with no edit to cdfsl.

`toybase` learns a per-episode offset `[E, K, C]` added to the frozen template's class texts (AdamW at `toy.lr`, its
one knob) and records the offset's norm per episode. `toyplug` is a training extension adding `toyplug.weight` times
the squared norm of the base's trained tensors to the loss, and records the last step's penalty per episode.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

import cdfsl
from cdfsl.analysis.cost import training_cost
from cdfsl.analysis.report import build_report
from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.backbone.towers import BlockInputHook
from cdfsl.classifier import FewShotClassifier
from cdfsl.cli import app
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.engine.store import ResultStore
from cdfsl.errors import ConfigError
from cdfsl.methods import build_method
from cdfsl.methods.base import Observer, check_state_fits, observed
from cdfsl.methods.plugins import Absorb, FlopCounter, Remedies, TrainedTensor
from cdfsl.methods.text_side import ClassText, TemplateAbsorber
from cdfsl.methods.training import StepPlan, TrainedBase
from cdfsl.methods.training_settings import augment_reads, loop_reads
from cdfsl.registry import Base, MethodSpec, PlugIn, Record, Section, registered, trained_base_only
from cdfsl.rules import number
from digits_world import DigitsWorld, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = __name__  # the builders below are `module:Class` strings, as a third party's would be


# ------------------------------------------------------------------------------------------------- the toy base
@dataclasses.dataclass
class ToyConfig:
    lr: float = 0.1  # AdamW's rate for the class-text offsets


class ToyBase(TrainedBase):
    """A learned offset `[E, K, C]` on the frozen template's class texts; the vision tower stays frozen."""

    name = "toybase"
    state_parts: ClassVar[dict[str, str]] = {"toy_offset": "toy_offset"}
    part_labels: ClassVar[dict[str, str]] = {"toy_offset": "toy class-text offsets"}

    def __init__(self, backbone: ClipAdapter, config: RunConfig, autocast_dtype: Any = None, **plug_ins: Any) -> None:
        super().__init__(backbone, config, autocast_dtype, **plug_ins)
        self.offset: Tensor | None = None  # [E, K, C] of the fitted episodes
        self._training: nn.Parameter | None = None
        self._text: dict[int | None, ClassText] = {}

    def _frozen(self, class_names: Sequence[Sequence[str]], layer: int | None) -> Tensor:
        """The frozen template's class texts: normalized final `[E, K, C]`, raw after text block `layer`."""
        if layer not in self._text:
            self._text[layer] = ClassText(self.backbone, self.config.train.template, layer, normalize=layer is None)
        return self._text[layer](class_names)

    def start(self, batch: EpisodeBatch) -> None:
        ways = len(batch.class_names[0])
        self._training = nn.Parameter(
            torch.zeros(len(batch), ways, self.backbone.embed_dim, device=batch.support.device)
        )

    def trained_tensors(self) -> list[TrainedTensor]:
        assert self._training is not None
        return [(self._training, 1)]

    def absorber(self) -> Absorb:
        return TemplateAbsorber(self.backbone, self.config.train.template, "X")

    def optimizers(self, plugin_groups: list[dict[str, Any]]) -> list[torch.optim.Optimizer]:
        groups = [{"params": [self._training], "lr": self.config.section("toy").lr}, *plugin_groups]
        return [torch.optim.AdamW(groups, weight_decay=0.0)]

    def learning_rates(self) -> list[str]:
        return [f"toy.lr={self.config.section('toy').lr:g}"]

    def plan(self, views: int) -> StepPlan:
        assert self.config.train.iterations is not None
        return StepPlan(self.config.train.iterations, views)

    @classmethod
    def one_step(cls, config: RunConfig, batch: EpisodeBatch) -> tuple[EpisodeBatch, int]:
        return batch, batch.support.shape[1]

    def step_texts(self, class_names: Sequence[Sequence[str]], layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        assert self._training is not None
        final = F.normalize(self._frozen(class_names, None) + self._training, dim=-1)
        return final, [self._frozen(class_names, layer) for layer in layers]

    def step_encode(self, images: Tensor, hook: BlockInputHook | None, layer_features: bool) -> VisionOutput:
        return self.backbone.encode_images(images, block_input_hook=hook, layer_features=layer_features)

    def end(self) -> list[dict[str, Any]]:
        assert self._training is not None
        self.offset = self._training.detach()
        return [{"toy_offset_norm": round(float(norm), 6)} for norm in self.offset.flatten(1).norm(dim=1)]

    @torch.no_grad()
    def class_features(self, class_names: Sequence[Sequence[str]], layer: int | None = None) -> Tensor:
        if layer is not None:
            return F.normalize(self._frozen(class_names, layer), dim=-1)
        assert self.offset is not None, "fit first"
        return F.normalize(self._frozen(class_names, None) + self.offset, dim=-1)

    @torch.no_grad()
    def encode(
        self,
        images: Tensor,
        class_names: Sequence[Sequence[str]],
        observe: Observer | None = None,
        keep_cls_attention: bool = False,
    ) -> VisionOutput:
        self._refuse_after_failure()
        hook = observed(observe, self._prediction_hook(class_names))
        with self.autocast():
            return self.backbone.encode_images(images, block_input_hook=hook, keep_cls_attention=keep_cls_attention)

    def trained_state(self) -> dict[str, Tensor]:
        return {} if self.offset is None else {"toy_offset": self.offset}

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        shape = state["toy_offset"].shape if "toy_offset" in state else (1, self.config.ways, self.backbone.embed_dim)
        check_state_fits(state, {"toy_offset": torch.empty(shape)}, self.config.method)
        self.offset = state["toy_offset"].to(self.backbone.device)
        self._failure = None


class OpaqueToyBase(ToyBase):
    """The toy base, declared unexportable (as a method whose prediction plain open_clip cannot reproduce)."""

    def export_refusal(self) -> str | None:
        return "toyopaque keeps its offsets apart from the weights; use save() and load() instead"


def toy_reads(config: RunConfig, spec: MethodSpec) -> tuple[str, ...]:
    return (*loop_reads(config), *augment_reads(config), "toy.lr")


TOY_SECTION = Section("toy", ToyConfig, (number("toy.lr", 0, low_open=True),))
TOY_RECORD = Record("toy_offset_norm", float, summary="norm of the learned class-text offsets")
TOY_BASE = Base(
    "toybase", "a learned offset on the class texts", "class-text offsets", "this test", builder=f"{HERE}:ToyBase",
    learns_text=True, reads=toy_reads, records=(TOY_RECORD,),
)  # fmt: skip
OPAQUE_BASE = dataclasses.replace(TOY_BASE, name="toyopaque", builder=f"{HERE}:OpaqueToyBase")


# ---------------------------------------------------------------------------------------------- the toy plug-in
@dataclasses.dataclass
class ToyPlugConfig:
    weight: float = 0.5  # of the squared norm of the base's trained tensors


class ToyPenalty:
    """L_ce + weight · ‖trained tensors‖² per episode (a training extension with no modules of its own)."""

    role: ClassVar[str] = "extension"
    cost_part: ClassVar[str] = "toy_penalty"
    cost_label: ClassVar[str] = "toy penalty (no modules)"
    wants_layer_features = False
    text_layers: Sequence[int] = ()

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self._tensors: list[Tensor] = []
        self._penalty: Tensor | None = None

    @classmethod
    def build(cls, config: RunConfig, backbone: ClipAdapter, autocast_dtype: Any) -> ToyPenalty:
        return cls(config.section("toyplug").weight)

    def start(self, batch: EpisodeBatch, tensors: list[TrainedTensor], absorb: Absorb) -> list[dict[str, Any]]:
        self._tensors = [tensor for tensor, _ in tensors]
        return []

    def backward(self, loss_ce: Tensor, output: VisionOutput, labels: Tensor, class_layers: Tensor | None) -> Tensor:
        penalty = sum(t.flatten(1).pow(2).sum(dim=1) for t in self._tensors)  # [E]
        assert isinstance(penalty, Tensor)
        loss = loss_ce + self.weight * penalty
        loss.sum().backward()
        self._penalty = penalty.detach()
        return loss

    def finish(self) -> list[dict[str, Any]]:
        penalty, self._tensors, self._penalty = self._penalty, [], None
        return [] if penalty is None else [{"toyplug_penalty": round(float(p), 8)} for p in penalty]

    def step_values(self) -> dict[str, Tensor]:
        return {} if self._penalty is None else {"toy_penalty": self._penalty}

    def trained_modules(self) -> list[nn.Module]:
        return []

    def remedies(self) -> Remedies:
        return [], [f"a smaller toyplug.weight (now {self.weight:g})"]

    def piece_flops(self, batch: EpisodeBatch, batch_size: int, absorb: Absorb, counter: FlopCounter) -> dict[str, int]:
        return {}


TOYPLUG_SECTION = Section("toyplug", ToyPlugConfig, (number("toyplug.weight", 0),))
TOY_PLUGIN = PlugIn(
    "toyplug", "an L2 penalty on the base's trained tensors", "this test", "toyplug",
    trained_base_only("a penalty", "lora+toyplug"), builder=f"{HERE}:ToyPenalty",
    reads=lambda config, spec: ("toyplug.weight",), records=(Record("toyplug_penalty", float),),
)  # fmt: skip


@pytest.fixture(scope="module")
def toys() -> Iterator[None]:
    with registered(TOY_SECTION, TOYPLUG_SECTION, TOY_BASE, OPAQUE_BASE, TOY_PLUGIN):
        yield


@pytest.fixture(scope="module")
def world(tiny: ClipAdapter) -> DigitsWorld:
    return DigitsWorld.of(tiny)


SMALL = {"shots": 1, "queries": 2, "augment__views": ("plain",), "train__iterations": 2}


def config_of(method: str, **changes: object) -> RunConfig:
    return tiny_config(method, **{**SMALL, **changes}).resolved()


# -------------------------------------------------------------------------------------------- fit and predict
@pytest.mark.parametrize("method", ["toybase", "toybase+toyplug", "lora+toyplug"])
def test_toy_parts_fit_and_predict_on_digits(toys: None, world: DigitsWorld, method: str) -> None:
    config = config_of(method)
    model = build_method(config, world.backbone)
    batch = world.batch(config, [0, 1])
    model.fit(batch)
    logits = model.predict(batch)
    assert logits.shape == (2, config.ways * config.queries, config.ways) and torch.isfinite(logits).all()
    records = model.episode_records()
    assert len(records) == 2 and all(r["curves"]["step"] == [1, 2] for r in records)
    if "toyplug" in method:
        assert all(r["toyplug_penalty"] > 0 and len(r["curves"]["toy_penalty"]) == 2 for r in records)
    if method.startswith("toybase"):
        offset = model.trained_state()["toy_offset"]
        assert offset.shape == (2, config.ways, world.backbone.embed_dim) and offset.abs().sum() > 0
        norms = offset.flatten(1).norm(dim=1).tolist()
        assert [r["toy_offset_norm"] for r in records] == pytest.approx(norms, abs=1e-6)


def test_the_toy_penalty_is_the_squared_norm_the_last_step_saw(toys: None, world: DigitsWorld) -> None:
    """The offsets start at zero, so one step's penalty is 0 and the second step's is the squared norm of the offsets
    after one step: the toy base's own record of a one-step fit."""
    one, two = (build_method(config_of("toybase+toyplug", train__iterations=n), world.backbone) for n in (1, 2))
    one.fit(world.batch(one.config, [0, 1]))
    two.fit(world.batch(two.config, [0, 1]))
    assert [r["toyplug_penalty"] for r in one.episode_records()] == [0.0, 0.0]
    expected = [r["toy_offset_norm"] ** 2 for r in one.episode_records()]
    assert [r["toyplug_penalty"] for r in two.episode_records()] == pytest.approx(expected, rel=1e-4)


def test_the_remedies_name_the_toy_parts_knobs(toys: None, world: DigitsWorld) -> None:
    """A diverged fit's advice comes from the parts: the base's rate and the plug-in's weight, no other section's."""
    model = build_method(config_of("toybase+toyplug", toy__lr=0.25), world.backbone)
    assert model.remedies() == (
        "a lower learning rate (now toy.lr=0.25), a smaller toyplug.weight (now 0.5) or a smaller train.logit_scale "
        "(now 100)"
    )
    lora = build_method(config_of("lora+toyplug"), world.backbone)
    assert lora.remedies().startswith("a lower learning rate (now train.lr=0.0002), a smaller toyplug.weight")
    maple = build_method(config_of("maple+toyplug"), world.backbone)  # a base with remedies of its own
    assert maple.remedies().endswith("a smaller maple.depth or a smaller toyplug.weight (now 0.5)")


def test_the_toy_penalty_shrinks_what_the_base_learns(toys: None, world: DigitsWorld) -> None:
    """Same seed and steps: with the L2 penalty the offsets end smaller than without it."""
    norms = {}
    for method in ("toybase", "toybase+toyplug"):
        config = config_of(method, train__iterations=4, toyplug__weight=50.0)
        model = build_method(config, world.backbone)
        model.fit(world.batch(config, [0]))
        norms[method] = model.episode_records()[0]["toy_offset_norm"]
    assert norms["toybase+toyplug"] < norms["toybase"]


# ------------------------------------------------------------------------------------- a stored run and the report
def stored(db: Path, method: str, **changes: object) -> RunConfig:
    config = RunConfig(
        dataset="digits", method=method, backbone="tiny", pretrained="none", shots=1, queries=2, episodes=2,
        device="cpu", db=str(db),
    )  # fmt: skip
    config.train.iterations = 2
    config.augment.views = ("plain",)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        setattr(config.section(section), name, value)
    return config


def test_a_toy_run_is_stored_with_its_records_resumed_and_reported(toys: None, tmp_path: Path) -> None:
    db = tmp_path / "toy.sqlite"
    first = cdfsl.run(stored(db, "toybase+toyplug"), progress=False)
    assert first.trained_episodes == 2 and len(first.per_episode) == 2
    assert all({"toy_offset_norm", "toyplug_penalty"} <= set(first.records[i]) for i in (0, 1))
    again = cdfsl.run(stored(db, "toybase+toyplug"), progress=False)
    assert again.trained_episodes == 0 and again.run_id == first.run_id and again.per_episode == first.per_episode
    faster = cdfsl.run(stored(db, "toybase+toyplug", toy__lr=0.3), progress=False)  # a knob the base reads
    heavier = cdfsl.run(stored(db, "toybase+toyplug", toyplug__weight=2.0), progress=False)  # the plug-in's knob
    assert len({first.run_id, faster.run_id, heavier.run_id}) == 3 and faster.trained_episodes == 2
    lora = stored(db, "lora+toyplug")
    lora_id = cdfsl.run(lora, progress=False).run_id
    assert cdfsl.run(stored(db, "lora+toyplug", toy__lr=0.3), progress=False).run_id == lora_id  # lora reads no toy.*
    with ResultStore(db, read_only=True) as store:
        assert store.episode_records(first.run_id)[1] == {
            k: v for k, v in first.records[1].items() if k in ("toy_offset_norm", "toyplug_penalty")
        }
        report = build_report(store).to_dict()
    toy_rows = [row for row in report["rows"] if row["method"] == "toybase+toyplug"]
    norms = [row["records"]["digits/1-shot"]["toy_offset_norm"] for row in toy_rows]
    assert any(n["per_episode"] == [first.records[i]["toy_offset_norm"] for i in (0, 1)] for n in norms)
    lora_row = next(row for row in report["rows"] if row["method"] == "lora+toyplug")
    assert set(lora_row["records"]["digits/1-shot"]) == {"toyplug_penalty"}

    shown = CliRunner().invoke(app, ["report", "--db", str(db), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    assert "toybase+toyplug" in shown.output and "toy_offset_norm" in shown.output
    table = CliRunner().invoke(app, ["report", "--db", str(db)])
    assert table.exit_code == 0 and "toybase+toyplug" in table.output and "toy_offset_norm" in table.output


# ------------------------------------------------------------------------------------------------------ cost
def test_the_cost_of_a_toy_step_counts_its_trained_offsets(toys: None) -> None:
    config = RunConfig(dataset="digits", method="toybase+toyplug", backbone="tiny", pretrained="none", device="cpu")
    config.augment.views = ("plain",)
    cost = training_cost(config)
    embed_dim = cost["dims"]["embed_dim"]
    assert cost["parameters"]["toy_offset"] == config.ways * embed_dim
    assert cost["parameters"]["total"] == config.ways * embed_dim
    assert cost["parameters"]["toy_penalty"] == 0  # the plug-in trains no module of its own
    assert cost["flops"]["step"] > 0 and "base_step" not in cost["flops"]
    assert cost["part_labels"] == {"toy_offset": "toy class-text offsets", "toy_penalty": "toy penalty (no modules)"}
    tiny = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu", "--shots", "1"]
    shown = CliRunner().invoke(app, ["cost", "--method", "toybase+toyplug", *tiny])
    assert shown.exit_code == 0, shown.output
    assert "toy class-text offsets" in shown.output and f"{config.ways * embed_dim:,}" in shown.output


# ------------------------------------------------------------------------------------ classifier, save, export
def digit_folder(world: DigitsWorld, root: Path, per_class: int = 2) -> Path:
    """Three classes of the digits set, `per_class` images each, as a folder of class folders."""
    index = world.index
    for label in range(3):
        folder = root / index.class_names[label].replace(" ", "_")
        folder.mkdir(parents=True)
        for n, item in enumerate([i for i, y in enumerate(index.labels) if y == label][:per_class]):
            index.loader(index.items[item]).save(folder / f"{n}.png")
    return root


def test_a_toy_classifier_fits_saves_loads_and_exports(toys: None, world: DigitsWorld, tmp_path: Path) -> None:
    images = digit_folder(world, tmp_path / "digits")
    settings = {"train.iterations": 2, "augment.views": ["plain"]}
    classifier = FewShotClassifier("toybase+toyplug", "tiny", "none", device="cpu", settings=settings)
    classifier.fit(images)
    probabilities = classifier.predict_proba(images)
    assert probabilities.shape == (6, 3)
    loaded = FewShotClassifier.load(classifier.save(tmp_path / "saved"), device="cpu")
    assert loaded.predict_proba(images) == pytest.approx(probabilities, abs=1e-6)

    weights, sidecar = classifier.export_merged(tmp_path / "toy.safetensors")
    exported = json.loads(sidecar.read_text())
    _, model = classifier._require_fitted()
    text = model.class_features([classifier.class_names_])[0]
    assert torch.tensor(exported["text_features"]) == pytest.approx(text, abs=1e-6)
    assert weights.is_file() and exported["classes"] == classifier.classes_

    opaque = FewShotClassifier("toyopaque", "tiny", "none", device="cpu", settings=settings).fit(images)
    with pytest.raises(ConfigError, match="toyopaque keeps its offsets apart"):
        opaque.export_merged(tmp_path / "opaque.safetensors")
    assert not (tmp_path / "opaque.safetensors").exists()


# ------------------------------------------------------------------------------------- a base that trains nothing
FROZEN_BASE = Base(
    "toyfrozen", "the template's class texts, nothing learned", "nothing", "this test",
    builder="cdfsl.methods.zeroshot.method:ZeroShot", learns=False, reads=lambda config, spec: ("train.template",),
)  # fmt: skip


def test_a_base_that_declares_it_learns_nothing_is_treated_as_zeroshot(toys: None, world: DigitsWorld) -> None:
    """Whether a base trains is what it declares (`Base.learns`), not whether its name is `zeroshot`."""
    with registered(FROZEN_BASE):
        config = RunConfig(dataset="digits", method="toyfrozen", backbone="tiny", pretrained="none", device="cpu")
        assert not config.trains
        assert build_method(config, world.backbone).remedies().startswith("another checkpoint (--pretrained none)")
        with pytest.raises(ConfigError, match="toyfrozen does not train: it has no training step to count"):
            training_cost(config)
        with pytest.raises(ConfigError, match="toyfrozen trains nothing for a penalty; use lora\\+toyplug"):
            RunConfig(method="toyfrozen+toyplug").validate()
