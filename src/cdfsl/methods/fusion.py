"""VtT's V-T cross-layer scanning fusion, with the episode axis on every parameter.

Why our own modules: each episode owns freshly initialised fusion weights, and E episodes train at once, so every
weight is `[E, ...]` and a linear map is a batched matmul. `torch.nn.LSTM`/`GRU`/`MultiheadAttention` hold one set of
weights, and the pure-PyTorch Mamba ports assume one model too; the sequences here are only 2L tokens long, so small
explicit cells (a Mamba-style selective scan, attention, LSTM, GRU) are simpler than vmapping library modules.

Every module initialises from per-episode CPU generators (each episode's `vtt_init` stream), always drawing in the
same order, so an episode's weights do not depend on which other episodes share its batch.

Shapes: E episodes, B samples, S sequence positions (2L), C input width (the joint space), H hidden width,
W output width (the text tower's token-embedding width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Generators = Sequence[torch.Generator]


def _uniform(generators: Generators, shape: tuple[int, ...], bound: float) -> Tensor:
    """One `[E, *shape]` tensor, episode e drawn from `generators[e]`, uniform in ±bound."""
    return torch.stack([(torch.rand(shape, generator=g) * 2 - 1) * bound for g in generators])


class EpisodeLinear(nn.Module):
    """`y = x W_e + b_e` per episode: x `[E, ..., I]` → `[E, ..., O]`; init as `nn.Linear` (bound 1/√I)."""

    def __init__(self, generators: Generators, inputs: int, outputs: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(inputs)
        self.weight = nn.Parameter(_uniform(generators, (inputs, outputs), bound))
        self.bias = nn.Parameter(_uniform(generators, (outputs,), bound)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        out = torch.bmm(flat, self.weight.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias[:, None].to(x.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class EpisodeMLP(nn.Module):
    """Linear → GELU → Linear, per episode: `[E, ..., I]` → `[E, ..., O]`."""

    def __init__(self, generators: Generators, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.fc1 = EpisodeLinear(generators, inputs, hidden)
        self.fc2 = EpisodeLinear(generators, hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def selective_scan(delta: Tensor, u: Tensor, b: Tensor, c: Tensor, a: Tensor) -> Tensor:
    """The recurrence `h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) ⊗ B_t`, `y_t = h_t C_t`, with `h_{−1} = 0`.

    Args:
        delta, u: `[E, B, S, H]`; b, c: `[E, B, S, N]`; a: `[E, 1, H, N]` (negative).

    Returns:
        y `[E, B, S, H]`. Sequential over S, on purpose: at these sizes (S = 2L ≈ 24) a log-depth parallel scan moves
        S× more memory and measured 8× slower on CPU; a hand-written backward over all steps at once `[E, B, S, H, N]`
        measured 2.3× slower on CPU (out of cache), so autograd runs the loop.
    """
    h = torch.zeros(*u.shape[:2], u.shape[-1], a.shape[-1], device=u.device, dtype=u.dtype)  # [E, B, H, N]
    outputs = []
    # Unbinding once (not indexing step t) keeps autograd from writing each step's gradient into a full-length zero
    # tensor: that was a third of the scan's backward.
    steps = zip(delta.unbind(2), (delta * u).unbind(2), b.unbind(2), c.unbind(2), strict=True)
    for delta_t, drive_t, b_t, c_t in steps:
        h = torch.addcmul(torch.exp(delta_t[..., None] * a) * h, drive_t[..., None], b_t[:, :, None, :])
        outputs.append((h * c_t[:, :, None, :]).sum(-1))
    return torch.stack(outputs, dim=2)


class SelectiveScan(nn.Module):
    """One Mamba-style block: input-dependent step Δ, B, C; diagonal A < 0; gated output; residual.

    `[E, B, S, H]` → `[E, B, S, H]`. The sequential scan runs over S (only 2L steps). No local convolution: with 24
    tokens the scan itself sees every position.
    """

    def __init__(self, generators: Generators, width: int, state: int) -> None:
        super().__init__()
        self.in_proj = EpisodeLinear(generators, width, 2 * width)
        self.delta_proj = EpisodeLinear(generators, width, width)
        self.b_proj = EpisodeLinear(generators, width, state, bias=False)
        self.c_proj = EpisodeLinear(generators, width, state, bias=False)
        self.out_proj = EpisodeLinear(generators, width, width)
        episodes = len(generators)
        a = torch.arange(1, state + 1, dtype=torch.float32).expand(episodes, width, state)
        self.a_log = nn.Parameter(torch.log(a).clone())  # S4D-real initialisation
        self.skip = nn.Parameter(torch.ones(episodes, width))

    def forward(self, x: Tensor) -> Tensor:
        e = x.shape[0]
        u, gate = self.in_proj(F.layer_norm(x, x.shape[-1:])).chunk(2, dim=-1)
        u = F.silu(u)
        delta = F.softplus(self.delta_proj(u))  # [E, B, S, H]
        b, c = self.b_proj(u), self.c_proj(u)  # [E, B, S, N]
        a = -torch.exp(self.a_log.float())[:, None]  # [E, 1, H, N]
        y = selective_scan(delta, u, b, c, a) + self.skip.view(e, 1, 1, -1) * u
        return x + self.out_proj(y * F.silu(gate))


class EpisodeAttention(nn.Module):
    """Pre-norm multi-head self-attention with residual: `[E, B, S, H]` → `[E, B, S, H]`."""

    def __init__(self, generators: Generators, width: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads if width % heads == 0 else 1
        self.qkv = EpisodeLinear(generators, width, 3 * width)
        self.out = EpisodeLinear(generators, width, width)

    def forward(self, x: Tensor) -> Tensor:
        e, b, s, w = x.shape
        qkv = self.qkv(F.layer_norm(x, (w,))).view(e * b, s, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(e, b, s, w)
        return x + self.out(attended)


class EpisodeRecurrent(nn.Module):
    """An LSTM or GRU layer with per-episode weights: `[E, B, S, H]` → `[E, B, S, H]` (with residual)."""

    def __init__(self, generators: Generators, width: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        gates = 4 if kind == "lstm" else 3
        self.input_map = EpisodeLinear(generators, width, gates * width)
        self.hidden_map = EpisodeLinear(generators, width, gates * width)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.zeros_like(x[:, :, 0])
        cell = torch.zeros_like(h)
        inputs = self.input_map(x)
        outputs = []
        for t in range(x.shape[2]):
            from_input, from_hidden = inputs[:, :, t], self.hidden_map(h)
            if self.kind == "lstm":
                i, f, g, o = (from_input + from_hidden).chunk(4, dim=-1)
                cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(cell)
            else:
                r_i, z_i, n_i = from_input.chunk(3, dim=-1)
                r_h, z_h, n_h = from_hidden.chunk(3, dim=-1)
                reset, update = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
                candidate = torch.tanh(n_i + reset * n_h)
                h = (1 - update) * candidate + update * h
            outputs.append(h)
        return x + torch.stack(outputs, dim=2)


def sequence_layer(kind: str, generators: Generators, width: int, state: int) -> nn.Module:
    if kind == "ssm":
        return SelectiveScan(generators, width, state)
    if kind == "attention":
        return EpisodeAttention(generators, width)
    return EpisodeRecurrent(generators, width, kind)


class ScanningFusion(nn.Module):
    """μ = μ_res + μ_seq over a V-T sequence, then the absorption adapter: `[E, B, S, C]` → tokens `[E, B, W]`.

    - residual branch: mean over the sequence, then an MLP (C → H → W);
    - sequence branch: a per-token MLP (C → H → H), a learned positional encoding `[S, H]`, `layers` sequence layers
      (`ssm`, `attention`, `lstm` or `gru`), mean over the sequence, a linear map H → W;
      `bidirectional` runs a second stack on the reversed sequence and averages the two;
    - adapter (TIA): an MLP W → H → W with a residual connection, giving the absorption token A.
    """

    def __init__(
        self,
        generators: Generators,
        length: int,
        inputs: int,
        hidden: int,
        outputs: int,
        kind: str = "ssm",
        layers: int = 2,
        state: int = 16,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.residual = EpisodeMLP(generators, inputs, hidden, outputs)
        self.token_mlp = EpisodeMLP(generators, inputs, hidden, hidden)
        self.position = nn.Parameter(_uniform(generators, (length, hidden), 0.02))
        directions = 2 if bidirectional else 1
        self.stacks = nn.ModuleList(
            nn.ModuleList(sequence_layer(kind, generators, hidden, state) for _ in range(layers))
            for _ in range(directions)
        )
        self.sequence_out = EpisodeLinear(generators, hidden, outputs)
        self.adapter = EpisodeMLP(generators, outputs, hidden, outputs)

    def forward(self, sequence: Tensor) -> Tensor:
        mu_res = self.residual(sequence.mean(dim=2))
        tokens = self.token_mlp(sequence) + self.position[:, None].to(sequence.dtype)
        pooled = []
        for direction, stack in enumerate(self.stacks):
            x = tokens.flip(2) if direction == 1 else tokens
            for layer in stack:
                x = layer(x)
            pooled.append(x.mean(dim=2))
        mu = mu_res + self.sequence_out(torch.stack(pooled).mean(dim=0))
        return mu + self.adapter(mu)
