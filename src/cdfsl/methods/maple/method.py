"""`maple`: multi-modal prompt learning (MaPLe, Khattak et al., CVPR 2023), E episodes at once on one frozen CLIP.

What MaPLe learns (release: muzairkhattak/multimodal-prompt-learning, `trainers/maple.py` and the prompt-aware blocks
`ResidualAttentionBlock_MaPLe` / `VisionTransformer_MaPLe` in `clip/model.py`):

- Text: the class prompt is `"{CTX_INIT} {class name}."` = "a photo of a {class}."; its first N_CTX = 2 word tokens
  after the start token ("a photo") become a learned context, initialised from their own token embeddings, while the
  rest ("of a {class}.") stays fixed tokens. The context enters with the embeddings (positional embedding added).
  At the input of text blocks 1..J-1 (J = PROMPT_DEPTH = 9) the two context positions are overwritten by further
  learned vectors, the compound prompts (initialised N(0, 0.02²), no positional embedding). From block J on, the
  context positions carry what block J-1 made of them.
- Vision: J linear maps (text width → vision width; `nn.Linear` default init) couple the towers. Block 0's vision
  prompts are the map of the text context, appended after the patch tokens before `ln_pre`; block l's (1 <= l < J)
  are the l-th map of the l-th compound prompt and replace the prompt tokens entering block l. From block J on the
  prompt tokens stay in the sequence as block J-1 left them (the release does not drop them). The image feature is
  the CLS token as usual.
- Training: cross-entropy on `exp(logit_scale) · cos` (CLIP's own learned scale, `CustomCLIP.forward`), only the
  prompt learner trains: SGD lr 0.0035, momentum 0.9, weight decay 5e-4 (Dassl's defaults `OPTIM.MOMENTUM`,
  `OPTIM.WEIGHT_DECAY`), batch 4, 5 epochs, cosine over MAX_EPOCH = 5 after 1 warm-up epoch at the constant rate 1e-5
  (`configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`). These are `MapleConfig`'s defaults.

Schedule, as Dassl runs it (`dassl/optim/lr_scheduler.py`: `CosineAnnealingLR(T_max=MAX_EPOCH)` wrapped in
`ConstantWarmupScheduler`, WARMUP_RECOUNT on; the trainer calls `update_lr()` after the last batch of each epoch): the
rate is constant within an epoch; epoch e < W runs at `warmup_lr`, epoch e >= W at `lr · (1 + cos(π (e − W) / epochs))
/ 2`. With the defaults: 1e-5, 3.5e-3, 3.17e-3, 2.29e-3, 1.21e-3 (the cosine never reaches its end). Checked against
Dassl's own classes under our torch; `epoch_learning_rates` computes it.

Epochs on a few-shot support set: the support batch holds S images × V augmented views per episode (`EpisodeBatch`);
one epoch is one pass over those S·V views in batches of `maple.batch_size`, in a fresh order per pass from the
episode's own `batch_order` stream (`ViewOrder`, the shared loop's), the last batch of a pass smaller when S·V is not a
multiple. So a fit is `epochs · ceil(S·V / batch_size)` steps. E episodes of a batch have the same S·V, so they step and
change rate together.

Episode batching: every learnable tensor has a leading episode axis: context `[E, n, Wt]`, compound prompts
`[E, J-1, n, Wt]`, coupling weights `[E, J, Wt, Wv]` and biases `[E, J, Wv]`, drawn from each episode's own
`maple_init` stream (block-0 map, then the compound prompts, then the deeper map, the release's order). The loss is
the sum of per-episode mean losses, so each episode gets its own gradient and no other's, and SGD with momentum and
weight decay is elementwise: E episodes at once follow the trajectories they would follow alone, to float tolerance
(docs/methods.md: batched kernels may round otherwise). The frozen towers run once
over all E·K prompts and E·B images (`ClipAdapter`'s deep prompts). Why our own code: the release (on Dassl) and
prompt-tuning libraries such as peft train one prompt set per model; none trains many independent prompt sets, each
with its own coupling maps, in one batched forward against one frozen backbone.

Deviations from the release, all deliberate:
- Data: the release draws a fresh random-resized crop and flip of each training image every epoch; we pass over the
  benchmark's fixed support views (the same views every method sees, docs/protocol.md).
- Last batch: Dassl's train loader drops the last incomplete batch (`drop_last` when the set holds at least one
  batch); we keep it, smaller, so every support view is seen in every epoch.
- Precision: the release runs CLIP in fp16 (PREC fp16) with the block-0 map and the context in fp16; we keep every
  learned tensor in fp32 and run the towers under the run's autocast (bf16 on GPU, fp32 on CPU), as other methods.
- Widths: the release hard-codes 512 → 768 (ViT-B/16); we take the backbone's text and vision widths.
- Initialisation: the release draws from the global torch RNG; we draw from per-episode streams (same distributions,
  and the deeper maps still share one initialisation, as the release's `_get_clones` deep copy of one `nn.Linear`).
- Context words: the release falls back to random N(0, 0.02²) context ("X X ...") when N_CTX > 4, and with fewer
  context words than N_CTX silently takes end/padding tokens; we refuse `maple.tokens` beyond the words' tokens.
- Class names: the release replaces `_` by spaces; ours are already prompt names.
- Text length: sequences are cut after the batch's last end token (the causal mask hides the tokens cut; the
  attention's rounding may still differ in the last bits with the length).
- Probes: `encode`'s observer and CLS attention see the CLS and patch tokens only (the first 1 + M; M on a tower
  without a CLS token); the P prompt tokens are hidden from them so patch-indexed analyses keep their meaning (the
  attention left out is the prompts').
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput
from cdfsl.backbone.towers import BlockInputHook
from cdfsl.config import MapleConfig, RunConfig
from cdfsl.data.episodes import EpisodeBatch
from cdfsl.errors import ConfigError
from cdfsl.methods.base import Observer, check_state_fits, observed
from cdfsl.methods.plugins import Absorb, Recalibration, TrainedTensor, TrainingExtension
from cdfsl.methods.text_side import PromptTokens, placeholder_embeddings, text_block_index
from cdfsl.methods.training import StepPlan, TrainedBase
from cdfsl.seeding import torch_stream

COMPOUND_STD = 0.02  # the release's nn.init.normal_(std=0.02) of the compound text prompts


def epoch_learning_rates(config: MapleConfig) -> list[float]:
    """The rate of each epoch, as Dassl's constant warm-up + cosine scheduler steps it once per epoch."""
    rates = []
    for epoch in range(config.epochs):
        if epoch < config.warmup_epochs:
            rates.append(config.warmup_lr)
        else:
            rates.append(config.lr * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / config.epochs)) / 2)
    return rates


class EpochRates(torch.optim.lr_scheduler.LRScheduler):
    """MaPLe's schedule as the shared loop steps it (once per step): every group runs at `rates[e]` during the
    `steps_per_epoch` steps of epoch e (`epoch_learning_rates`), the rate set exactly, not multiplied."""

    def __init__(self, optimizer: torch.optim.Optimizer, rates: Sequence[float], steps_per_epoch: int) -> None:
        self.rates, self.steps_per_epoch = list(rates), steps_per_epoch
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        epoch = min(self.last_epoch // self.steps_per_epoch, len(self.rates) - 1)
        return [self.rates[epoch] for _ in self.optimizer.param_groups]


class EpisodePrompts(nn.Module):
    """MaPLe's learned tensors for E episodes.

    Args:
        context_init: token embeddings `[n, Wt]` of the context words (every episode starts from them).
        depth: J, the number of blocks (from the first) with learned prompts in each tower.
        vision_width: Wv.
        generators: one CPU generator per episode (its `maple_init` stream).
    """

    def __init__(
        self, context_init: Tensor, depth: int, vision_width: int, generators: Sequence[torch.Generator]
    ) -> None:
        super().__init__()
        n, width = context_init.shape
        episodes = len(generators)
        draws = [self._draw(g, depth, n, width, vision_width) for g in generators]
        self.context = nn.Parameter(context_init.float().expand(episodes, n, width).clone())  # [E, n, Wt]
        self.compound = nn.Parameter(torch.stack([d[0] for d in draws]))  # [E, J-1, n, Wt]
        self.weight = nn.Parameter(torch.stack([d[1] for d in draws]))  # [E, J, Wt, Wv]
        self.bias = nn.Parameter(torch.stack([d[2] for d in draws]))  # [E, J, Wv]

    @staticmethod
    def _draw(
        generator: torch.Generator, depth: int, n: int, width: int, vision_width: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One episode's compound prompts `[J-1, n, Wt]`, map weights `[J, Wt, Wv]` and biases `[J, Wv]`.

        Maps as `nn.Linear(Wt, Wv)` initialises them (weight and bias uniform in ±1/√Wt); the deeper J-1 maps share
        one draw, as the release's deep copies of one layer.
        """
        bound = 1.0 / math.sqrt(width)

        def uniform(*shape: int) -> Tensor:
            return (torch.rand(shape, generator=generator) * 2 - 1) * bound

        first_weight, first_bias = uniform(vision_width, width), uniform(vision_width)
        compound = torch.randn((depth - 1, n, width), generator=generator) * COMPOUND_STD
        deep_weight, deep_bias = uniform(vision_width, width), uniform(vision_width)
        weight = torch.stack([first_weight, *[deep_weight] * (depth - 1)]).transpose(1, 2).contiguous()
        bias = torch.stack([first_bias, *[deep_bias] * (depth - 1)])
        return compound, weight, bias

    @property
    def depth(self) -> int:
        return int(self.weight.shape[1])

    def trained_tensors(self) -> list[TrainedTensor]:
        """Every learned tensor with the number of the release's parameters it stacks (for VtT's DGSO): the context
        (one), the J-1 compound prompts, the J coupling weights and biases."""
        depth = self.depth
        return [(self.context, 1), (self.compound, depth - 1), (self.weight, depth), (self.bias, depth)]

    def text_prompts(self) -> list[Tensor]:
        """The text prompts of blocks 0..J-1, each `[E, n, Wt]`: the context, then the compound prompts."""
        return [self.context, *self.compound.unbind(1)]

    def vision_prompts(self) -> list[Tensor]:
        """The vision prompts of blocks 0..J-1, each `[E, n, Wv]`: block l's map of block l's text prompts."""
        text = torch.cat([self.context[:, None], self.compound], dim=1)  # [E, J, n, Wt]
        mapped = torch.einsum("ejnt,ejtv->ejnv", text, self.weight) + self.bias[:, :, None]
        return list(mapped.unbind(1))


class MapleMethod(TrainedBase):
    """MaPLe over E episodes (module docstring)."""

    name = "maple"
    state_parts: ClassVar[dict[str, str]] = {
        "prompts.context": "maple_context",
        "prompts.compound": "maple_compound",
        "prompts.weight": "maple_coupling",
        "prompts.bias": "maple_coupling",
    }
    part_labels: ClassVar[dict[str, str]] = {
        "maple_context": "MaPLe text context",
        "maple_compound": "MaPLe compound text prompts",
        "maple_coupling": "MaPLe text-to-vision maps",
    }

    def __init__(
        self,
        backbone: ClipAdapter,
        config: RunConfig,
        autocast_dtype: torch.dtype | None = None,
        recalibration: Recalibration | None = None,
        extension: TrainingExtension | None = None,
    ) -> None:
        super().__init__(backbone, config, autocast_dtype, recalibration, extension)
        cfg = config.maple
        towers = min(backbone.num_vision_blocks, backbone.num_text_blocks)
        if not 1 <= cfg.depth <= towers:
            raise ConfigError(f"maple.depth={cfg.depth} must be 1..{towers}, the depth of {backbone.name}'s towers")
        self.context_init = self._context_embeddings(cfg.context, cfg.tokens)
        self.prompts: EpisodePrompts | None = None
        self._tokens = PromptTokens(
            backbone, lambda name: f"{cfg.context} {name}.", ("maple.context", cfg.context, cfg.tokens)
        )
        self._training: EpisodePrompts | None = None  # the prompts of the fit under way
        self._epoch_loss = torch.zeros(0)
        self._steps_per_epoch = 1
        self._views = 1

    # ------------------------------------------------------------------ text
    def _context_embeddings(self, words: str, n: int) -> Tensor:
        """Token embeddings `[n, Wt]` of the first n tokens of the context words."""
        tokens = self.backbone.content_tokens(words)
        available = len(tokens)
        if n > available:
            raise ConfigError(
                f"maple.tokens={n} exceeds the {available} tokens of maple.context {words!r}; use at most {available}"
            )
        with torch.no_grad():
            return self.backbone.token_embedding(tokens[:n]).float().clone()

    def _texts(
        self,
        prompts: EpisodePrompts,
        class_names: Sequence[Sequence[str]],
        layers: Sequence[int] = (),
        **variation: Any,
    ) -> tuple[Tensor, list[Tensor]]:
        """Class features through the prompted text tower: final, normalized `[E, K, C]`, and one raw `[E, K, C]` per
        block in `layers` (fp32; with gradients when grad mode is on); `variation`: `skip_blocks` / `block_scale` of
        `ClipAdapter.encode_text_embeddings` (the lost-layer probe)."""
        tokens, pooled = self._tokens(class_names)
        with torch.no_grad():
            embeddings = self.backbone.token_embedding(tokens)  # [E, K, T, Wt]; context slots overwritten
        output = self.backbone.encode_text_embeddings(
            embeddings,
            pooled,
            layers=layers,
            prompts=prompts.text_prompts(),
            pooled_range=self._tokens.pooled_range,
            **variation,
        )
        final = F.normalize(output.features.float(), dim=-1)
        return final, [] if output.layer_features is None else list(output.layer_features.float())

    def _absorber(self, prompts: EpisodePrompts) -> Absorb:
        """VtT's absorption: `"{maple.context} X."` through the prompted text tower, X's embedding replaced by each
        token `[E, B, W]` → `[E, B, C]` (the prompts enter as they do for the class prompts)."""
        tokens, position = self.backbone.placeholder_position(
            f"{self.config.maple.context} {{}}.", self.config.vtt.placeholder
        )
        pooled_at = self.backbone.pool_positions(tokens)  # [1]
        span = (int(pooled_at[0]),) * 2  # read once, not every step

        def absorb(token: Tensor) -> Tensor:
            e, b = token.shape[:2]
            embeddings = placeholder_embeddings(self.backbone, tokens, position, token)
            return self.backbone.encode_text_embeddings(
                embeddings, pooled_at.expand(e, b), prompts=prompts.text_prompts(), pooled_range=span
            ).features

        return absorb

    # ------------------------------------------------------------------ the pieces of the shared loop
    def start(self, batch: EpisodeBatch) -> None:
        """Fresh prompts from each episode's `maple_init` stream, and a zeroed epoch-loss table."""
        self._training = EpisodePrompts(
            self.context_init,
            self.config.maple.depth,
            self.backbone.vision_width,
            [torch_stream(batch.seed, i, "maple_init") for i in batch.indices],
        ).to(batch.support.device)
        # view-weighted mean CE per epoch and episode
        self._epoch_loss = torch.zeros((self.config.maple.epochs, len(batch)), device=batch.support.device)

    def _fit_prompts(self) -> EpisodePrompts:
        assert self._training is not None, "start a fit first"
        return self._training

    def trained_tensors(self) -> list[TrainedTensor]:
        return self._fit_prompts().trained_tensors()

    def absorber(self) -> Absorb:
        return self._absorber(self._fit_prompts())

    def optimizers(self, plugin_groups: list[dict[str, Any]]) -> list[torch.optim.Optimizer]:
        """SGD over the prompts (its rate set by the schedule); AdamW over the extension's groups."""
        cfg, train = self.config.maple, self.config.train
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.SGD(
                self._fit_prompts().parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        ]
        if plugin_groups:
            optimizers.append(
                torch.optim.AdamW(plugin_groups, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)
            )
        return optimizers

    def schedules(
        self, optimizers: Sequence[torch.optim.Optimizer], plan: StepPlan
    ) -> list[torch.optim.lr_scheduler.LRScheduler]:
        """The epoch rates on the prompts' SGD (`EpochRates`); the extension's AdamW keeps its rate."""
        return [EpochRates(optimizers[0], epoch_learning_rates(self.config.maple), self._steps_per_epoch)]

    def plan(self, views: int) -> StepPlan:
        """`epochs · ceil(views / batch_size)` steps: one pass over the support views per epoch."""
        cfg = self.config.maple
        batch_size = min(cfg.batch_size, views)
        self._steps_per_epoch, self._views = math.ceil(views / batch_size), views
        return StepPlan(cfg.epochs * self._steps_per_epoch, batch_size)

    @classmethod
    def one_step(cls, config: RunConfig, batch: EpisodeBatch) -> tuple[EpisodeBatch, int]:
        """One epoch of one batch at the full rate: `maple.epochs` 1 without warm-up, the support cut to one batch."""
        batch_size = min(config.maple.batch_size, batch.support.shape[1])
        config.maple.epochs, config.maple.warmup_epochs = 1, 0
        cut = dataclasses.replace(
            batch, support=batch.support[:, :batch_size], support_labels=batch.support_labels[:, :batch_size]
        )
        return cut, batch_size

    def step_texts(self, class_names: Sequence[Sequence[str]], layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        return self._texts(self._fit_prompts(), class_names, layers)

    def step_encode(self, images: Tensor, hook: BlockInputHook | None, layer_features: bool) -> VisionOutput:
        return self.backbone.encode_images(
            images,
            block_input_hook=hook,
            layer_features=layer_features,
            prompts=self._fit_prompts().vision_prompts(),
        )

    def observe_step(self, step: int, loss_ce: Tensor, views: int) -> None:
        self._epoch_loss[(step - 1) // self._steps_per_epoch] += loss_ce * views / self._views

    def end(self) -> list[dict[str, Any]]:
        """The prompts, frozen; per episode the mean training loss of the first and of the last epoch."""
        self.prompts = self._fit_prompts().requires_grad_(False)
        losses = self._epoch_loss.cpu()
        return [
            {"maple_first_epoch_loss": float(losses[0, e]), "maple_last_epoch_loss": float(losses[-1, e])}
            for e in range(losses.shape[1])
        ]

    def logits(self, image_features: Tensor, text: Tensor) -> Tensor:
        """`exp(logit_scale) · cos` with the backbone's own learned scale, as the release (not `train.logit_scale`):
        image features `[E, N, C]`, normalized text `[E, K, C]` → `[E, N, K]` (fp32)."""
        images = F.normalize(image_features.float(), dim=-1)
        scale = self.backbone.model.logit_scale.detach().exp()  # on the device: `float()` of it would wait for it
        return scale * images @ text.transpose(1, 2)

    def remedies(self) -> str:
        tries = [f"a lower maple.lr (now {self.config.maple.lr:g})", "a smaller maple.depth"]
        tries += self.plugin_remedies()[1]
        if self.autocast_dtype is not None:
            tries.append("--set train.precision=fp32")
        return ", ".join(tries[:-1]) + " or " + tries[-1]

    # ------------------------------------------------------------------ prediction
    def _fitted(self) -> EpisodePrompts:
        self._refuse_after_failure()
        if self.prompts is None:
            raise RuntimeError("MapleMethod has no prompts yet: call fit first")
        return self.prompts

    @torch.no_grad()
    def class_features(self, class_names: Sequence[Sequence[str]], layer: int | None = None) -> Tensor:
        prompts = self._fitted()
        blocks = () if layer is None else (text_block_index(layer, self.backbone.num_text_blocks, "text layer"),)
        with self.autocast():
            final, at_layers = self._texts(prompts, class_names, blocks)
        return final if layer is None else F.normalize(at_layers[0], dim=-1)

    @torch.no_grad()
    def varied_class_features(
        self,
        class_names: Sequence[Sequence[str]],
        skip_blocks: Sequence[int] = (),
        block_scale: dict[int, float] | None = None,
    ) -> Tensor | None:
        prompts = self._fitted()
        with self.autocast():
            return self._texts(prompts, class_names, skip_blocks=skip_blocks, block_scale=block_scale)[0]

    @torch.no_grad()
    def encode(
        self,
        images: Tensor,
        class_names: Sequence[Sequence[str]],
        observe: Observer | None = None,
        keep_cls_attention: bool = False,
    ) -> VisionOutput:
        """The prompted vision pass (with TIR's recalibration when it acts at prediction); `observe` and the CLS
        attention see the CLS and patch tokens only."""
        prompts = self._fitted()
        image_tokens = self.backbone.image_tokens
        tir = self._prediction_hook(class_names)
        shown = None
        if observe is not None:

            def shown(layer: int, x: Tensor) -> None:
                observe(layer, x[:, :, :image_tokens])

        with self.autocast():
            output = self.backbone.encode_images(
                images,
                block_input_hook=observed(shown, tir),
                keep_cls_attention=keep_cls_attention,
                prompts=prompts.vision_prompts(),
            )
        output.cls_attention = [attention[..., :image_tokens] for attention in output.cls_attention]
        return output

    def export_refusal(self) -> str | None:
        return super().export_refusal() or (
            "MaPLe's prompts enter every forward pass: a maple classifier cannot become plain weights"
        )

    def trained_state(self) -> dict[str, Tensor]:
        if self.prompts is None:
            return {}
        return {f"prompts.{k}": v.detach() for k, v in self.prompts.state_dict().items()}

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        episodes = next(iter(state.values())).shape[0] if state else 1
        generators = [torch.Generator().manual_seed(0) for _ in range(episodes)]
        shell = EpisodePrompts(self.context_init, self.config.maple.depth, self.backbone.vision_width, generators)
        expected = {f"prompts.{k}": v for k, v in shell.state_dict().items()}
        check_state_fits(state, expected, f"{self.config.method} (maple.depth={self.config.maple.depth})")
        shell.load_state_dict({k.removeprefix("prompts."): v for k, v in state.items()})
        self.prompts = shell.to(self.backbone.device).requires_grad_(False)
        self._failure = None


__all__ = ["EpisodePrompts", "MapleMethod", "epoch_learning_rates"]
