"""Bytes of activations a training step keeps for backward, per support view, per method. A script, not a test.

    python benchmarks/saved_activations.py [--backbone ViT-B-16] [--views 4] [--methods lora,tir,vtt,tir+vtt]
        [--json PATH]

One training step of one episode (E = 1) of `--views` support views (the `vtt-release` recipe's loop), random weights
(`--pretrained none`; sizes do not depend on the values), on the CPU, fp32. Every tensor autograd saves for backward
passes through `torch.autograd.graph.saved_tensors_hooks`; the script keeps, per storage, whether some saved tensor
still holds it, and reports the peak of those bytes over the step (what the step's graph holds at its largest:
at the end of the forward pass, or while VtT's scan recomputes its states in backward). Storages of the frozen
weights and of the trained tensors are left out (they live anyway). VtT's fusion is measured twice: with the states
recomputed in backward (the default) and with the plain scan that keeps every state (`selective_scan(recompute=
False)`, the code before), so the table shows what recomputation saves.

Reported per method: peak saved MiB per support view, and the extra over `lora` per view.
"""

from __future__ import annotations

import argparse
import json
import platform
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from cdfsl.backbone.factory import load_backbone
from cdfsl.config import RunConfig
from cdfsl.engine.autobatch import synthetic_batch
from cdfsl.methods import build_method
from cdfsl.methods.vtt import fusion

METHODS = ("lora", "tir", "vtt", "tir+vtt")


class SavedBytes:
    """Live and peak bytes of the storages that saved tensors hold (each storage counted once), leaving out
    `excluded` storages (by data pointer)."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.holders: Counter[int] = Counter()
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return tensor
        holder = _Holder(tensor)
        if self.holders[key] == 0:
            self.sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.holders[key] += 1
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            self.live -= self.sizes.pop(key)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Holder) else packed

    @contextmanager
    def hooks(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield


class _Holder:
    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--views", type=int, default=4, help="support views in the step (E = 1)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


def step_peak(method_name: str, backbone: Any, views: int, recompute: bool = True) -> int:
    """Peak saved bytes of one training step of `method_name` over `views` support views (E = 1)."""
    config = RunConfig(
        dataset="digits", method=method_name, recipe="vtt-release", backbone=backbone.name, pretrained="none",
        shots=1, ways=views, device="cpu",
    )  # fmt: skip
    config.train.iterations = 1
    config.train.batch_size = views
    config.augment.views = ("plain",)
    config = config.resolved()
    method = build_method(config, backbone)
    batch = synthetic_batch(config, 1, backbone.image_size, backbone.device)
    frozen = {p.untyped_storage().data_ptr() for p in backbone.model.parameters()}
    frozen |= {b.untyped_storage().data_ptr() for b in backbone.model.buffers()}
    counter = SavedBytes(frozen)
    default = fusion.RECOMPUTE_SCAN
    fusion.RECOMPUTE_SCAN = recompute
    original_start = method.start

    def start(batch_: Any) -> None:  # leave the trained tensors out too, once they exist
        original_start(batch_)
        counter.excluded |= {t.untyped_storage().data_ptr() for t, _ in method.trained_tensors()}

    method.start = start  # type: ignore[method-assign]
    try:
        with counter.hooks():
            method.fit(batch)
    finally:
        fusion.RECOMPUTE_SCAN = default
    return counter.peak


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, "none", torch.device("cpu"))
    rows: list[dict[str, Any]] = []
    mib = 2**20
    cases = [(m, True) for m in args.methods.split(",")]
    cases += [(m, False) for m in args.methods.split(",") if "vtt" in m]
    for method, recompute in cases:
        peak = step_peak(method, backbone, args.views, recompute)
        row = {
            "method": method,
            "scan": "recomputed" if recompute else "plain",
            "mib_per_view": peak / mib / args.views,
        }
        rows.append(row)
        print(f"{method:10s} {row['scan']:10s} {row['mib_per_view']:8.1f} MiB per view", flush=True)
    lora = next((r["mib_per_view"] for r in rows if r["method"] == "lora"), None)
    for row in rows:
        row["extra_over_lora"] = None if lora is None else row["mib_per_view"] - lora
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "backbone": args.backbone,
        "views": args.views,
        "rows": rows,
    }
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Saved activations per support view, {result['backbone']} (random weights), E = 1, {result['views']} views, "
        "CPU fp32, vtt-release recipe",
        "",
        "| method | VtT scan | MiB per view | extra over lora |",
        "|---|---|---:|---:|",
    ]
    for row in result["rows"]:
        extra = "" if row["extra_over_lora"] is None else f"{row['extra_over_lora']:+.1f}"
        scan = row["scan"] if "vtt" in row["method"] else ""
        lines.append(f"| {row['method']} | {scan} | {row['mib_per_view']:.1f} | {extra} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
