"""Pretrain the embedded tiny CLIP on the generated source domain (docs/embedded.md); reproduce the shipped checkpoint.

Recipe, and why:

- From-scratch ViT-CLIP training is fragile at this size: with the plain CLIP loss (one positive per row) the model
  collapses to a constant embedding within ~50 steps (gradient norm 0.02-0.3) and stays at chance for hundreds of
  steps; a label-aware loss alone does not escape either (measured, docs/embedded.md).
- So, first a short *supervised warm-up* of the vision tower: a linear head over the source concepts
  (`source_domain.CONCEPTS`) on top of `encode_image`, cross-entropy, a few hundred steps. The image features are
  then spread out and class-structured before the text tower is involved.
- The warm-up is a curriculum: on the full source mix (fonts, colours, rotations, letters, shapes...) the ViT barely
  leaves chance in 300 steps (digits ~15%), while on target-like digits alone (grey, centred, thick, seen at 6-16 px)
  it reaches ~55% in 200 steps (measured, 1 thread, batch 64). So the warm-up's first half draws only those, its
  second half blends down to `target_share` of them, which the contrastive phase keeps.
- Then a *label-aware contrastive loss*: logits of the batch's images against the batch's unique captions
  (`[B, U]`), every caption of the image's concept a positive; multi-positive cross-entropy (uniform target over the
  positives) image -> text and text -> image, averaged. Many templates per concept share one target, which is what
  ties "a photo of a seven." to images of sevens in every style. Logit scale starts at ln 10 (clamped at ln 100).
- AdamW (no weight decay on gains, biases, embeddings and the logit scale), linear warm-up then cosine decay within
  each phase, gradient norm clipped at 1, batch 128.

Images are normalized with open_clip's OPENAI_DATASET_MEAN/STD, captions tokenized with the standard open_clip
tokenizer. During training the text tower runs on tokens trimmed after the longest caption's end token: the
causal mask makes this exact (`encode_text_trimmed`), and it is ~4x cheaper than the 77-token context.

Zero-shot check (`zero_shot_digits`): sklearn's 8x8 digits, upsampled bicubic to 64 px, grey -> RGB (light ink on a
dark ground); fixed random 5-way episodes of 15 images per class; prompts "a photo of a {name}.".

Everything is seeded: `torch.manual_seed(seed)` before the model is built, source data from
`numpy.random.default_rng(seed)`. With the same thread count, re-running reproduces the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from cdfsl.backbone.tiny import create_tiny_model, register_tiny_config
from cdfsl.backbone.trimmed_text import encode_text_trimmed
from cdfsl.errors import ConfigError
from cdfsl.pretrain.source_domain import DIGIT_NAMES, IMAGE_SIZE, NUM_CONCEPTS, digit_prompt, generate_batch

MAX_CHECKPOINT_BYTES = 16_000_000
INITIAL_LOGIT_SCALE = math.log(10.0)
MAX_LOGIT_SCALE = math.log(100.0)
_EVAL_CHUNK = 256

Log = Callable[[dict], None]


def pretrain_tiny(
    out: Path,
    steps: int,
    seed: int = 0,
    threads: int | None = None,
    log: Log | None = None,
    *,
    supervised_steps: int = 500,
    batch_size: int = 128,
    target_share: float = 0.3,
    lr: float = 5e-4,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.05,
    log_every: int = 25,
    eval_every: int = 500,
    eval_episodes: int = 100,
) -> dict:
    """Train the tiny CLIP from scratch for `steps` optimizer steps and save it to `out` (fp16 safetensors).

    The first `supervised_steps` steps (at most `steps`) are the supervised warm-up of the vision tower, the rest the
    label-aware contrastive phase. `target_share` is the share of target-like digits (`generate_batch`) in the
    contrastive phase; the warm-up starts at 1 and decays to it over its second half. `log` receives dicts:
    training records every `log_every` steps (`phase`, `step`, `loss`, `lr`, `seconds`, ...) and zero-shot records
    (`zero_shot`, `step`, `seconds`) every `eval_every` steps and at the end. `eval_episodes` sizes every zero-shot
    check, including the final one stored in the metadata.

    Writes `out` (state dict keys exactly `model.state_dict()`'s, fp16, at most `MAX_CHECKPOINT_BYTES`) and
    `out.with_suffix(".meta.json")`; returns the metadata dict. Arguments out of range are a `ConfigError`, raised
    before any work.
    """
    _check_arguments(
        steps=steps,
        supervised_steps=supervised_steps,
        seed=seed,
        threads=threads,
        batch_size=batch_size,
        target_share=target_share,
        lr=lr,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        log_every=log_every,
        eval_every=eval_every,
        eval_episodes=eval_episodes,
    )
    emit: Log = log if log is not None else (lambda record: None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        torch.manual_seed(seed)
        model = create_tiny_model(load_weights=False).train()
        rng = np.random.default_rng(seed)
        warm = supervised_steps
        clock = _Clock(start)
        for record in _supervised_phase(model, rng, warm, batch_size, target_share, lr, weight_decay, warmup_fraction):
            _maybe_log(emit, record, log_every, warm, clock)
        for record in _contrastive_phase(
            model, rng, warm, steps, batch_size, target_share, lr, weight_decay, warmup_fraction
        ):
            _maybe_log(emit, record, log_every, steps, clock)
            if record["step"] % eval_every == 0 and record["step"] < steps:
                _emit_zero_shot(emit, model, record["step"], eval_episodes, clock)
        _round_to_fp16(model)  # the final check sees exactly the weights the checkpoint stores
        accuracy = _emit_zero_shot(emit, model, steps, eval_episodes, clock)
        meta = {
            "steps": steps,
            "supervised_steps": warm,
            "seed": seed,
            "threads": torch.get_num_threads(),
            "batch_size": batch_size,
            "target_share": target_share,
            "lr": lr,
            "weight_decay": weight_decay,
            "seconds": round(time.perf_counter() - start, 1),
            "zero_shot_digits_5way": accuracy,
            "zero_shot_episodes": eval_episodes,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        }
        save_checkpoint(model, Path(out), meta)
        return meta
    finally:
        torch.set_num_threads(previous_threads)


WARM_UP = "(the warm-up's steps are part of the steps)"
MAX_TORCH_SEED = 2**64 - 1  # torch.manual_seed's limit (numpy's default_rng takes any non-negative integer)


def _check_arguments(**arguments: Any) -> None:
    """`ConfigError` for the first argument of `pretrain_tiny` out of range, naming it, its value and the range."""
    steps = arguments["steps"]
    rules: list[tuple[str, bool, str]] = [("steps", _whole(steps, 1), "a positive integer")]
    if rules[0][1]:
        rules += [
            ("supervised_steps", _whole(arguments["supervised_steps"], 0, steps), f"in [0, steps={steps}] {WARM_UP}"),
            ("seed", _whole(arguments["seed"], 0, MAX_TORCH_SEED), f"an integer in [0, {MAX_TORCH_SEED}]"),
            ("threads", arguments["threads"] is None or _whole(arguments["threads"], 1), "a positive integer or None"),
            *((name, _whole(arguments[name], 1), "a positive integer") for name in _COUNTS),
            ("target_share", _real(arguments["target_share"], 0, 1), "a number in [0, 1]"),
            ("lr", _real(arguments["lr"], 0, math.inf, low_open=True), "a finite number > 0"),
            ("weight_decay", _real(arguments["weight_decay"], 0, math.inf), "a finite number >= 0"),
            ("warmup_fraction", _real(arguments["warmup_fraction"], 0, 1), "a number in [0, 1]"),
        ]
    for name, allowed, words in rules:
        if not allowed:
            raise ConfigError(f"pretrain-tiny: {name} must be {words}, got {arguments[name]!r}")


_COUNTS = ("batch_size", "log_every", "eval_every", "eval_episodes")


def _whole(value: object, low: int, high: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _real(value: object, low: float, high: float, *, low_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def save_checkpoint(model: nn.Module, out: Path, meta: dict) -> None:
    """Write `model.state_dict()` as fp16 safetensors to `out` and `meta` to `out.with_suffix(".meta.json")`.

    Raises RuntimeError (and leaves no file) when the checkpoint exceeds `MAX_CHECKPOINT_BYTES`.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    partial = out.with_name(out.name + ".partial")
    save_file(state, str(partial))
    size = partial.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        partial.unlink()
        raise RuntimeError(f"tiny checkpoint is {size} bytes, over the {MAX_CHECKPOINT_BYTES}-byte budget")
    partial.chmod(0o644)
    partial.replace(out)
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# phases: generators of per-step records


def _supervised_phase(
    model: nn.Module,
    rng: np.random.Generator,
    steps: int,
    batch_size: int,
    target_share: float,
    lr: float,
    weight_decay: float,
    warmup_fraction: float,
) -> Iterable[dict]:
    """Cross-entropy of a linear head over the source concepts on `encode_image`; trains the vision tower only.

    Curriculum: only target-like digits for the first half, then a linear blend down to `target_share`.
    """
    if steps <= 0:
        return
    head = nn.Linear(model.visual.output_dim, NUM_CONCEPTS)
    optimizer = torch.optim.AdamW(
        _param_groups([("visual", model.visual), ("head", head)], weight_decay), lr=lr, betas=(0.9, 0.98)
    )
    for step in range(1, steps + 1):
        share = 1.0 - (1.0 - target_share) * max(0.0, 2.0 * step / steps - 1.0)
        images, _, concepts = generate_batch(rng, batch_size, target_share=share)
        rate = _set_lr(optimizer, _schedule(step - 1, steps, lr, warmup_fraction))
        logits = head(model.encode_image(normalize_images(images)))
        targets = torch.from_numpy(concepts)
        loss = F.cross_entropy(logits, targets)
        grad_norm = _step(optimizer, loss, [*model.visual.parameters(), *head.parameters()])
        accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
        yield {
            "phase": "supervised",
            "step": step,
            "loss": loss.item(),
            "lr": rate,
            "train_accuracy": accuracy,
            "target_share": share,
            "grad_norm": grad_norm,
        }


def _contrastive_phase(
    model: nn.Module,
    rng: np.random.Generator,
    first_step: int,
    last_step: int,
    batch_size: int,
    target_share: float,
    lr: float,
    weight_decay: float,
    warmup_fraction: float,
) -> Iterable[dict]:
    """Label-aware image-caption contrastive training of both towers, global steps `first_step + 1 .. last_step`."""
    steps = last_step - first_step
    if steps <= 0:
        return
    with torch.no_grad():
        model.logit_scale.fill_(INITIAL_LOGIT_SCALE)
    optimizer = torch.optim.AdamW(_param_groups([("", model)], weight_decay), lr=lr, betas=(0.9, 0.98))
    tokens_of = _CaptionTokens()
    for local in range(steps):
        images, captions, concepts = generate_batch(rng, batch_size, target_share=target_share)
        rate = _set_lr(optimizer, _schedule(local, steps, lr, warmup_fraction))
        unique, caption_concepts = _unique_captions(captions, concepts)
        image_features = F.normalize(model.encode_image(normalize_images(images)), dim=-1)
        text_features = F.normalize(encode_text_trimmed(model, tokens_of(unique)), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T  # [B, U]
        positives = torch.from_numpy(concepts[:, None] == caption_concepts[None, :])  # [B, U]
        loss = label_aware_loss(logits, positives)
        grad_norm = _step(optimizer, loss, list(model.parameters()))
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        yield {
            "phase": "contrastive",
            "step": first_step + local + 1,
            "loss": loss.item(),
            "lr": rate,
            "logit_scale": model.logit_scale.exp().item(),
            "captions": len(unique),
            "grad_norm": grad_norm,
        }


def label_aware_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Multi-positive cross-entropy in both directions.

    Args:
        logits: `[B, U]` scaled similarities of B images to U unique captions.
        positives: bool `[B, U]`, True where the caption describes the image's concept; every row and column has
            at least one True (each caption comes from some image of the batch).
    Returns:
        scalar: mean of the image -> text and text -> image losses, each with a uniform target over the positives.
    """
    target = positives.float()
    image_to_text = -(F.log_softmax(logits, dim=1) * target / target.sum(1, keepdim=True)).sum(1).mean()
    text_to_image = -(F.log_softmax(logits, dim=0) * target / target.sum(0, keepdim=True)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


# ---------------------------------------------------------------------------------------------------------------
# zero-shot check on the target domain


def digits_target() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's handwritten digits as the target domain sees them.

    Returns uint8 `[N, S, S, 3]` images (8x8 grey levels 0-16 scaled to 0-255, upsampled bicubic to S = 64, grey
    copied to RGB; light ink on a dark ground) and int64 `[N]` labels 0-9 (N = 1797).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # [N, 8, 8]
    images = np.stack(
        [
            np.asarray(Image.fromarray(g).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB"))
            for g in grey
        ]
    )
    return images, digits.target.astype(np.int64)


@torch.no_grad()
def zero_shot_digits(model: nn.Module, episodes: int = 100, seed: int = 0, way: int = 5, per_class: int = 15) -> float:
    """Mean zero-shot accuracy over `episodes` fixed random `way`-way episodes on sklearn digits.

    Each episode draws `way` of the 10 classes and `per_class` images of each from `numpy.random.default_rng(seed)`;
    an image is assigned the episode class whose prompt "a photo of a {name}." is most similar. Only the images the
    episodes use are encoded. Leaves the model's train/eval mode as it found it.
    """
    images, labels = digits_target()
    plan = digit_episodes(labels, episodes, seed, way, per_class)
    used = np.unique(np.concatenate([items for _, items in plan]))
    was_training = model.training
    model.eval()
    try:
        features = torch.cat(
            [
                F.normalize(model.encode_image(normalize_images(images[used[i : i + _EVAL_CHUNK]])), dim=-1)
                for i in range(0, len(used), _EVAL_CHUNK)
            ]
        )  # [len(used), D]
        tokenizer = open_clip.get_tokenizer(register_tiny_config())
        prompts = [digit_prompt(d) for d in range(len(DIGIT_NAMES))]
        text_features = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)  # [10, D]
    finally:
        model.train(was_training)
    similarity = np.zeros((len(images), len(prompts)), dtype=np.float32)  # [N, 10], rows of unused images stay 0
    similarity[used] = (features @ text_features.T).numpy()
    accuracies = [
        float((similarity[np.ix_(items, classes)].argmax(axis=1) == np.repeat(np.arange(way), per_class)).mean())
        for classes, items in plan
    ]
    return float(np.mean(accuracies))


def digit_episodes(
    labels: np.ndarray, episodes: int, seed: int, way: int, per_class: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed random episodes: per episode the classes `[way]` and item positions `[way * per_class]`, grouped by
    class in the order of `classes`."""
    rng = np.random.default_rng(seed)
    classes_all = int(labels.max()) + 1
    by_class = [np.flatnonzero(labels == c) for c in range(classes_all)]
    plan = []
    for _ in range(episodes):
        classes = rng.choice(classes_all, size=way, replace=False)
        items = np.concatenate([rng.choice(by_class[c], size=per_class, replace=False) for c in classes])
        plan.append((classes, items))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# helpers


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """uint8 `[B, S, S, 3]` RGB -> float32 `[B, 3, S, S]` normalized with OPENAI_DATASET_MEAN/STD."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class _CaptionTokens:
    """Tokenizes captions with the open_clip tokenizer, memoizing each distinct caption (`[U, 77]` int64)."""

    def __init__(self) -> None:
        self._tokenizer = open_clip.get_tokenizer(register_tiny_config())
        self._memo: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in captions if c not in self._memo]
        if missing:
            self._memo.update(zip(missing, self._tokenizer(missing), strict=True))
        return torch.stack([self._memo[c] for c in captions])


def _unique_captions(captions: list[str], concepts: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The batch's distinct captions in first-seen order and the concept of each (`[U]`)."""
    first: dict[str, int] = {}
    for caption, concept in zip(captions, concepts.tolist(), strict=True):
        first.setdefault(caption, concept)
    return list(first), np.fromiter(first.values(), dtype=np.int64, count=len(first))


def _param_groups(modules: list[tuple[str, nn.Module]], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not gains, biases, embeddings, logit scale)."""
    decay, no_decay = [], []
    for prefix, module in modules:
        for name, param in module.named_parameters(prefix=prefix):
            exempt = param.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up over `warmup_fraction` of `total` steps, then cosine decay to zero; `step` counts from 0."""
    warmup = max(1, round(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _set_lr(optimizer: torch.optim.Optimizer, rate: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = rate
    return rate


@torch.no_grad()
def _round_to_fp16(model: nn.Module) -> None:
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.half().float())


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list[nn.Parameter]) -> float:
    """Backward, clip the gradient norm at 1, update; returns the pre-clip gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return float(norm)


class _Clock:
    def __init__(self, start: float) -> None:
        self.start = start

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def _maybe_log(emit: Log, record: dict, every: int, phase_end: int, clock: _Clock) -> None:
    if record["step"] % every == 0 or record["step"] in (1, phase_end):
        emit({**record, "seconds": clock.seconds()})


def _emit_zero_shot(emit: Log, model: nn.Module, step: int, episodes: int, clock: _Clock) -> float:
    accuracy = zero_shot_digits(model, episodes=episodes)
    emit({"phase": "zero_shot", "step": step, "zero_shot": accuracy, "seconds": clock.seconds()})
    return accuracy
