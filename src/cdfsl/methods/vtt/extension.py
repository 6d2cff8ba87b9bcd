"""VtT — teach the Vision to Think like the Text (docs/vtt.md), a training extension that plugs into any base.

Per training step and episode: per-layer CLS features `f^l` and class-text EOS features `t^l` (of each sample's own
class) form a sequence that a fusion turns into an absorption token `A`; `A` replaces the class name in the base's
class prompt ("a photo of a X." for a frozen text side) and the base's text tower turns it into `A'`;
`L_VtT = −mean_b cos(A', f)`. DGSO removes, per trained tensor of the base, the part of the combined gradient that
opposes the classification gradient (`correction`), and switches `L_VtT` off for the rest of an episode once the
recent mean gradient agreement drops to 0 or below (`dlc`). Nothing of this is used at prediction: `finish()` drops it
and returns each episode's switch-off step.

On a base whose text side learns (coop, coop+lora, maple; cdfsl's extension of the release, which has LoRA on the
vision tower only): `t^l` are the base's class texts of the same step, taken as inputs (no gradient flows back
through them, as none can through the release's frozen ones); the absorption runs the base's own learned prompt
("{context} X.", MaPLe's prompted tower), so `L_VtT` reaches the learned text side through it; DGSO covers every
tensor the base trains (LoRA factors of either tower, the context, MaPLe's prompts and coupling maps).

Fusions (`vtt.fusion`):
- `release` (the default, recipe vtt-release): the released code's fusion (`ReleaseFusion`) over 2L+1 raw
  (unnormalized) features `(f^L, t^L, f^L, t^{L−1}, f^{L−1}, …, t^1, f^1)` laid out as an S×S grid, S² = 2L+1; its
  output is the absorption token itself (no adapter);
- `ssm`, `attention`, `lstm`, `gru` (recipe paper uses `ssm`): the paper's wording — 2L L2-normalized features in
  one scan direction (`vtt.scan`), a sequence model, an adapter (`ScanningFusion`);
- `none`: `f^L` itself is the absorption token (the ablation "TIA only").
With `vtt.tia=false` the fused token is compared with `f` directly, without the text encoder.

When the towers differ in depth, L = the smaller depth and the deeper tower's blocks are taken at evenly spaced
depths, always including its last block. Where the text tower's token width W differs from the joint width C, a
bias-free linear C → W maps the release fusion's (or `f^L`'s) output to a token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.config import RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.errors import ConfigError
from cdfsl.methods.plugins import Absorb, FlopCounter, Remedies, TrainedTensor, autocast_context
from cdfsl.methods.vtt.fusion import EpisodeLinear, ReleaseFusion, ScanningFusion
from cdfsl.methods.vtt.switches import EpisodeSwitches
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
    the mean of the last `window` entries is ≤ 0. Returns whether `L_VtT` is still on. `off_at` is the training step
    (1-based) whose cosine switched it off.
    """

    def __init__(self, window: int = 50) -> None:
        self.window = window
        self.history = [1.0]
        self.on = True
        self.off_at: int | None = None

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
    """Interleave per-layer features into the paper's V-T sequence.

    Args:
        vision: `[L, E, B, C]` (layer 1 … L), text: `[E, B, L, C]`.
        order: `deep_to_shallow` → (f^L, t^L, …, f^1, t^1); otherwise shallow to deep (f^1, t^1, …, f^L, t^L);
            `bidirectional` uses the shallow-to-deep sequence and the fusion also scans it reversed.

    Returns:
        `[E, B, 2L, C]`.
    """
    pairs = torch.stack([vision.permute(1, 2, 0, 3), text], dim=3)  # [E, B, L, 2, C]
    if order == "deep_to_shallow":
        return pairs.flip(2).flatten(2, 3)
    return pairs.flatten(2, 3)


def release_sequence(vision: Tensor, text: Tensor) -> Tensor:
    """The released code's sequence: `(f^L, t^L, f^L, t^{L−1}, f^{L−1}, …, t^1, f^1)`, text before vision in each pair.

    Args: vision `[L, E, B, C]` (layer 1 … L), text `[E, B, L, C]`. Returns `[E, B, 2L + 1, C]`.
    """
    per_sample = vision.permute(1, 2, 0, 3)  # [E, B, L, C]
    pairs = torch.stack([text, per_sample], dim=3).flip(2).flatten(2, 3)  # [E, B, 2L, C], deep to shallow
    return torch.cat([per_sample[:, :, -1:], pairs], dim=2)


RELEASE_STATE = 256  # the release's d_state and dt_rank (`Mamba_models/mamba_ffn_neck.py`, with C = 512)


def state_sizes(state: int | None, dt_rank: int | None, width: int) -> tuple[int, int]:
    """The SSM state size and Δ-projection rank for joint width C: as set, else the release's 256 capped at C/2.

    At C = 512 (ViT-B/16) this is the release's 256 and 256; the cap is cdfsl's rule for narrower models (the tiny
    model's C = 64 gives 32), where a 256-entry state per channel would cost far more than the rest of a step.
    """
    state = state if state is not None else max(1, min(RELEASE_STATE, width // 2))
    return state, dt_rank if dt_rank is not None else state


def release_grid(layers: int) -> int:
    """Side S of the release fusion's grid for L layers: S² = 2L + 1 (5 for 12 blocks, 7 for 24)."""
    side = math.isqrt(2 * layers + 1)
    if side * side != 2 * layers + 1:
        raise ConfigError(
            f"vtt.fusion=release lays the 2L+1 = {2 * layers + 1} per-layer features on a square grid, which {layers} "
            "layers do not fill; use --set vtt.fusion=ssm (the paper's sequence) for this backbone"
        )
    return side


class VttExtension:
    """The VtT objective on top of a base's loop (see `methods.training.TrainingExtension`).

    Args:
        config: the resolved run config.
        backbone: the adapter.
        autocast: the method's autocast context (bf16 on GPU), under which the fusion and the absorption run as the
            vision tower does.
    """

    role: ClassVar[str] = "extension"
    cost_part: ClassVar[str] = "vtt_fusion"
    cost_label: ClassVar[str] = "VtT modules (fusion)"
    wants_layer_features = True

    def __init__(
        self,
        config: RunConfig,
        backbone: ClipAdapter,
        autocast: Callable[[], AbstractContextManager[object]],
    ) -> None:
        self.config = config
        self.vtt = config.vtt
        self.backbone = backbone
        self.autocast = autocast
        depth = min(backbone.num_vision_blocks, backbone.num_text_blocks)
        self.vision_layers = aligned_layers(backbone.num_vision_blocks, depth)
        self.text_layers = aligned_layers(backbone.num_text_blocks, depth)
        self.grid = release_grid(depth) if self.vtt.fusion == "release" else 0
        self.fusion: nn.Module | None = None
        self.episode_switches: EpisodeSwitches | None = None  # DLC of the fit under way (or the last one)
        self.tensors: list[TrainedTensor] = []
        self.absorb: Absorb | None = None
        self._step_values: dict[str, Tensor] = {}

    @classmethod
    def build(cls, config: RunConfig, backbone: ClipAdapter, autocast_dtype: torch.dtype | None = None) -> VttExtension:
        """The plug-in of a run (`build_method`): its fusion and absorption under the run's autocast."""
        return cls(config, backbone, lambda: autocast_context(backbone.device, autocast_dtype))

    def remedies(self) -> Remedies:
        """Its own AdamW rate, and a smaller weight of L_VtT."""
        return [f"vtt.lr={self.vtt.lr:g}"], [f"a smaller vtt.beta (now {self.vtt.beta:g})"]

    def trained_modules(self) -> list[nn.Module]:
        """The fusion of the fit under way (none between fits, or with `vtt.fusion=none` and `vtt.tia` off)."""
        return [self.fusion] if self.fusion is not None else []

    def piece_flops(self, batch: EpisodeBatch, batch_size: int, absorb: Absorb, counter: FlopCounter) -> dict[str, int]:
        """FLOPs of VtT's pieces alone, each forward + backward, on inputs of one step's shapes (E = 1, b views),
        with fresh per-episode state, dropped afterwards.

        - `vtt_fusion`: the absorption token from per-layer CLS features `[L, 1, b, C]`, the final feature `[1, b, C]`
          (both requiring gradients, as the trained vision features do) and per-layer class texts `[1, K, L, C]`;
          backward to the fusion's parameters and its inputs.
        - `vtt_absorption` (when `vtt.tia`): the base's text tower over its class prompt with the class name's
          embedding replaced by tokens `[1, b, W]` (`absorb`: "a photo of a X." through the frozen tower for the
          lora base), backward to those tokens.
        """
        backbone = self.backbone
        device = backbone.device
        self.start(batch, [], absorb)
        try:
            generator = torch.Generator().manual_seed(batch.seed)
            width = backbone.embed_dim
            labels = batch.support_labels[:, :batch_size]  # [1, b]
            features = torch.randn(1, batch_size, width, generator=generator).to(device).requires_grad_()
            layers = torch.randn(backbone.num_vision_blocks, 1, batch_size, width, generator=generator)
            output = VisionOutput(features=features, layer_features=layers.to(device).requires_grad_())
            classes = len(batch.class_names[0])
            class_layers = torch.randn(1, classes, len(self.text_layers), width, generator=generator).to(device)
            with counter() as fusion_counter:
                with self.autocast():
                    token = self.absorption_token(output, labels, class_layers)
                if token.requires_grad:
                    token.float().sum().backward()
            pieces = {"vtt_fusion": int(fusion_counter.get_total_flops())}
            if self.vtt.tia:
                replacement = torch.randn(1, batch_size, backbone.text_width, generator=generator).to(device)
                replacement.requires_grad_()
                with counter() as text_counter:
                    with self.autocast():
                        absorbed = absorb(replacement)
                    absorbed.float().sum().backward()
                pieces["vtt_absorption"] = int(text_counter.get_total_flops())
        finally:
            self.finish()
        return pieces

    def _build_fusion(self, generators: list[torch.Generator]) -> nn.Module | None:
        """The episode batch's fusion; outputs a token of the text width W (or of C when it is compared with f)."""
        vtt, width = self.vtt, self.backbone.embed_dim
        outputs = self.backbone.text_width if vtt.tia else width
        state, dt_rank = state_sizes(vtt.state, vtt.dt_rank, width)
        if vtt.fusion == "release":
            return ReleaseFusion(generators, self.grid, width, outputs, state, dt_rank, vtt.conv)
        if vtt.fusion == "none":
            return EpisodeLinear(generators, width, outputs, bias=False) if outputs != width else None
        return ScanningFusion(
            generators,
            length=2 * len(self.vision_layers),
            inputs=width,
            hidden=vtt.hidden or width,
            outputs=outputs,
            kind=vtt.fusion,
            layers=vtt.ssm_layers,
            state=state,
            bidirectional=vtt.scan == "bidirectional",
        )

    def start(self, batch: EpisodeBatch, tensors: list[TrainedTensor], absorb: Absorb) -> list[dict[str, Any]]:
        generators = [torch_stream(batch.seed, i, "vtt_init") for i in batch.indices]
        fusion = self._build_fusion(generators)
        self.fusion = fusion.to(self.backbone.device) if fusion is not None else None
        self.episode_switches = EpisodeSwitches(len(batch.indices), self.vtt.window, self.backbone.device)
        self.tensors, self.absorb = tensors, absorb
        params = list(self.fusion.parameters()) if self.fusion is not None else []
        return [{"params": params, "lr": self.vtt.lr}]

    def absorption_token(self, output: VisionOutput, labels: Tensor, class_layers: Tensor) -> Tensor:
        """The fused token per sample `[E, B, W]` (or `[E, B, C]` with `tia` off) of a step's vision output, labels
        `[E, B]` and raw per-layer class texts `[E, K, L, C]`."""
        assert output.layer_features is not None
        fusion = self.vtt.fusion
        if fusion == "none":
            final = output.features.float()
            return self.fusion(final) if self.fusion is not None else final
        assert self.fusion is not None
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None]
        text = class_layers.detach().float()[rows, labels]  # [E, B, L, C]
        vision = output.layer_features[self.vision_layers].float()  # [L, E, B, C]
        if fusion == "release":
            return self.fusion(release_sequence(vision, text))
        sequence = scan_sequence(F.normalize(vision, dim=-1), F.normalize(text, dim=-1), self.vtt.scan)
        return self.fusion(sequence)

    def vtt_loss(self, output: VisionOutput, labels: Tensor, class_layers: Tensor) -> Tensor:
        """`L_VtT` per episode `[E]` from the vision output of a step, its labels `[E, B]` and the raw per-layer class
        texts `[E, K, L, C]`."""
        assert self.absorb is not None
        with self.autocast():
            token = self.absorption_token(output, labels, class_layers)
            absorbed = self.absorb(token) if self.vtt.tia else token
        cos = F.cosine_similarity(absorbed.float(), output.features.float(), dim=-1)
        return -cos.mean(dim=1)

    def backward(self, loss_ce: Tensor, output: VisionOutput, labels: Tensor, class_layers: Tensor) -> Tensor:
        """Fill gradients: plain CE for episodes whose `L_VtT` is off; L_comb with DGSO for the rest.

        Returns the per-episode loss `[E]` that was backpropagated (L_comb, or L_ce once every episode's `L_VtT` is
        off), which the training loop checks for nan and inf.
        """
        vtt, switches = self.vtt, self.episode_switches
        assert switches is not None, "start a fit first"
        active = switches.on  # [E], on the device: no host read decides anything per episode
        self._step_values = {}
        if not switches.any_on.value():  # every episode off (as the host learns it, see EpisodeSwitches)
            loss_ce.sum().backward()
            return loss_ce
        loss_vtt = self.vtt_loss(output, labels, class_layers)
        self._step_values["loss_vtt"] = torch.where(active, loss_vtt.detach(), torch.nan)
        combined = loss_ce + vtt.beta * loss_vtt * active.to(loss_ce.dtype)
        if not (vtt.correction or vtt.dlc):
            combined.sum().backward()
            return combined
        tensors = [tensor for tensor, _ in self.tensors]
        ce_grads = torch.autograd.grad(loss_ce.sum(), tensors, retain_graph=True, allow_unused=True)
        combined.sum().backward()
        cosines = []
        for (tensor, parameters), g_ce in zip(self.tensors, ce_grads, strict=True):
            g = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
            g_ce = g_ce if g_ce is not None else torch.zeros_like(tensor)
            shape = (tensor.shape[0], parameters, -1)  # one cosine per (episode, parameter)
            corrected, cos = _correct(g.reshape(shape), g_ce.reshape(shape), dims=(2,))  # cos [E, P]
            if vtt.correction:
                tensor.grad = corrected.view_as(tensor)
            cosines.append(cos)
        mean_cos = torch.cat(cosines, dim=1).mean(dim=1)  # [E]
        self._step_values["dgso_cos"] = torch.where(active, mean_cos, torch.nan)
        if vtt.dlc:
            switches.update(mean_cos)
        return combined

    @property
    def switches(self) -> list[LossSwitch]:
        """The last fit's DLC per episode as host `LossSwitch`es (history, on, off_at); reads the device, so for
        inspection after a fit, never inside a step."""
        state = self.episode_switches
        if state is None:
            return []
        switches = []
        for history, off in zip(state.histories(), state.off_steps(), strict=True):
            switch = LossSwitch(self.vtt.window)
            switch.history, switch.on, switch.off_at = history, off is None, off
            switches.append(switch)
        return switches

    def step_values(self) -> dict[str, Tensor]:
        """Of the last `backward`, per episode `[E]`: `loss_vtt` (L_VtT; nan once switched off) and, with DGSO,
        `dgso_cos` (the mean gradient agreement DLC reads; nan once switched off)."""
        return self._step_values

    def finish(self) -> list[dict[str, Any]]:
        """Drop the fusion; return, per episode, the step at which DLC switched `L_VtT` off (None: never)."""
        off_steps = self.episode_switches.off_steps() if self.episode_switches is not None else []
        records = [{"dlc_off_step": step} for step in off_steps]
        self.fusion, self.tensors, self.absorb = None, [], None
        return records
