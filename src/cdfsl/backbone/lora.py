"""Episode-batched LoRA on the q, k, v projections of a tower's blocks (vision or text).

Why our own code: peft and loralib attach one adapter per layer and train one model at a time. Here E episodes train
at once against one frozen backbone, so every LoRA factor carries a leading episode axis and the low-rank update is an
`einsum` over `[E, ...]` factors, while the frozen projection runs once over all E·B images. We chose explicit factors
over `torch.func.stack_module_state` + `vmap(functional_call)`: the frozen path is then a plain batched matmul (no vmap
over the backbone, which would replicate its weights' work per episode) and merging, dropout streams and per-tensor
gradient surgery (VtT's DGSO) stay ordinary tensor code.

Shapes (L blocks, E episodes, P targets among q/k/v, r rank, D width):
- `lora_a[l]`: `[E, P, r, D]`, Kaiming-uniform (as `nn.Linear`, a=√5: bound 1/√D), drawn from each episode's own
  `lora_init` stream; `lora_b[l]`: `[E, P, D, r]`, zeros. Update scale `alpha / sqrt(rank)` (2 for rank 16, alpha 8), as
  the released LoRA layers of CLIP-LoRA, TIR and VtT compute it (docs/methods.md).
- Dropout (rate p) on the LoRA input, a separate mask per target, drawn from each episode's own `dropout` stream in
  block order, so a batch of episodes draws exactly what each would draw alone. On the text tower the prompts are cut
  after the batch's last end token, a length that depends on the other episodes' class names; `dropout_layout` then
  makes each mask be drawn at the full prompt length and cut, so an episode's masks do not depend on its companions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cdfsl.config import LoraConfig

_TARGET_SLOT = {"q": 0, "k": 1, "v": 2}


class EpisodeLoRA(nn.Module):
    """LoRA factors for E episodes on every block of one tower; callable as the adapter's `QkvProjection`.

    Args:
        config: rank, alpha, dropout, targets.
        num_blocks, width: the tower's depth L and width D.
        init_generators: one CPU generator per episode (its `lora_init` stream).
        dropout_generators: one generator per episode on the compute device (its `dropout` stream), or None when
            dropout is off.
    """

    def __init__(
        self,
        config: LoraConfig,
        num_blocks: int,
        width: int,
        init_generators: Sequence[torch.Generator],
        dropout_generators: Sequence[torch.Generator] | None = None,
    ) -> None:
        super().__init__()
        self.rank = config.rank
        self.scale = config.alpha / math.sqrt(config.rank)
        self.dropout = config.dropout
        self.slots = [_TARGET_SLOT[t] for t in sorted(config.targets, key=_TARGET_SLOT.__getitem__)]
        self.width = width
        self.dropout_generators = list(dropout_generators) if dropout_generators is not None else None
        self.dropout_layout: tuple[int, int] | None = None  # (prompts, full length) for text-tower inputs
        targets, bound = len(self.slots), 1.0 / math.sqrt(width)
        draws = [
            torch.rand((num_blocks, targets, self.rank, width), generator=g, dtype=torch.float32) * 2 * bound - bound
            for g in init_generators
        ]
        stacked = torch.stack(draws, dim=1)  # [L, E, P, r, D]
        self.lora_a = nn.ParameterList(nn.Parameter(stacked[layer].clone()) for layer in range(num_blocks))
        self.lora_b = nn.ParameterList(
            nn.Parameter(torch.zeros(len(init_generators), targets, width, self.rank)) for _ in range(num_blocks)
        )
        self._merged: list[Tensor] | None = None

    @property
    def episodes(self) -> int:
        return int(self.lora_a[0].shape[0])

    def delta(self, layer: int, h: Tensor) -> Tensor:
        """Low-rank update of block `layer` for input `h` `[E, n, D]` → `[E, P, n, D]` (already scaled)."""
        a, b = self.lora_a[layer], self.lora_b[layer]
        if self.training and self.dropout > 0:
            if self.dropout_generators is None:
                raise RuntimeError("EpisodeLoRA needs dropout generators to train with dropout")
            keep = 1.0 - self.dropout
            masks = torch.stack([self._draw_mask(g, a.shape[1], h) for g in self.dropout_generators]) < keep
            dropped = h[:, None] * masks.to(h.dtype) / keep
            low = torch.einsum("epnd,eprd->epnr", dropped, a.to(h.dtype))
        else:
            low = torch.einsum("end,eprd->epnr", h, a.to(h.dtype))
        return torch.einsum("epnr,epor->epno", low, b.to(h.dtype)) * self.scale

    def _draw_mask(self, generator: torch.Generator, targets: int, h: Tensor) -> Tensor:
        """Uniform draws `[P, n, D]` for one episode's dropout mask on input `h` `[E, n, D]`."""
        n, width = h.shape[1:]
        if self.dropout_layout is None:
            return torch.rand((targets, n, width), generator=generator, device=h.device)
        prompts, length = self.dropout_layout
        full = torch.rand((targets, prompts, length, width), generator=generator, device=h.device)
        return full[:, :, : n // prompts].reshape(targets, n, width)

    def forward(self, layer: int, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Fused q/k/v for E episodes: `h` `[E, n, D]` → `[E, n, 3D]`, frozen part shared, LoRA part per episode."""
        if self._merged is not None:
            out = torch.einsum("end,eod->eno", h, self._merged[layer].to(h.dtype))
            return out + bias.to(h.dtype) if bias is not None else out
        out = torch.nn.functional.linear(h, weight, bias)
        update = self.delta(layer, h)
        d = self.width
        pieces = list(out.split(d, dim=-1))
        for position, slot in enumerate(self.slots):
            pieces[slot] = pieces[slot] + update[:, position]
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merge(self, frozen_weights: Sequence[Tensor]) -> None:
        """Fold the updates into per-episode weights `[E, 3D, D]` per block (for prediction); see `unmerge`."""
        self._merged = self.merged_weights(frozen_weights)

    def merged_weights(self, frozen_weights: Sequence[Tensor]) -> list[Tensor]:
        """The frozen q/k/v weights `[3D, D]` of each block with each episode's update added: `[E, 3D, D]` per block
        (fp32)."""
        merged = []
        for layer, weight in enumerate(frozen_weights):
            per_episode = weight.detach().float().expand(self.episodes, *weight.shape).clone()
            update = torch.einsum("epor,eprd->epod", self.lora_b[layer], self.lora_a[layer]) * self.scale
            for position, slot in enumerate(self.slots):
                per_episode[:, slot * self.width : (slot + 1) * self.width] += update[:, position]
            merged.append(per_episode)
        return merged

    def unmerge(self) -> None:
        self._merged = None

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def tensors(self) -> list[Tensor]:
        """Every LoRA parameter tensor, each `[E, P, ...]` (per-tensor statistics reduce over dims ≥ 2)."""
        return [*self.lora_a, *self.lora_b]
