"""`cdfsl cost` and `analysis.cost`: parameter counts by hand, FLOP sanity relations, the CLI on the tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cdfsl.analysis.cost import (
    RELEASE_FUSION,
    RELEASE_TOTAL,
    RELEASE_UNUSED_LINEAR,
    RELEASE_VISION_LORA,
    flop_counter,
    synthetic_batch,
    training_cost,
)
from cdfsl.backbone.lora import EpisodeLoRA
from cdfsl.cli import app
from cdfsl.config import LoraConfig, RunConfig
from cdfsl.engine.runner import Runner
from cdfsl.methods.vtt.fusion import ReleaseFusion, parameter_count
from cdfsl.seeding import torch_stream

TINY = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu", "--shots", "1"]
WIDE = {"COLUMNS": "200"}  # rich wraps at the console width; keep table rows on one line
# The tiny model (assets/cdfsl-tiny.json): 12 blocks of width 96 in each tower, joint width C = 64.
BLOCKS, WIDTH, JOINT, RANK, TARGETS = 12, 96, 64, 16, 3


def lora_by_hand(blocks: int, width: int, rank: int = RANK, targets: int = TARGETS) -> int:
    """Per block and target, A `[r, D]` and B `[D, r]`."""
    return blocks * targets * (rank * width + width * rank)


def release_fusion_by_hand(
    c: int, w: int, tokens: int = 25, state: int = 256, dt_rank: int = 256, conv: int = 4
) -> int:
    position = tokens * c
    token_mlp = (c * 2 * c + 2 * c) + 2 * tokens * 2 * c + 2 * c * c  # fc1 (bias), LayerNorm affine [T, 2C], fc2
    mamba = (
        c * 2 * c  # in_proj
        + c * conv + c  # depthwise conv weight and bias
        + c * (dt_rank + 2 * state)  # x_proj
        + dt_rank * c + c  # dt_proj, dt_bias
        + c * state + c  # A_log, D
        + c * c  # out_proj
    )  # fmt: skip
    residual = c * c
    head = c * w if w != c else 0
    return position + token_mlp + mamba + residual + head


def tiny_config(method: str) -> RunConfig:
    return RunConfig(method=method, backbone="tiny", pretrained="none", shots=1, device="cpu")


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args, env=WIDE)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One CPU thread: the counted steps are many small ops, which extra threads slow down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner()


@pytest.fixture(scope="module")
def vtt_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    """`cdfsl cost --method vtt` on tiny with `--json`: the CLI result and the dict it wrote."""
    path = tmp_path_factory.mktemp("cost") / "cost.json"
    result = invoke(["cost", "--method", "vtt", *TINY, "--json", str(path)])
    assert result.exit_code == 0, result.output
    return result, json.loads(path.read_text())


@pytest.fixture(scope="module")
def vtt_cost(vtt_run: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
    return vtt_run[1]


@pytest.fixture(scope="module")
def lora_cost(runner: Runner) -> dict[str, Any]:
    return training_cost(tiny_config("lora"), runner)


def test_tiny_dimensions_are_the_hand_counts_inputs(vtt_cost: dict[str, Any]) -> None:
    assert vtt_cost["dims"] == {
        "vision_blocks": BLOCKS, "vision_width": WIDTH, "text_blocks": BLOCKS, "text_width": WIDTH, "embed_dim": JOINT,
    }  # fmt: skip


def test_vtt_parameters_equal_hand_counts(vtt_cost: dict[str, Any]) -> None:
    parameters = vtt_cost["parameters"]
    assert parameters["vision_lora"] == lora_by_hand(BLOCKS, WIDTH) == 110_592
    # The release fusion on 12 blocks: a 5×5 grid; state and Δ rank capped at C/2 = 32 on the tiny model; the text
    # width 96 ≠ C = 64 adds the C→W head.
    assert parameters["vtt_fusion"] == release_fusion_by_hand(JOINT, WIDTH, state=32, dt_rank=32) == 57_728
    fresh = ReleaseFusion([torch_stream(0, 0, "vtt_init")], grid=5, width=JOINT, outputs=WIDTH, state=32, dt_rank=32)
    assert parameters["vtt_fusion"] == parameter_count(fresh)
    assert set(parameters) == {"vision_lora", "vtt_fusion", "total"}
    assert parameters["total"] == parameters["vision_lora"] + parameters["vtt_fusion"]


def test_quoted_release_counts_are_our_modules_at_vit_b16_shapes() -> None:
    """The release's ViT-B/16 figures equal our LoRA and fusion built at those shapes (12 × 768, C = 512)."""
    lora = EpisodeLoRA(LoraConfig(rank=16, alpha=8.0), 12, 768, [torch_stream(0, 0, "lora_init")])
    assert parameter_count(lora) == lora_by_hand(12, 768) == RELEASE_VISION_LORA
    fusion = ReleaseFusion([torch_stream(0, 0, "vtt_init")], grid=5, width=512, outputs=512)
    assert parameter_count(fusion) == release_fusion_by_hand(512, 512) == RELEASE_FUSION
    assert RELEASE_UNUSED_LINEAR == 512 * 512
    assert RELEASE_TOTAL == 3_968_000


def test_learned_text_side_is_split(runner: Runner) -> None:
    """tir-release trains LoRA on both towers and a 4-token context ("a photo of a")."""
    parameters = training_cost(tiny_config("tir"), runner)["parameters"]
    assert parameters["vision_lora"] == lora_by_hand(BLOCKS, WIDTH)
    assert parameters["text_lora"] == lora_by_hand(BLOCKS, WIDTH)
    assert parameters["prompt_context"] == 4 * WIDTH
    assert "vtt_fusion" not in parameters
    assert parameters["total"] == sum(v for k, v in parameters.items() if k != "total")


def test_maple_parts_are_the_hand_counts(runner: Runner) -> None:
    """MaPLe at depth 9 with 2 context tokens: context 2·Wt, compound prompts 8·2·Wt, maps 9·(Wt·Wv + Wv); one step
    is one batch of `maple.batch_size` views."""
    result = training_cost(tiny_config("maple"), runner)
    parameters = result["parameters"]
    assert parameters["maple_context"] == 2 * WIDTH
    assert parameters["maple_compound"] == 8 * 2 * WIDTH
    assert parameters["maple_coupling"] == 9 * (WIDTH * WIDTH + WIDTH)
    assert parameters["total"] == sum(v for k, v in parameters.items() if k != "total")
    assert result["batch_size"] == 4 and result["base_method"] is None


def test_vtt_cost_is_measured_against_the_method_without_vtt(runner: Runner) -> None:
    assert training_cost(tiny_config("lora+tir+vtt"), runner)["base_method"] == "lora+tir"


def test_vtt_flops_exceed_the_base_step_by_at_least_its_pieces(
    vtt_cost: dict[str, Any], lora_cost: dict[str, Any]
) -> None:
    flops = vtt_cost["flops"]
    assert vtt_cost["base_method"] == "lora"
    assert flops["base_step"] == lora_cost["flops"]["step"]  # the base is the lora step of the same recipe
    assert flops["step"] > flops["base_step"] > 0
    assert flops["vtt_added"] == flops["step"] - flops["base_step"]
    assert flops["vtt_fusion"] > 0 and flops["vtt_absorption"] > 0
    assert flops["vtt_added"] >= flops["vtt_fusion"]
    assert flops["vtt_added"] >= flops["vtt_fusion"] + flops["vtt_absorption"]
    assert flops["vtt_rest"] == flops["vtt_added"] - flops["vtt_fusion"] - flops["vtt_absorption"]


def test_step_shape_follows_the_recipe(vtt_cost: dict[str, Any]) -> None:
    assert vtt_cost["recipe"] == "vtt-release"
    assert vtt_cost["support_views"] == 5 * 1 * 5  # ways × shots × views
    assert vtt_cost["batch_size"] == 25
    assert vtt_cost["episodes"] == 1
    assert vtt_cost["reference"]["release_comparable"] is False  # tiny is not ViT-B/16


def test_attention_is_counted_on_cpu() -> None:
    """FlopCounterMode's registry lacks the CPU attention kernel; `flop_counter` counts it as the CUDA ones."""
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    with flop_counter() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 5 * 5 * 8)  # Q·Kᵀ and P·V, 2 FLOPs per multiply-add
    with flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() > 0


def test_synthetic_batch_shapes(runner: Runner) -> None:
    config = RunConfig(method="lora", backbone="tiny", pretrained="none", shots=2, ways=3, device="cpu")
    backbone = runner.backbone(config, torch.device("cpu"))
    batch = synthetic_batch(config.resolved(), backbone)
    views = len(config.resolved().augment.views)  # the recipe's views
    assert batch.support.shape == (1, 3 * 2 * views, 3, backbone.image_size, backbone.image_size)
    assert batch.support_labels.tolist() == [[c for c in range(3) for _ in range(2 * views)]]
    assert batch.query.shape[:2] == (1, 3)
    assert batch.class_names == [["class 0", "class 1", "class 2"]]


def test_lora_has_no_vtt_entries(lora_cost: dict[str, Any]) -> None:
    assert "vtt_fusion" not in lora_cost["parameters"]
    assert set(lora_cost["flops"]) == {"step"}
    assert "reference" not in lora_cost
    assert lora_cost["base_method"] is None


def test_cli_cost_writes_json(vtt_run: tuple[Any, dict[str, Any]]) -> None:
    result, written = vtt_run
    assert written["method"] == "vtt" and written["backbone"] == "tiny"
    assert written["parameters"]["vision_lora"] == lora_by_hand(BLOCKS, WIDTH)
    assert set(written["flops"]) >= {"step", "base_step", "vtt_added", "vtt_fusion", "vtt_absorption"}
    for text in ("VtT modules (fusion)", "148.5", "3.9 M", "2 FLOPs per multiply-add", f"{RELEASE_TOTAL:,}"):
        assert text in result.output


def test_cli_cost_lora_prints_no_vtt_lines() -> None:
    result = invoke(["cost", "--method", "lora", *TINY])
    assert result.exit_code == 0, result.output
    assert "vision-tower LoRA" in result.output
    for text in ("VtT", "fusion", "absorption", "148.5", "3.9 M"):
        assert text not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "vtx", *TINY], "is not a base followed by plug-ins"),
        (["--method", "vtt", "--backbone", "ViT-X", "--device", "cpu"], "unknown backbone"),
        (["--method", "zeroshot", *TINY], "does not train"),
        (["--method", "vtt", *TINY, "--set", "vtt.nope=1"], "unknown config key"),
    ],
)
def test_cli_cost_user_errors(args: list[str], message: str) -> None:
    result = invoke(["cost", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
