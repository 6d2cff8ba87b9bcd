"""The text side of a method: each episode's class text features, frozen or learned (docs/methods.md).

- Frozen (recipe `vtt-release`): the template prompts `"a photo of a {}."` through the frozen text tower, computed once
  per class name and reused across episodes (`ClassText`).
- Learned (recipe `tir-release`): a CoOp-style context of n vectors shared by an episode's classes, initialised from the
  token embeddings of `prompt.context` ("a photo of a"), in the prompt `"{context} {class name}."`, and/or LoRA on the
  text tower's q, k, v. The class features are recomputed at every training step from the learned prompts, with
  gradients, as the TIR release does; E episodes carry their own context `[E, n, W]` and LoRA factors.

Either side also absorbs (VtT, `absorb`): its own class prompt with a token in place of the class name ("a photo of a
X." frozen, "{context} X." learned), through the text tower as it stands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.lora import EpisodeLoRA
from cdfsl.backbone.towers import plain_qkv
from cdfsl.config import RunConfig
from cdfsl.errors import ConfigError
from cdfsl.seeding import torch_stream

ALL_BLOCKS = "all"


class ClassText:
    """Class prompt features of the frozen text tower, computed once per class name and reused across episodes.

    Args:
        backbone: the adapter.
        template: prompt template with one `{}`.
        layer: `None` for the final text feature, a text block index (negative counts from the end) for the EOS
            feature after that block through the final norm and projection, or `ALL_BLOCKS` for those after every
            block (one text pass; features `[E, K, L, C]`).
        normalize: L2-normalize the features (the raw ones feed VtT's release fusion).
    """

    def __init__(
        self, backbone: ClipAdapter, template: str, layer: int | str | None = None, normalize: bool = True
    ) -> None:
        self.backbone = backbone
        self.template = template
        self.layer = layer
        self.normalize = normalize
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, class_names: Sequence[Sequence[str]]) -> Tensor:
        """Per-episode class names `[E][K]` → features `[E, K, C]` (`[E, K, L, C]` for `ALL_BLOCKS`; fp32, computed
        once in fp32 outside autocast)."""
        missing = sorted({name for names in class_names for name in names} - self._cache.keys())
        if missing:
            with torch.autocast(self.backbone.device.type, enabled=False):
                self._encode(missing)
        return torch.stack([torch.stack([self._cache[n] for n in names]) for names in class_names])

    def _encode(self, missing: list[str]) -> None:
        prompts = [self.template.format(name) for name in missing]
        if self.layer is None:
            features = self.backbone.text_features(prompts)
        elif self.layer == ALL_BLOCKS:
            features = self.backbone.text_layer_features(prompts).transpose(0, 1)  # [K, L, C]
        else:
            features = self.backbone.text_layer_features(prompts)[self.layer]
        features = features.float()
        self._cache.update(zip(missing, F.normalize(features, dim=-1) if self.normalize else features, strict=True))


class TemplateAbsorber:
    """The frozen text tower over `template` with the embedding of `placeholder` (in place of `{}`) replaced:
    tokens `[E, B, W]` → features `[E, B, C]`. With a causal tower the prompt's prefix ("a photo of a") is run once
    and cached (`ClipAdapter.cache_text_prefix`)."""

    def __init__(self, backbone: ClipAdapter, template: str, placeholder: str) -> None:
        self.backbone = backbone
        self.tokens, self.position = backbone.placeholder_position(template, placeholder)
        self.prefix = backbone.cache_text_prefix(self.tokens, self.position) if backbone.text_is_causal else None

    def __call__(self, token: Tensor) -> Tensor:
        e, b = token.shape[:2]
        flat = token.flatten(0, 1)
        if self.prefix is not None:
            absorbed = self.backbone.encode_after_prefix(self.prefix, flat)
        else:
            absorbed = self.backbone.encode_text_tokens(self.tokens.expand(e * b, -1), self.position, flat)
        return absorbed.view(e, b, -1)


def placeholder_embeddings(
    backbone: ClipAdapter, tokens: Tensor, position: int, token: Tensor, context: Tensor | None = None
) -> Tensor:
    """Input embeddings `[E, B, S, W]` of one prompt's tokens `[1, S]` for E·B absorptions: the token at `position`
    replaced by `token` `[E, B, W]` and, with a learned context `[E, n, W]`, the first n word positions by it."""
    e, b = token.shape[:2]
    with torch.no_grad():
        base = backbone.token_embedding(tokens[0])  # [S, W]
    start = backbone.text_start
    pieces = [base[None, None, :start].expand(e, b, start, -1)]
    if context is not None:
        n = context.shape[1]
        pieces.append(context[:, None].to(base.dtype).expand(e, b, n, -1))
        start += n
    pieces += [base[start:position].expand(e, b, -1, -1), token[:, :, None].to(base.dtype)]
    pieces.append(base[position + 1 :].expand(e, b, -1, -1))
    return torch.cat(pieces, dim=2)


def text_block_index(layer: int, depth: int, what: str) -> int:
    """A text block index (negative counts from the end) → non-negative; outside the tower is a `ConfigError`."""
    if not -depth <= layer < depth:
        raise ConfigError(
            f"{what} {layer} is outside the {depth}-block text tower (use 0..{depth - 1} or -{depth}..-1)"
        )
    return layer % depth


class PromptTokens:
    """Token ids `[E, K, T]` and pooled positions `[E, K]` of each episode's class prompts, kept while the episodes'
    class names repeat (training asks for them every step).

    Args:
        backbone: the adapter (its tokenizer).
        prompt: the prompt of one class name.
        context: with learned context vectors, (the setting's name, its words, n): the words' first n tokens must
            stand unchanged right after the start token of every prompt, where the vectors replace them.
    """

    def __init__(
        self, backbone: ClipAdapter, prompt: Callable[[str], str], context: tuple[str, str, int] | None = None
    ) -> None:
        self.backbone, self.prompt, self.context = backbone, prompt, context
        self._last: tuple[list[list[str]], Tensor, Tensor] | None = None
        self.pooled_range: tuple[int, int] | None = None  # of the last call's pooled positions, read once

    def __call__(self, class_names: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        names = [list(episode) for episode in class_names]
        if self._last is not None and self._last[0] == names:
            return self._last[1], self._last[2]
        tokens = self.backbone.tokenize([self.prompt(name) for episode in names for name in episode])
        if self.context is not None:
            setting, words, n = self.context
            start = self.backbone.text_start
            alone = self.backbone.content_tokens(words)[:n].to(tokens.device)
            if len(alone) < n or not bool((tokens[:, start : start + n] == alone).all()):
                raise ConfigError(f"{setting} {words!r} does not tokenize alike before class names")
        pooled = self.backbone.pool_positions(tokens)
        self.pooled_range = (int(pooled.min()), int(pooled.max()))
        shape = (len(names), len(names[0]))
        self._last = (names, tokens.view(*shape, -1), pooled.view(shape))
        return self._last[1], self._last[2]


class TextSide:
    """Class text features `[E, K, C]` for E episodes: final, and after chosen text blocks (e.g. TIR's text layer).

    Args:
        backbone: the adapter.
        config: the resolved run config (`prompt.context`, `lora.towers`, `lora`, `train.template`).
    """

    def __init__(self, backbone: ClipAdapter, config: RunConfig) -> None:
        self.backbone = backbone
        self.config = config
        self.context_words = config.prompt.context or ""
        self.text_lora = config.lora.towers in ("text", "both")
        self._frozen_final = ClassText(backbone, config.train.template)  # normalized
        self._frozen_blocks = ClassText(backbone, config.train.template, ALL_BLOCKS, normalize=False)  # raw
        self.context: nn.Parameter | None = None
        self.lora: EpisodeLoRA | None = None
        self._context_init: Tensor | None = None
        context = None
        if self.context_words:
            self._context_init = self._context_embeddings(self.context_words)
            context = ("prompt.context", self.context_words, self._context_init.shape[0])
        self._tokens = PromptTokens(backbone, self._prompt, context)

    @property
    def trainable(self) -> bool:
        """Whether the text side learns (then its features are recomputed every step)."""
        return bool(self.context_words) or self.text_lora

    def _context_embeddings(self, words: str) -> Tensor:
        """Token embeddings `[n, W]` of the context words (their tokens, without start or end tokens)."""
        tokens = self.backbone.content_tokens(words)
        if len(tokens) == 0:
            raise ConfigError(f"prompt.context {words!r} has no tokens")
        with torch.no_grad():
            return self.backbone.token_embedding(tokens).float().clone()

    def start(self, seed: int, episodes: Sequence[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Fresh learned state for these episodes; returns (LoRA tensors for AdamW, context tensors for SGD)."""
        device = self.backbone.device
        lora_params: list[Tensor] = []
        context_params: list[Tensor] = []
        if self._context_init is not None:
            init = self._context_init.to(device)
            self.context = nn.Parameter(init.expand(len(episodes), *init.shape).clone())
            context_params.append(self.context)
        if self.text_lora:
            cfg = self.config.lora
            dropout = None
            if cfg.dropout > 0:
                dropout = [torch_stream(seed, i, "text_dropout", device) for i in episodes]
            self.lora = EpisodeLoRA(
                cfg,
                self.backbone.num_text_blocks,
                self.backbone.text_width,
                [torch_stream(seed, i, "text_lora_init") for i in episodes],
                dropout,
            ).to(device)
            self.lora.train()
            lora_params.extend(self.lora.parameters())
        return lora_params, context_params

    def train(self, mode: bool = True) -> None:
        if self.lora is not None:
            self.lora.train(mode)

    def features(
        self,
        class_names: Sequence[Sequence[str]],
        layers: Sequence[int] = (),
        skip_blocks: Sequence[int] = (),
        block_scale: dict[int, float] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Class features: final, L2-normalized `[E, K, C]`, and one raw (unnormalized) `[E, K, C]` per text block in
        `layers`: the pooled token after that block through the final norm and projection (fp32).

        Frozen: cached, no gradient. Learned: computed now from the current context and LoRA (with gradients when
        grad mode is on), with `skip_blocks` and `block_scale` as `ClipAdapter.encode_text_embeddings` takes them
        (learned side only: the frozen side is varied by the lost-layer probe itself).
        """
        depth = self.backbone.num_text_blocks
        blocks = [text_block_index(layer, depth, "text layer") for layer in layers]
        if not self.trainable:
            if not blocks:
                return self._frozen_final(class_names), []
            every_block = self._frozen_blocks(class_names)  # [E, K, L, C], one text pass per class name
            return self._frozen_final(class_names), [every_block[:, :, b] for b in blocks]
        tokens, pooled = self._tokens(class_names)
        e, k = tokens.shape[:2]
        if self.lora is not None:
            self.lora.dropout_layout = (k, tokens.shape[2])  # masks drawn at full length: see EpisodeLoRA
        embeddings = self.backbone.token_embedding(tokens)  # [E, K, T, W]
        if self.context is not None:
            n = self.context.shape[1]
            context = self.context[:, None].to(embeddings.dtype).expand(e, k, n, -1)
            start = self.backbone.text_start
            embeddings = torch.cat([embeddings[:, :, :start], context, embeddings[:, :, start + n :]], dim=2)
        output = self.backbone.encode_text_embeddings(
            embeddings,
            pooled,
            self.lora if self.lora is not None else plain_qkv,
            layers=blocks,
            skip_blocks=skip_blocks,
            block_scale=block_scale,
            pooled_range=self._tokens.pooled_range,
        )
        final = F.normalize(output.features.float(), dim=-1)
        return final, [] if output.layer_features is None else list(output.layer_features.float())

    def trained_tensors(self) -> list[tuple[Tensor, int]]:
        """The text side's trained tensors for DGSO: the LoRA factors (`[E, P, ...]`) and the context (one)."""
        tensors = [(t, t.shape[1]) for t in self.lora.tensors()] if self.lora is not None else []
        return tensors + ([(self.context, 1)] if self.context is not None else [])

    def absorber(self, placeholder: str) -> Callable[[Tensor], Tensor]:
        """VtT's absorption through this text side: tokens `[E, B, W]` → features `[E, B, C]`, each token in place
        of the class name of the class prompt. Frozen: the template through the frozen tower (its prefix cached when
        the tower is causal). Learned: `"{context} X."` with the current context and text LoRA, with gradients."""
        if not self.trainable:
            return TemplateAbsorber(self.backbone, self.config.train.template, placeholder)
        tokens, position = self.backbone.placeholder_position(f"{self.context_words} {{}}.", placeholder)
        pooled_at = self.backbone.pool_positions(tokens)  # [1]
        span = (int(pooled_at[0]),) * 2  # read once, not every step

        def absorb(token: Tensor) -> Tensor:
            e, b = token.shape[:2]
            embeddings = placeholder_embeddings(self.backbone, tokens, position, token, self.context)
            if self.lora is not None:
                self.lora.dropout_layout = (b, tokens.shape[1])
            projection = self.lora if self.lora is not None else plain_qkv
            return self.backbone.encode_text_embeddings(
                embeddings, pooled_at.expand(e, b), projection, pooled_range=span
            ).features

        return absorb

    def _prompt(self, name: str) -> str:
        """The class prompt: `"{context} {name}."` with a learned context, else `train.template`."""
        return f"{self.context_words} {name}." if self.context_words else self.config.train.template.format(name)
