"""VtT — teach the Vision to Think like the Text (vtt.md), as a training extension of the LoRA loop.

Per training step and episode: per-layer CLS features `f^l` and class-text EOS features `t^l` (of each sample's own
class) are interleaved into a 2L-token sequence, fused into μ, and adapted into an absorption token `A` that replaces
the placeholder X in "a photo of a X."; the frozen text encoder turns it into `A'`, and `L_VtT = −mean_b cos(A', f)`.
DGSO removes, per LoRA tensor, the part of the combined gradient that opposes the classification gradient, and
switches `L_VtT` off for the rest of an episode once the recent mean gradient agreement drops to 0 or below.
Nothing of this is used at prediction: `finish()` drops it.

Both feature sets are L2-normalized before fusion (per-layer feature norms differ by orders of magnitude). When the
towers differ in depth, L = the smaller depth and the deeper tower's blocks are taken at evenly spaced depths, always
including its last block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.backbone.lora import EpisodeLoRA
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.methods.base import ClassText
from cdfsl.methods.fusion import ScanningFusion
from cdfsl.seeding import torch_stream


def _correct(g: Tensor, g_ce: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Gradient correction reduced over `dims` (one cosine per remaining index); see `correct_gradient`."""
    dot = (g * g_ce).sum(dim=dims, keepdim=True)
    norm_g = g.norm(dim=dims, keepdim=True)
    norm_ce = g_ce.norm(dim=dims, keepdim=True)
    defined = (norm_g > 0) & (norm_ce > 0)
    cos = torch.where(defined, dot / (norm_g * norm_ce).clamp_min(torch.finfo(g.dtype).tiny), torch.ones_like(dot))
    projection = torch.where(defined, dot / (norm_ce**2).clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(dot))
    corrected = torch.where(cos < 0, g - projection * g_ce, g)
    return corrected, cos.squeeze(dims) if dims else cos


def correct_gradient(g: Tensor, g_ce: Tensor) -> tuple[Tensor, Tensor]:
    """DGSO gradient correction for one parameter.

    Args:
        g: the combined gradient ∂L_comb/∂p (any shape).
        g_ce: the classification gradient ∂L_ce/∂p (same shape).

    Returns:
        (corrected gradient, cos) where cos = cos(g, g_ce) as a scalar tensor. If cos < 0, the component of g along
        g_ce is removed: g − (g · ĝ_ce) ĝ_ce; otherwise g is returned unchanged. A zero gradient (either one) makes
        the cosine undefined: it counts as 1 and nothing changes.
    """
    return _correct(g, g_ce, tuple(range(g.dim())))


class LossSwitch:
    """DGSO's dynamic loss combination for one episode.

    The history starts at `[1.0]`; `update(c)` appends the step's mean cosine c and switches `L_VtT` off for good once
    the mean of the last `window` entries is ≤ 0. Returns whether `L_VtT` is still on.
    """

    def __init__(self, window: int = 50) -> None:
        self.window = window
        self.history = [1.0]
        self.on = True
        self.off_at: int | None = None  # the update (1-based) that switched it off

    def update(self, c: float) -> bool:
        if not self.on:
            return False
        self.history.append(float(c))
        recent = self.history[-self.window :]
        if sum(recent) / len(recent) <= 0:
            self.on = False
            self.off_at = len(self.history) - 1
        return self.on


def aligned_layers(depth: int, count: int) -> list[int]:
    """`count` block indices spread evenly over a `depth`-block tower, ending at its last block."""
    return [round((i + 1) * depth / count) - 1 for i in range(count)]


def scan_sequence(vision: Tensor, text: Tensor, order: str) -> Tensor:
    """Interleave per-layer features into the V-T sequence.

    Args:
        vision: `[L, E, B, C]` (layer 1 … L), text: `[E, B, L, C]`.
        order: `deep_to_shallow` → (f^L, t^L, …, f^1, t^1); otherwise shallow to deep (f^1, t^1, …, f^L, t^L);
            `bidirectional` uses the shallow-to-deep sequence and the fusion also scans it reversed.

    Returns:
        `[E, B, 2L, C]`.
    """
    pairs = torch.stack([vision.permute(1, 2, 0, 3), text], dim=3)  # [E, B, L, 2, C]
    sequence = pairs.flatten(2, 3)
    if order == "deep_to_shallow":
        sequence = pairs.flip(2).flatten(2, 3)
    return sequence


class VttExtension:
    """The VtT objective on top of the LoRA loop (see `methods.lora.TrainingExtension`)."""

    wants_layer_features = True

    def __init__(self, config: RunConfig, backbone: ClipAdapter) -> None:
        self.config = config
        self.vtt = config.vtt
        self.backbone = backbone
        self.tokens, self.position = backbone.placeholder_position(config.train.template, config.vtt.placeholder)
        self.prefix = backbone.cache_text_prefix(self.tokens, self.position) if backbone.text_is_causal else None
        depth = min(backbone.num_vision_blocks, backbone.num_text_blocks)
        self.vision_layers = aligned_layers(backbone.num_vision_blocks, depth)
        self.text_layers = aligned_layers(backbone.num_text_blocks, depth)
        self.layer_text = ClassText(backbone, config.train.template, layer=None)
        self._text_cache: dict[str, Tensor] = {}
        self.fusion: ScanningFusion | None = None
        self.switches: list[LossSwitch] = []
        self.class_layers: Tensor | None = None

    def _class_layer_features(self, class_names: list[list[str]]) -> Tensor:
        """Normalized per-layer class text features `[E, K, L, C]` (frozen text tower: computed once per name)."""
        missing = sorted({n for names in class_names for n in names} - self._text_cache.keys())
        if missing:
            with torch.no_grad():
                prompts = [self.config.train.template.format(n) for n in missing]
                layers = self.backbone.text_layer_features(prompts)[self.text_layers]  # [L, K, C]
                normalized = F.normalize(layers.float(), dim=-1).transpose(0, 1)
            self._text_cache.update(zip(missing, normalized, strict=True))
        return torch.stack([torch.stack([self._text_cache[n] for n in names]) for names in class_names])

    def start(self, batch: EpisodeBatch, lora: EpisodeLoRA) -> list[dict[str, Any]]:
        generators = [torch_stream(batch.seed, i, "vtt_init") for i in batch.indices]
        self.fusion = ScanningFusion(
            generators,
            length=2 * len(self.vision_layers),
            inputs=self.backbone.embed_dim,
            hidden=self.vtt.hidden or self.backbone.embed_dim,
            outputs=self.backbone.text_width,
            kind=self.vtt.fusion,
            layers=self.vtt.ssm_layers,
            state=self.vtt.state,
            bidirectional=self.vtt.scan == "bidirectional",
        ).to(self.backbone.device)
        self.switches = [LossSwitch(self.vtt.window) for _ in batch.indices]
        self.class_layers = self._class_layer_features(batch.class_names)
        return [{"params": list(self.fusion.parameters()), "lr": self.config.resolved_vtt_lr()}]

    def vtt_loss(self, output: VisionOutput, labels: Tensor) -> Tensor:
        """`L_VtT` per episode `[E]` from the vision output of a step and its labels `[E, B]`."""
        assert self.fusion is not None and self.class_layers is not None and output.layer_features is not None
        e, b = labels.shape
        vision = F.normalize(output.layer_features[self.vision_layers].float(), dim=-1)  # [L, E, B, C]
        rows = torch.arange(e, device=labels.device)[:, None]
        text = self.class_layers[rows, labels]  # [E, B, L, C]
        absorption = self.fusion(scan_sequence(vision, text, self.vtt.scan)).flatten(0, 1)  # [E·B, W]
        if self.prefix is not None:
            absorbed = self.backbone.encode_after_prefix(self.prefix, absorption)
        else:
            absorbed = self.backbone.encode_text_tokens(self.tokens.expand(e * b, -1), self.position, absorption)
        cos = F.cosine_similarity(absorbed.float().view(e, b, -1), output.features.float(), dim=-1)
        return -cos.mean(dim=1)

    def backward(self, loss_ce: Tensor, output: VisionOutput, labels: Tensor, lora: EpisodeLoRA) -> None:
        """Fill gradients: plain CE for episodes whose `L_VtT` is off; L_comb with DGSO correction for the rest."""
        active = torch.tensor([s.on for s in self.switches], device=loss_ce.device)
        if not bool(active.any()):
            loss_ce.sum().backward()
            return
        loss_vtt = self.vtt_loss(output, labels)
        combined = loss_ce + self.vtt.beta * loss_vtt * active.to(loss_vtt.dtype)
        if not self.vtt.dgso:
            combined.sum().backward()
            return
        tensors = lora.tensors()
        ce_grads = torch.autograd.grad(loss_ce.sum(), tensors, retain_graph=True, allow_unused=True)
        combined.sum().backward()
        cosines = []
        for tensor, g_ce in zip(tensors, ce_grads, strict=True):
            g = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
            g_ce = g_ce if g_ce is not None else torch.zeros_like(tensor)
            corrected, cos = _correct(g, g_ce, dims=tuple(range(2, tensor.dim())))  # cos [E, P]
            tensor.grad = corrected
            cosines.append(cos)
        mean_cos = torch.cat(cosines, dim=1).mean(dim=1).tolist()  # [E]
        for switch, on, c in zip(self.switches, active.tolist(), mean_cos, strict=True):
            if on:
                switch.update(c)

    def finish(self) -> None:
        self.fusion = None
        self.class_layers = None
