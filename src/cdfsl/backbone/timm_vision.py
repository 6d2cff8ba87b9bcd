"""Vision towers built on timm trunks (open_clip's `TimmModel`): PE-Core and SigLIP / SigLIP2.

The only module that knows timm internals. It runs a trunk block by block, as the adapter runs open_clip's own ViTs,
so the methods get the same interface (`cdfsl.backbone.towers.VisionTower`) from either: an episode axis, a pluggable
q/k/v projection (LoRA on the three slices of the packed `qkv` Linear), block-input hooks, per-block pooled features
and deep prompts.

Supported trunks: timm `VisionTransformer` pooled by attention (SigLIP / SigLIP2: no CLS token, the
`AttentionPoolLatent` head, `map`) and `Eva` with `AttentionRope` (PE-Core: a CLS token, except bigG, and rotary
position embeddings on the patches; pooled by attention or by the CLS token), with pre-norm blocks and a plain patch
projection. Anything else (post-norm blocks, EVA-01/02's separate q/v biases,
gated attention, average pooling) is refused (`TimmVisionTower.refusal` says why).

Choices the open_clip ViT path does not need:
- Pooled features: the trunk's own head, `fc_norm(pool(norm(x)))`, its `head` and open_clip's `visual.head`. With deep
  prompts the P prompt tokens are left out of the pooling (they act through attention only, as with a CLS token).
- Per-token features (TIR, the sink probe): each token pooled alone, i.e. the pooling head applied to a one-token
  sequence. For CLS pooling that is the token through the final norm and projection, as on open_clip's ViTs; for
  attention pooling the latent query's softmax over one key is 1, so the feature is the value path of that token
  through the head's projection and MLP, then the projection to the joint space.
- Rotary embeddings (PE-Core) rotate the M patches only; the CLS token and prompt tokens are not rotated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import Tensor, nn

from cdfsl.backbone.towers import QkvProjection, square_side
from cdfsl.errors import BackboneError

_TRUNKS = ("VisionTransformer", "Eva")
_BLOCKS = ("Block", "EvaBlock")
_ATTENTIONS = ("Attention", "AttentionRope")


class TimmVisionTower:
    """The vision tower of an open_clip `TimmModel`, with the `VisionTower` interface (`cdfsl.backbone.towers`).

    Args:
        visual: open_clip's `TimmModel` (`.trunk` a timm model, `.head` open_clip's projection, often empty).
        name: the backbone's name, for error messages.
    """

    def __init__(self, visual: nn.Module, name: str) -> None:
        self.visual = visual
        self.trunk = visual.trunk
        why = self.refusal(self.trunk)
        if why is not None:
            raise BackboneError(
                f"backbone {name!r}: its timm vision trunk {why}; cdfsl runs the PE-Core and SigLIP / SigLIP2 trunks "
                "(`cdfsl backbones` lists them)"
            )
        self.prefix_tokens = int(self.trunk.num_prefix_tokens)
        self.has_cls = getattr(self.trunk, "cls_token", None) is not None
        self.num_patches = int(self.trunk.patch_embed.num_patches)
        self.width = int(self.trunk.embed_dim)
        self.image_size = square_side(visual.image_size)

    @staticmethod
    def refusal(trunk: nn.Module) -> str | None:
        """Why cdfsl cannot run `trunk` block by block, or None when it can."""
        if type(trunk).__name__ not in _TRUNKS:
            return f"is a {type(trunk).__name__}, not a ViT"
        if type(trunk.patch_embed).__name__ != "PatchEmbed":
            return f"embeds patches with a {type(trunk.patch_embed).__name__}, not a plain patch projection"
        if getattr(trunk, "dynamic_img_size", False) or getattr(trunk, "rope_mixed", False):
            return "uses dynamic image sizes or mixed rotary embeddings"
        if getattr(trunk, "reg_token", None) is not None or getattr(trunk, "num_reg_tokens", 0):
            return "has register tokens"
        for block in trunk.blocks:
            attn = block.attn
            if type(block).__name__ not in _BLOCKS or type(attn).__name__ not in _ATTENTIONS:
                return f"has {type(block).__name__} blocks with {type(attn).__name__}"
            if getattr(attn, "qkv", None) is None or getattr(attn, "gate", None) is not None:
                return "has separate or gated q/k/v projections"
        pooled_by_attention = getattr(trunk, "attn_pool", None) is not None
        if type(trunk).__name__ == "VisionTransformer" and not pooled_by_attention:
            return f"pools by {trunk.global_pool!r}; cdfsl runs timm ViTs pooled by attention (map), as SigLIP's"
        if not pooled_by_attention and (trunk.global_pool != "token" or trunk.cls_token is None):
            return f"pools by {trunk.global_pool!r}; cdfsl needs attention (map) or CLS-token pooling"
        if pooled_by_attention and not getattr(trunk, "pool_include_prefix", True) and trunk.num_prefix_tokens:
            return "pools the patches only, leaving out its prefix tokens"
        return None

    # ------------------------------------------------------------------ structure
    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def qkv_parameters(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """The packed q/k/v projection of block `layer`: weight `[3D, D]`, bias `[3D]` or None."""
        qkv = self.blocks[layer].attn.qkv
        return qkv.weight, qkv.bias

    # ------------------------------------------------------------------ passes
    def embed(self, images: Tensor, prompts: Tensor | None = None) -> Tensor:
        """Normalized images `[N, 3, H, W]` → tokens entering block 0 `[N, prefix + M (+ P), D]` (prompts appended
        after the positional embedding, before the pre-norm, as on open_clip's ViTs)."""
        trunk = self.trunk
        x = trunk.patch_embed(images.to(trunk.patch_embed.proj.weight.dtype))
        x = trunk._pos_embed(x)
        if isinstance(x, tuple):  # Eva returns the rotary embedding beside the tokens
            x = x[0]
        if prompts is not None:
            x = torch.cat([x, prompts.to(x.dtype)], dim=1)
        return trunk.norm_pre(x)

    def _rope(self) -> Tensor | None:
        rope = getattr(self.trunk, "rope", None)
        return rope.get_embed() if rope is not None else None

    def block(
        self, layer: int, x: Tensor, qkv_projection: QkvProjection, want_cls_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """One block over E episodes: `x` `[E, B, T, D]` → `[E, B, T, D]` (and the CLS query's attention
        `[E, B, heads, T]` when asked)."""
        block = self.blocks[layer]
        attn = block.attn
        e, b, t, d = x.shape
        h = block.norm1(x)
        weight, bias = self.qkv_parameters(layer)
        qkv = qkv_projection(layer, h.reshape(e, b * t, d), weight, bias).reshape(e * b, t, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = self._rope()
        if rope is not None:
            half = getattr(attn, "rotate_half", False)
            q, k = self._rotate(q, rope, half), self._rotate(k, rope, half)
        out = F.scaled_dot_product_attention(q, k, v)
        cls_attention = None
        if want_cls_attention:  # the adapter refuses it for a tower without a CLS token
            logits = (q[:, :, :1] @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
            cls_attention = logits.float().softmax(dim=-1)[:, :, 0].reshape(e, b, attn.num_heads, t)
        attended = attn.proj(attn.norm(out.transpose(1, 2).reshape(e * b, t, -1))).reshape(e, b, t, d)
        x = x + self._scale(block, 1, attended)
        return x + self._scale(block, 2, block.mlp(block.norm2(x))), cls_attention

    def _rotate(self, x: Tensor, rope: Tensor, half: bool) -> Tensor:
        """Rotate the M patch tokens of `x` `[N, heads, T, d]`; prefix and prompt tokens stay as they are."""
        start, end = self.prefix_tokens, self.prefix_tokens + self.num_patches
        layout = {"half": True} if half else {}  # timm before 1.0.20 has only the interleaved layout, no `half`
        patches = apply_rot_embed_cat(x[:, :, start:end], rope.to(x.dtype), **layout).type_as(x)
        return torch.cat([x[:, :, :start], patches, x[:, :, end:]], dim=2)

    @staticmethod
    def _scale(block: nn.Module, branch: int, update: Tensor) -> Tensor:
        """A residual branch's layer scale: timm's `ls1`/`ls2` modules (ViT) or `gamma_1`/`gamma_2` vectors (Eva)."""
        module = getattr(block, f"ls{branch}", None)
        if module is not None:
            return module(update)
        gamma = getattr(block, f"gamma_{branch}", None)
        return update if gamma is None else gamma.to(update.dtype) * update

    def pool(self, x: Tensor) -> Tensor:
        """Image tokens `[..., T, D]` (prefix and patches, no prompts) → pooled features in the joint space
        `[..., C]`, as the trunk's forward head and open_clip's projection compute them."""
        lead = x.shape[:-2]
        flat = x.reshape(-1, *x.shape[-2:])
        pooled = self.visual.head(self.trunk.forward_head(self.trunk.norm(flat)))
        return pooled.reshape(*lead, pooled.shape[-1])

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """Hidden tokens `[..., D]` → each token pooled alone, in the joint space `[..., C]` (module docstring)."""
        trunk, lead = self.trunk, tokens.shape[:-1]
        x = trunk.norm(tokens.reshape(-1, 1, tokens.shape[-1]))
        x = trunk.attn_pool(x) if trunk.attn_pool is not None else x[:, 0]
        pooled = self.visual.head(trunk.head(trunk.fc_norm(x)))
        return pooled.reshape(*lead, pooled.shape[-1])
