"""The backbone adapter: the only module that knows open_clip internals.

It runs both towers with an explicit block loop over the model's own weights, which gives the rest of the code what
the methods need without forking CLIP: an episode axis through the vision tower, a pluggable q/k/v projection (LoRA),
token recalibration at block inputs (TIR), per-layer hidden tokens and pooled features (VtT, diagnostics), text
features per block, text encoding with one token embedding replaced (VtT absorption; the prompt's fixed prefix
cached once), block skipping or residual scaling in the text tower (the lost-layer probe), and deep prompts: learned
tokens written into prompt slots at block inputs of either tower (MaPLe; see `encode_images` and
`encode_text_embeddings`, argument `prompts`). Tests check the loop against open_clip's own `encode_image` and
`encode_text`.

Deep prompts, the same rule in both towers: `prompts[l]` holds the P prompt tokens at the input of block l, for
l < J = len(prompts); blocks J and later carry on whatever block J - 1 made of the P slots (the MaPLe release does not
drop them). Vision: the slots are P extra tokens after the image's own (CLS and patch) tokens; `prompts[0]` is
appended to the embedded image before the pre-norm (without positional embedding), `prompts[l >= 1]` replace the last
P tokens entering block l. The pooled output is still pooled from the image's own tokens, and patches keep their
indices. Text: the slots are the positions of the first P words (after the start token, if the tokenizer has one);
`prompts[0]` replaces those token embeddings before the positional embedding is added, `prompts[l >= 1]` replace the P
hidden tokens entering block l. Prompts are `[E, P, D]` (shared by an
episode's images or prompts) or `[E, B, P, D]` (one set per image or prompt).

Vision towers: open_clip's own `VisionTransformer` (OpenAI CLIP, LAION and DataComp ViTs, the tiny model;
`ClipVisionTower` below) or a timm trunk inside open_clip's `TimmModel` (PE-Core, SigLIP / SigLIP2;
`cdfsl.backbone.timm_vision`). Both give the `VisionTower` interface; the image tokens are `prefix` tokens (a CLS token
or none), then the M patches, then any prompt tokens. Text towers: open_clip's `TextTransformer` of
`ResidualAttentionBlock`s, causal with end-token pooling (CLIP, PE-Core) or bidirectional with last-token pooling
(SigLIP). Hugging Face text towers and ResNets are rejected with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdfsl.backbone.timm_vision import TimmVisionTower
from cdfsl.backbone.towers import BlockInputHook, QkvProjection, VisionTower, plain_qkv, square_side
from cdfsl.errors import BackboneError


@dataclass
class VisionOutput:
    """Results of one vision pass over `[E, B]` images.

    Attributes:
        features: final image features `[E, B, C]` (not normalized).
        layer_features: the pooled feature after every block (the tower's own pooling and projection), `[L, E, B, C]`
            (if asked).
        block_inputs: hidden tokens entering each block (after any recalibration), list of `[E, B, T, D]` (if asked).
        cls_attention: per block, the CLS query's attention over all tokens `[E, B, heads, T]` (if asked).
    """

    features: Tensor
    layer_features: Tensor | None = None
    block_inputs: list[Tensor] = field(default_factory=list)
    cls_attention: list[Tensor] = field(default_factory=list)


@dataclass
class TextOutput:
    """Results of one text pass over `[E, N]` prompts.

    Attributes:
        features: final pooled features `[E, N, C]` (not normalized).
        layer_features: pooled features after the requested blocks `[L', E, N, C]` (if asked).
    """

    features: Tensor
    layer_features: Tensor | None = None


@dataclass
class TextPrefix:
    """A prompt's fixed prefix through the frozen text tower (`ClipAdapter.cache_text_prefix`).

    Attributes:
        keys_values: per text block, keys and values of the P prefix tokens, each `[1, heads, P, W/heads]`.
        rest: embeddings (with positions) of the T − 1 tokens after the replaced one, up to the pooled one.
        position_embedding: the positional embedding of the replaced token `[W]`.
        mask: the causal mask rows of the T tokens from the replaced one over all P + T `[T, P + T]`.
    """

    keys_values: list[tuple[Tensor, Tensor]]
    rest: Tensor
    position_embedding: Tensor
    mask: Tensor


def _split_heads(block: nn.Module, qkv: Tensor) -> Tensor:
    """Fused `qkv` `[N, T, 3D]` of an open_clip block → stacked q, k, v `[3, N, heads, T, D/heads]`."""
    n, t, d3 = qkv.shape
    heads = block.attn.num_heads
    return qkv.view(n, t, 3, heads, d3 // (3 * heads)).permute(2, 0, 3, 1, 4)


def _attention(
    block: nn.Module,
    x: Tensor,
    qkv: Tensor,
    attn_mask: Tensor | None,
    want_cls_attention: bool = False,
    prefix: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention of open_clip `block` from a precomputed fused `qkv` `[N, T, 3D]`; returns `[N, T, D]`.

    `prefix`: cached keys and values `[1, heads, P, D/heads]` of P earlier tokens, attended before x's own (then
    `attn_mask` is `[T, P + T]`). With `want_cls_attention`, also the CLS query's attention weights `[N, heads, T]`.
    """
    attn: nn.MultiheadAttention = block.attn
    n, t, d = x.shape
    q, k, v = _split_heads(block, qkv)
    if prefix is not None:
        k = torch.cat([prefix[0].expand(n, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix[1].expand(n, -1, -1, -1), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    cls_attention = None
    if want_cls_attention:
        logits = (q[:, :, :1] @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        cls_attention = logits.float().softmax(dim=-1)[:, :, 0]
    out = out.transpose(1, 2).reshape(n, t, d)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias), cls_attention


def _mlp(block: nn.Module, x: Tensor) -> Tensor:
    return block.ls_2(block.mlp(block.ln_2(x)))


def _check_open_clip_stack(tower: nn.Module, needed: Sequence[str], name: str, refusal: str) -> None:
    """Raise `BackboneError` unless `tower` has the attributes `needed` (else `refusal`) and a batch-first
    `transformer` of blocks with `nn.MultiheadAttention`, as open_clip's own towers are."""
    if not all(hasattr(tower, attribute) for attribute in needed):
        raise BackboneError(refusal)
    if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in tower.transformer.resblocks):
        raise BackboneError(f"backbone {name!r} uses custom attention blocks, which cdfsl does not support")
    if not getattr(tower.transformer, "batch_first", True):
        raise BackboneError(f"backbone {name!r} runs its transformer sequence-first; not supported")


class ClipVisionTower:
    """open_clip's own `VisionTransformer`: a CLS token, learned positions, pooled by the CLS token through `ln_post`
    and `proj` (per-token features take the same path)."""

    prefix_tokens = 1
    has_cls = True

    def __init__(self, visual: nn.Module, name: str) -> None:
        _check_open_clip_stack(
            visual,
            ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post", "proj"),
            name,
            f"backbone {name!r} has a vision tower cdfsl cannot run (a ResNet or another design); choose a ViT such as "
            "ViT-B-16, PE-Core-B-16 or ViT-B-16-SigLIP2 (`cdfsl backbones` lists them)",
        )
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok":
            raise BackboneError(f"backbone {name!r} does not pool the CLS token; cdfsl needs a CLS-token ViT")
        self.visual = visual
        self.width = int(visual.class_embedding.shape[0])
        self.image_size = square_side(visual.image_size)
        self.num_patches = int(visual.positional_embedding.shape[0]) - 1

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def qkv_parameters(self, layer: int) -> tuple[Tensor, Tensor | None]:
        attn = self.blocks[layer].attn
        return attn.in_proj_weight, attn.in_proj_bias

    def embed(self, images: Tensor, prompts: Tensor | None = None) -> Tensor:
        """Normalized images `[N, 3, H, W]` → tokens entering block 0 `[N, 1 + M, D]`.

        `prompts` `[N, P, D]`: tokens appended after the patch tokens, after the positional embedding and before
        `ln_pre` (deep prompting's first-block prompts, as VPT and MaPLe add them); then the result is
        `[N, 1 + M + P, D]`.
        """
        visual = self.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        if prompts is not None:
            x = torch.cat([x, prompts.to(x.dtype)], dim=1)
        return visual.ln_pre(x)

    def block(
        self, layer: int, x: Tensor, qkv_projection: QkvProjection, want_cls_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        block = self.blocks[layer]
        e, b, t, d = x.shape
        h = block.ln_1(x)
        attn = block.attn
        qkv = qkv_projection(layer, h.reshape(e, b * t, d), attn.in_proj_weight, attn.in_proj_bias)
        attended, cls_attention = _attention(
            block, x.reshape(e * b, t, d), qkv.reshape(e * b, t, 3 * d), None, want_cls_attention
        )
        x = x + block.ls_1(attended).reshape(e, b, t, d)
        x = x + _mlp(block, x)
        if cls_attention is not None:
            cls_attention = cls_attention.reshape(e, b, *cls_attention.shape[1:])
        return x, cls_attention

    def pool(self, x: Tensor) -> Tensor:
        return self.project_tokens(x[..., 0, :])

    def project_tokens(self, tokens: Tensor) -> Tensor:
        return self.visual.ln_post(tokens) @ self.visual.proj


class ClipAdapter(nn.Module):
    """A frozen open_clip CLIP model seen through one small interface.

    Args:
        model: an open_clip `CLIP` or `CustomTextCLIP`.
        tokenizer: the model's open_clip tokenizer.
        mean, std: the model's image normalization (3 floats each).
        name: a label for reports (backbone name).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[..., Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        name: str,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.visual = model.visual
        self.text = model.text if hasattr(model, "text") else model
        self.vision_tower: VisionTower = (
            TimmVisionTower(self.visual, name) if hasattr(self.visual, "trunk") else ClipVisionTower(self.visual, name)
        )
        self._check_text_supported()
        self._text_start: int | None = None

    # ------------------------------------------------------------------ structure
    def _check_text_supported(self) -> None:
        _check_open_clip_stack(
            self.text,
            ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"),
            self.name,
            f"backbone {self.name!r} has a Hugging Face or other text tower, which cdfsl does not run; choose a model "
            "with open_clip's own text transformer (`cdfsl backbones` lists them)",
        )

    @property
    def vision_blocks(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    @property
    def text_blocks(self) -> nn.ModuleList:
        return self.text.transformer.resblocks

    @property
    def num_vision_blocks(self) -> int:
        return len(self.vision_blocks)

    @property
    def num_text_blocks(self) -> int:
        return len(self.text_blocks)

    @property
    def vision_width(self) -> int:
        return self.vision_tower.width

    @property
    def text_width(self) -> int:
        return int(self.text.token_embedding.weight.shape[1])

    @property
    def embed_dim(self) -> int:
        """C, the joint space's width (read from the text tower's projection; the vision tower ends there too)."""
        projection = self.text.text_projection
        if projection is None:
            return self.text_width
        return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])

    @property
    def image_size(self) -> int:
        return self.vision_tower.image_size

    @property
    def num_patches(self) -> int:
        return self.vision_tower.num_patches

    @property
    def patch_start(self) -> int:
        """Index of the first patch token (1 after a CLS token, 0 without one); patches are `patch_start` ..
        `image_tokens - 1`, and prompt tokens, when there are any, follow them."""
        return self.vision_tower.prefix_tokens

    @property
    def image_tokens(self) -> int:
        """Tokens of an image before any prompt tokens: prefix (CLS) and patches."""
        return self.vision_tower.prefix_tokens + self.vision_tower.num_patches

    @property
    def has_cls_token(self) -> bool:
        return self.vision_tower.has_cls

    def vision_qkv_weights(self) -> list[Tensor]:
        """The frozen fused q/k/v weight `[3D, D]` of every vision block (what vision LoRA updates)."""
        return [self.vision_tower.qkv_parameters(layer)[0] for layer in range(self.num_vision_blocks)]

    def text_qkv_weights(self) -> list[Tensor]:
        """The frozen fused q/k/v weight `[3W, W]` of every text block."""
        return [block.attn.in_proj_weight for block in self.text_blocks]

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def logit_scale(self) -> float:
        """The model's own learned logit scale, `exp(logit_scale)` (100 for OpenAI CLIP; 1/0.07 untrained)."""
        return float(self.model.logit_scale.detach().exp())

    # ------------------------------------------------------------------ vision
    def normalize(self, images: Tensor) -> Tensor:
        """`[..., 3, H, W]` floats in [0, 1] → normalized with the model's mean and std."""
        return (images - self.mean) / self.std

    def embed_images(self, images: Tensor, prompts: Tensor | None = None) -> Tensor:
        """Normalized images `[N, 3, H, W]` → tokens entering block 0 `[N, image_tokens (+ P), D]` (`prompts`
        `[N, P, D]` appended after the patches before the tower's pre-norm)."""
        return self.vision_tower.embed(images, prompts)

    def vision_block(
        self,
        layer: int,
        x: Tensor,
        qkv_projection: QkvProjection = plain_qkv,
        want_cls_attention: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """One vision block over E episodes: `x` `[E, B, T, D]` → `[E, B, T, D]` (and CLS attention `[E, B, H, T]`)."""
        return self.vision_tower.block(layer, x, qkv_projection, want_cls_attention)

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """Hidden tokens `[..., D]` → per-token features in the joint space `[..., C]` (not normalized): through the
        final norm and projection on CLS-pooled towers, each token pooled alone on attention-pooled ones."""
        return self.vision_tower.project_tokens(tokens)

    def pool_image_tokens(self, x: Tensor) -> Tensor:
        """Tokens `[..., T, D]` (prompt tokens, if any, after the image's own) → pooled features `[..., C]`."""
        return self.vision_tower.pool(x[..., : self.image_tokens, :])

    def encode_images(
        self,
        images: Tensor,
        qkv_projection: QkvProjection = plain_qkv,
        block_input_hook: BlockInputHook | None = None,
        layer_features: bool = False,
        keep_block_inputs: bool = False,
        keep_cls_attention: bool = False,
        prompts: Sequence[Tensor] = (),
    ) -> VisionOutput:
        """Encode normalized images `[E, B, 3, H, W]` for E episodes at once.

        `qkv_projection` supplies each block's q/k/v (per-episode LoRA); `block_input_hook(layer, x)` may rewrite the
        tokens entering block `layer` (TIR). The frozen weights are shared: the E·B images form one batch.

        `prompts`: deep prompts (module docstring), `prompts[l]` `[E, P, D]` or `[E, B, P, D]` for blocks l < J; the
        tokens are then `[E, B, image_tokens + P, D]` in every block (the hook, block inputs and CLS attention see all
        of them) and the features are still pooled from the image's own tokens. Empty: the plain path, unchanged.
        """
        if keep_cls_attention and not self.has_cls_token:
            raise BackboneError(f"backbone {self.name!r} has no CLS token, so its CLS attention cannot be recorded")
        e, b = images.shape[:2]
        slots = self._prompt_slots(prompts, e, b)
        first = slots[0].flatten(0, 1) if slots else None
        x = self.embed_images(images.flatten(0, 1), first)
        x = x.reshape(e, b, *x.shape[1:])
        per_layer: list[Tensor] = []
        output = VisionOutput(features=x)
        for layer in range(self.num_vision_blocks):
            if 0 < layer < len(slots):
                x = torch.cat([x[:, :, : -slots[layer].shape[2]], slots[layer].to(x.dtype)], dim=2)
            if block_input_hook is not None:
                x = block_input_hook(layer, x)
            if keep_block_inputs:
                output.block_inputs.append(x)
            x, cls_attention = self.vision_block(layer, x, qkv_projection, keep_cls_attention)
            if cls_attention is not None:
                output.cls_attention.append(cls_attention)
            if layer_features:
                per_layer.append(self.pool_image_tokens(x))
        output.features = per_layer[-1] if layer_features else self.pool_image_tokens(x)
        if layer_features:
            output.layer_features = torch.stack(per_layer)
        return output

    @staticmethod
    def _prompt_slots(prompts: Sequence[Tensor], e: int, b: int) -> list[Tensor]:
        """Deep prompts, each `[E, P, D]` or `[E, B, P, D]`, as `[E, B, P, D]` (expanded, not copied); one P for all."""
        slots = [p[:, None].expand(e, b, *p.shape[1:]) if p.dim() == 3 else p for p in prompts]
        if slots and (any(s.shape[:2] != (e, b) for s in slots) or len({s.shape[2] for s in slots}) != 1):
            shapes = ", ".join(str(tuple(p.shape)) for p in prompts)
            raise ValueError(f"deep prompts must be [E={e}, P, D] or [E, B={b}, P, D] with one P; got {shapes}")
        return slots

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Texts → token ids `[K, context]` on the model's device."""
        return self.tokenizer(list(texts)).to(self.device)

    def pool_positions(self, tokens: Tensor) -> Tensor:
        """Index of the pooled (EOS) token of each sequence `[K]`."""
        pool_type = getattr(self.text, "text_pool_type", getattr(self.text, "pool_type", "argmax"))
        if pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if pool_type == "eos":
            eos_id = getattr(self.text, "text_eos_id", getattr(self.text, "eos_id", None))
            return (tokens == eos_id).int().argmax(dim=-1)
        if pool_type == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
        raise BackboneError(f"text pooling {pool_type!r} is not supported")

    def _causal_mask(self) -> Tensor | None:
        return getattr(self.text, "attn_mask", None)

    @property
    def text_is_causal(self) -> bool:
        """Whether text tokens attend only to earlier ones (then a prompt prefix can be cached)."""
        return self._causal_mask() is not None

    def encode_text_tokens(
        self,
        tokens: Tensor,
        replace_position: int | None = None,
        replacement: Tensor | None = None,
        layer_features: bool = False,
        skip_blocks: Sequence[int] = (),
        block_scale: dict[int, float] | None = None,
    ) -> Tensor:
        """Encode token ids `[N, S]` → final text features `[N, C]` (or per-block EOS features `[L, N, C]`).

        Args:
            replace_position: a token position whose embedding is replaced by `replacement` `[N, W]` (VtT absorption).
            layer_features: return the EOS token after every block, through the final norm and projection.
            skip_blocks: text blocks to remove (their input passes straight on).
            block_scale: per block, a factor γ on its residual update: `x + γ · (block(x) − x)`.
        """
        x = self.text.token_embedding(tokens)
        if replace_position is not None:
            if replacement is None:
                raise ValueError("replacement embeddings are required with replace_position")
            x = torch.cat(
                [x[:, :replace_position], replacement[:, None].to(x.dtype), x[:, replace_position + 1 :]],
                dim=1,
            )
        layers = range(self.num_text_blocks) if layer_features else None
        output = self.encode_text_embeddings(
            x[None], self.pool_positions(tokens), layers=layers, skip_blocks=skip_blocks, block_scale=block_scale
        )
        if output.layer_features is not None:
            return output.layer_features[:, 0]
        return output.features[0]

    def encode_text_embeddings(
        self,
        embeddings: Tensor,
        pooled: Tensor,
        qkv_projection: QkvProjection = plain_qkv,
        layers: Sequence[int] | None = None,
        skip_blocks: Sequence[int] = (),
        block_scale: dict[int, float] | None = None,
        prompts: Sequence[Tensor] = (),
        pooled_range: tuple[int, int] | None = None,
    ) -> TextOutput:
        """Encode token embeddings of N prompts for E episodes at once (CoOp contexts, text-tower LoRA, MaPLe).

        Args:
            embeddings: input token embeddings without positions `[E, N, S, W]`.
            pooled: index of each prompt's pooled (EOS) token, `[N]` or `[E, N]`.
            qkv_projection: each text block's q/k/v (per-episode LoRA on the text tower), as in the vision tower.
            layers: text blocks (non-negative indices) whose pooled token is also returned, through the final norm
                and projection, in the order given (a block may be named more than once).
            skip_blocks, block_scale: as in `encode_text_tokens`.
            prompts: deep prompts (module docstring), `prompts[l]` `[E, P, W]` or `[E, N, P, W]` for blocks l < J, in
                positions `text_start` .. `text_start + P - 1` (the first P words' places; before every pooled
                token). `prompts[0]` replaces those embeddings before the positional embedding is added;
                `prompts[l >= 1]` replace the hidden tokens entering block l (a skipped block's input too). Empty:
                the plain path, unchanged.
            pooled_range: the smallest and largest value in `pooled`, when the caller knows them on the host (a
                training step passes them so it never reads `pooled` back from the device); None: read here.

        With a causal mask, tokens after the last pooled token cannot affect any pooled feature, so the sequence is
        cut there.
        """
        e, n = embeddings.shape[:2]
        pooled = pooled.expand(e, n) if pooled.dim() == 1 else pooled
        mask = self._causal_mask()
        x = embeddings
        slots = self._prompt_slots(prompts, e, n)
        if slots:
            width = slots[0].shape[2]
            lowest = pooled_range[0] if pooled_range is not None else int(pooled.min())
            if lowest < self.text_start + width:
                raise ValueError(f"{width} prompt tokens after the start token reach a pooled token")
            x = self._replace_text_slots(x, slots[0])
        if mask is not None:
            length = (pooled_range[1] if pooled_range is not None else int(pooled.max())) + 1
            x, mask = x[:, :, :length], mask[:length, :length].to(x.dtype)
        x = x + self.text.positional_embedding[: x.shape[2]].to(x.dtype)
        episode_rows = torch.arange(e, device=x.device)[:, None]
        prompt_rows = torch.arange(n, device=x.device)[None]
        wanted = list(layers or ())
        found: dict[int, Tensor] = {}
        scale = block_scale or {}
        for layer in range(self.num_text_blocks):
            if 0 < layer < len(slots):
                x = self._replace_text_slots(x, slots[layer])
            if layer not in skip_blocks:
                updated = self.text_block(layer, x, mask, qkv_projection)
                x = x + scale[layer] * (updated - x) if layer in scale else updated
            if layer in wanted:
                found[layer] = self._project_text(x[episode_rows, prompt_rows, pooled])
        stacked = torch.stack([found[layer] for layer in wanted]) if wanted else None
        return TextOutput(features=self._project_text(x[episode_rows, prompt_rows, pooled]), layer_features=stacked)

    def _replace_text_slots(self, x: Tensor, tokens: Tensor) -> Tensor:
        """`x` `[E, N, T, W]` with the P positions from `text_start` on set to `tokens` `[E, N, P, W]`."""
        start = self.text_start
        return torch.cat([x[:, :, :start], tokens.to(x.dtype), x[:, :, start + tokens.shape[2] :]], dim=2)

    @staticmethod
    def _text_qkv(block: nn.Module, x: Tensor) -> Tensor:
        """The fused q/k/v projection of a text block's normalized input: `[N, T, W]` → `[N, T, 3W]`."""
        return F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)

    def text_block(
        self,
        layer: int,
        x: Tensor,
        mask: Tensor | None,
        qkv_projection: QkvProjection = plain_qkv,
        prefix: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Text block `layer` over `[E, N, T, W]` (E episodes of N prompts); `prefix`: cached keys/values attended
        before the tokens' own (see `_attention`)."""
        block = self.text_blocks[layer]
        e, n, t, w = x.shape
        attn = block.attn
        qkv = qkv_projection(layer, block.ln_1(x).reshape(e, n * t, w), attn.in_proj_weight, attn.in_proj_bias)
        attended = _attention(block, x.reshape(e * n, t, w), qkv.reshape(e * n, t, 3 * w), mask, prefix=prefix)
        x = x + block.ls_1(attended[0]).reshape(e, n, t, w)
        return x + _mlp(block, x)

    @torch.no_grad()
    def cache_text_prefix(self, tokens: Tensor, position: int) -> TextPrefix:
        """Run the tokens before `position` of one prompt `[1, S]` through the text tower once and keep, per block,
        their keys and values; `encode_after_prefix` then encodes the rest of the prompt for many replacements of the
        token at `position` without recomputing the prefix (VtT absorption: "a photo of a" is the same every step).

        Valid only with a causal mask, where earlier tokens never see later ones; raises `BackboneError` otherwise.
        """
        mask = self._causal_mask()
        if mask is None:
            raise BackboneError(f"the text tower of {self.name!r} is not causal: a prompt prefix cannot be cached")
        pooled = int(self.pool_positions(tokens)[0])
        if not 0 <= position <= pooled:
            raise ValueError(f"replaced position {position} is not before the pooled token at {pooled}")
        x = self.text.token_embedding(tokens[:, : pooled + 1]) + self.text.positional_embedding[: pooled + 1]
        prefix, rest = x[:, :position], x[0, position + 1 :]
        keys_values = []
        for layer, block in enumerate(self.text_blocks):
            _, k, v = _split_heads(block, self._text_qkv(block, prefix))
            keys_values.append((k, v))
            prefix = self.text_block(layer, prefix[None], mask[:position, :position])[0]
        return TextPrefix(
            keys_values=keys_values,
            rest=rest,
            position_embedding=self.text.positional_embedding[position],
            mask=mask[position : pooled + 1, : pooled + 1],
        )

    def encode_after_prefix(self, prefix: TextPrefix, replacement: Tensor) -> Tensor:
        """Final text features `[N, C]` of the cached prompt with its replaced token's embedding set to `replacement`
        `[N, W]`; equal to `encode_text_tokens(tokens, position, replacement)` up to float rounding."""
        first = replacement.to(prefix.rest.dtype) + prefix.position_embedding
        x = torch.cat([first[:, None], prefix.rest.expand(replacement.shape[0], -1, -1)], dim=1)
        mask = prefix.mask.to(x.dtype)
        for layer, keys_values in enumerate(prefix.keys_values):
            x = self.text_block(layer, x[None], mask, prefix=keys_values)[0]
        return self._project_text(x[:, -1])

    def _project_text(self, pooled: Tensor) -> Tensor:
        x = self.text.ln_final(pooled)
        projection = self.text.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Final text features of prompts `[K, C]` (not normalized)."""
        return self.encode_text_tokens(self.tokenize(prompts))

    def text_layer_features(self, prompts: Sequence[str]) -> Tensor:
        """EOS features after every text block through the final norm and projection `[L, K, C]`."""
        return self.encode_text_tokens(self.tokenize(prompts), layer_features=True)

    def token_embedding(self, token_ids: Tensor) -> Tensor:
        """Token ids → input embeddings `[..., W]` of the text tower."""
        return self.text.token_embedding(token_ids)

    @property
    def text_start(self) -> int:
        """Position of a prompt's first word: 1 after a start token (CLIP's tokenizer), 0 without one."""
        if self._text_start is None:
            empty, word = self.tokenize(["", "a"])
            differ = (empty != word).nonzero()
            if len(differ) == 0:
                raise BackboneError(
                    f"the tokenizer of {self.name!r} gives the same tokens for '' and 'a'; it cannot be used"
                )
            self._text_start = int(differ[0])
        return self._text_start

    def content_length(self, text: str) -> int:
        """How many tokens `text` becomes, without start, end or padding tokens (found by comparing its tokens with
        the empty text's, so it holds for any tokenizer that frames words with fixed tokens)."""
        empty, tokens = self.tokenize(["", text])
        start, length = self.text_start, tokens.shape[0]
        for n in range(length - start + 1):
            if torch.equal(tokens[start + n :], empty[start : length - n]):
                return n
        raise BackboneError(f"cannot tell how many tokens {text!r} is")  # unreachable: n = length - start matches

    def content_tokens(self, text: str) -> Tensor:
        """The token ids of `text`'s words `[n]` (no start, end or padding tokens)."""
        start = self.text_start
        return self.tokenize([text])[0, start : start + self.content_length(text)]

    def placeholder_position(self, template: str, placeholder: str) -> tuple[Tensor, int]:
        """Tokens `[1, S]` of `template` filled with `placeholder`, and the position of the placeholder token.

        Raises `BackboneError` if the placeholder is not a single token.
        """
        tokens = self.tokenize([template.format(placeholder)])
        alone = self.content_tokens(placeholder)
        if len(alone) != 1:
            raise BackboneError(f"VtT placeholder {placeholder!r} is not a single token; choose a short word")
        start = self.text_start + self.content_length(template.split("{}")[0].strip())
        if start >= tokens.shape[1] or int(tokens[0, start]) != int(alone[0]):
            raise BackboneError(f"cannot locate placeholder {placeholder!r} in template {template!r}")
        return tokens, start
