"""VtT's V-T cross-layer scanning fusion, with the episode axis on every parameter.

Why our own modules: each episode owns freshly initialised fusion weights, and E episodes train at once, so every
weight is `[E, ...]` and a linear map is a batched matmul. `torch.nn.LSTM`/`GRU`/`MultiheadAttention` hold one set of
weights, and the pure-PyTorch Mamba ports assume one model too; the sequences here are only 2L tokens long, so small
explicit cells (a Mamba-style selective scan, attention, LSTM, GRU) are simpler than vmapping library modules.

Every module initialises from per-episode CPU generators (each episode's `vtt_init` stream), always drawing in the
same order, so an episode's weights do not depend on which other episodes share its batch.

Shapes: E episodes, B samples, S sequence positions (2L), C input width (the joint space), H hidden width,
W output width (the text tower's token-embedding width).

The release's fusion (`ReleaseFusion`): the fusion exactly as the VtT authors' release builds it (their neck in
`Mamba_models/mamba_ffn_neck.py`, used with the 'ssm' version, and its Mamba block in `mamba_simple.py`), again with
an episode axis on every weight; the project's doc page `docs/vtt.md` sets it beside `ScanningFusion`. The S² tokens
of one sample form an S×S grid: a per-token MLP with a LayerNorm over the whole `[S², 2C]` sample and a learned
position embedding, then ONE Mamba block (no residual, no norm inside) run with shared weights over four orderings of
the grid (row-major, reversed, column-major, reversed), the four outputs summed in grid order and averaged over the
tokens, plus a bias-free linear residual of the input's token mean. `[E, B, S², C]` → `[E, B, W]`.
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


def _scan_step(
    h: Tensor, delta_t: Tensor, drive_t: Tensor, b_t: Tensor, c_t: Tensor, a: Tensor
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence: `(h_t, y_t)` from `h_{t−1}` `[E, B, H, N]` and step t's inputs."""
    h = torch.addcmul(torch.exp(delta_t[..., None] * a) * h, drive_t[..., None], b_t[:, :, None, :])
    return h, (h * c_t[:, :, None, :]).sum(-1)


RECOMPUTE_SCAN = True
"""Whether `selective_scan` recomputes its states in backward by default (`benchmarks/saved_activations.py` turns it
off to measure the plain scan)."""


def selective_scan(delta: Tensor, u: Tensor, b: Tensor, c: Tensor, a: Tensor, recompute: bool | None = None) -> Tensor:
    """The recurrence `h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) ⊗ B_t`, `y_t = h_t C_t`, with `h_{−1} = 0`.

    Args:
        delta, u: `[E, B, S, H]`; b, c: `[E, B, S, N]`; a: `[E, 1, H, N]` (negative).
        recompute: keep no state `[E, B, H, N]` for the backward pass and recompute the states there, chunk by chunk
            (`RecomputedScan`): what backward keeps is the inputs alone, S× less than the states (2 per step). Same
            outputs and, step for step, the same gradient arithmetic (`RecomputedScan`). False: autograd keeps every
            step's states (the reference the tests compare against). None: `RECOMPUTE_SCAN`.

    Returns:
        y `[E, B, S, H]`. Sequential over S, on purpose: at these sizes (S = 2L ≈ 24) a log-depth parallel scan moves
        S× more memory and measured 8× slower on CPU; a hand-written backward over all steps at once `[E, B, S, H, N]`
        measured 2.3× slower on CPU (out of cache), so autograd runs the loop.
    """
    drive = delta * u
    if (
        (RECOMPUTE_SCAN if recompute is None else recompute)
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (delta, drive, b, c, a))
    ):
        return RecomputedScan.apply(delta, drive, b, c, a)
    return _plain_scan(delta, drive, b, c, a)


def _plain_scan(delta: Tensor, drive: Tensor, b: Tensor, c: Tensor, a: Tensor) -> Tensor:
    h = torch.zeros(*drive.shape[:2], drive.shape[-1], a.shape[-1], device=drive.device, dtype=drive.dtype)
    outputs = []
    # Unbinding once (not indexing step t) keeps autograd from writing each step's gradient into a full-length zero
    # tensor: that was a third of the scan's backward.
    for delta_t, drive_t, b_t, c_t in zip(delta.unbind(2), drive.unbind(2), b.unbind(2), c.unbind(2), strict=True):
        h, y_t = _scan_step(h, delta_t, drive_t, b_t, c_t, a)
        outputs.append(y_t)
    return torch.stack(outputs, dim=2)


class RecomputedScan(torch.autograd.Function):
    """The selective scan (`_plain_scan` of Δ, Δ⊙u, B, C, A) that saves only its inputs for backward.

    Backward recomputes the states without gradients once, keeping the state at every chunk boundary (⌈√S⌉ steps a
    chunk), then walks the chunks from the last: each is recomputed with autograd from its boundary state and
    backpropagated, its graph freed before the next. Peak extra memory in backward: ⌈√S⌉ boundary states plus one
    chunk's graph (2 states a step), against 2S states kept through the whole backward pass by the plain scan
    (VtT's release fusion at ViT-B/16: 50 → ~15 states of `[E, 4B, 512, 256]` fp32, and only while the fusion's own
    backward runs).

    Every step runs the same ops on the same values as the plain scan, forward and backward; each input step's
    gradient is its own (stacked as `unbind`'s backward stacks them), and A's, which every step adds to, is summed
    in the plain scan's order (the last step first), so the gradients match the plain scan's bit for bit on one
    device (`tests/test_fusion_release.py` checks it).
    """

    @staticmethod
    def forward(ctx: object, delta: Tensor, drive: Tensor, b: Tensor, c: Tensor, a: Tensor) -> Tensor:
        ctx.save_for_backward(delta, drive, b, c, a)  # type: ignore[attr-defined]
        with torch.no_grad():
            return _plain_scan(delta, drive, b, c, a)

    @staticmethod
    def backward(ctx: object, grad_y: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        delta, drive, b, c, a = ctx.saved_tensors  # type: ignore[attr-defined]
        steps = delta.shape[2]
        chunk = max(1, math.isqrt(steps - 1) + 1) if steps > 1 else 1
        starts = list(range(0, steps, chunk))
        inputs = [t.detach() for t in (delta, drive, b, c)]
        boundaries = []
        h = torch.zeros(*drive.shape[:2], drive.shape[-1], a.shape[-1], device=drive.device, dtype=drive.dtype)
        with torch.no_grad():
            for t in range(steps):
                if t in starts:
                    boundaries.append(h)
                h, _ = _scan_step(h, *(x[:, :, t] for x in inputs), a)
        grads: list[list[Tensor | None]] = [[None] * steps for _ in range(4)]
        grad_a: Tensor | None = None
        grad_h: Tensor | None = None
        for start, h_in in zip(reversed(starts), reversed(boundaries), strict=True):
            stop = min(start + chunk, steps)
            with torch.enable_grad():
                h_in_leaf = h_in.detach().requires_grad_(start > 0)
                h = h_in_leaf
                leaves = [[x[:, :, t].detach().requires_grad_() for t in range(start, stop)] for x in inputs]
                a_leaves = [a.detach().requires_grad_() for _ in range(start, stop)]
                outputs = []
                for i in range(stop - start):
                    h, y_t = _scan_step(h, leaves[0][i], leaves[1][i], leaves[2][i], leaves[3][i], a_leaves[i])
                    outputs.append(y_t)
                roots = [torch.stack(outputs, dim=2)]
                root_grads = [grad_y[:, :, start:stop]]
                if grad_h is not None:
                    roots.append(h)
                    root_grads.append(grad_h)
                wanted = [leaf for per_input in leaves for leaf in per_input] + a_leaves
                if start > 0:
                    wanted.append(h_in_leaf)
                found = torch.autograd.grad(roots, wanted, root_grads, allow_unused=True)
            if start > 0:
                grad_h = found[-1]
            n = stop - start
            for k in range(4):
                grads[k][start:stop] = found[k * n : (k + 1) * n]
            for g in reversed(found[4 * n : 5 * n]):  # the last step's contribution first, as the plain scan sums
                if g is not None:
                    grad_a = g if grad_a is None else grad_a + g
        return (*(_stacked(per_step, x) for per_step, x in zip(grads, inputs, strict=True)), grad_a)


def _stacked(per_step: list[Tensor | None], like: Tensor) -> Tensor:
    """Per-step gradients `[E, B, ...]` stacked along dim 2 (zeros where a step got none), as `unbind`'s backward."""
    return torch.stack([g if g is not None else torch.zeros_like(like[:, :, 0]) for g in per_step], dim=2)


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


def parameter_count(module: nn.Module) -> int:
    """The number of parameters of ONE episode: each parameter `[E, ...]` counts `prod(shape[1:])`."""
    return sum(math.prod(parameter.shape[1:]) for parameter in module.parameters())


def _inverse_softplus(x: Tensor) -> Tensor:
    """`y` with `softplus(y) = x`, for `x > 0`: `x + log(−expm1(−x))`."""
    return x + torch.log(-torch.expm1(-x))


class ReleaseTokenMLP(nn.Module):
    """The release's per-token MLP: Linear C→2C (bias) → LayerNorm over the sample → LeakyReLU(0.1) → Linear 2C→C.

    `[E, B, T, C]` → `[E, B, T, C]` with T = S² tokens. The release runs it as 1×1 convolutions on the `[C, S, S]`
    grid with `LayerNorm([2C, S, S])`: here the norm normalises all T tokens and 2C channels of one sample together
    (eps 1e-5), with a per-episode elementwise affine `[E, T, 2C]` (weight ones, bias zeros).
    """

    def __init__(self, generators: Generators, tokens: int, width: int) -> None:
        super().__init__()
        episodes, hidden = len(generators), 2 * width
        self.fc1 = EpisodeLinear(generators, width, hidden)
        self.norm_weight = nn.Parameter(torch.ones(episodes, tokens, hidden))
        self.norm_bias = nn.Parameter(torch.zeros(episodes, tokens, hidden))
        self.fc2 = EpisodeLinear(generators, hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # [E, B, T, 2C]
        normed = F.layer_norm(h, h.shape[-2:], eps=1e-5)
        h = normed * self.norm_weight[:, None].to(normed.dtype) + self.norm_bias[:, None].to(normed.dtype)
        return self.fc2(F.leaky_relu(h, 0.1))


class ReleaseMamba(nn.Module):
    """The release's Mamba block with expand 1 (d_inner = C), per episode: `[E, N, L, C]` → `[E, N, L, C]`.

    in_proj C→2C (no bias) split into x, z; x → depthwise causal conv1d over L (kernel `conv`, with bias; output t
    sees inputs ≤ t) → SiLU; x_proj C→(dt_rank + 2·state) (no bias) split into dt, B, C; Δ = softplus(dt_proj(dt) +
    dt_bias); A = −exp(A_log); y = scan(Δ, x, B, C, A) + D ⊙ x; y ← y · SiLU(z); out_proj C→C (no bias). No residual
    and no norm. The scan and its gate run in fp32 whatever the autocast state; the linear maps may follow autocast.

    Initialisation as the release: `nn.Linear`'s bound 1/√fan_in for in_proj, x_proj, out_proj; the conv's weight and
    bias ±1/√conv (PyTorch's depthwise Conv1d default); dt_proj weight ±dt_rank^−½; `softplus(dt_bias)` log-uniform in
    [1e-3, 0.1], floored at 1e-4; A_log `[E, C, state]` = log(1…state) per channel (S4D-real); D `[E, C]` ones.
    """

    def __init__(self, generators: Generators, width: int, state: int, dt_rank: int, conv: int) -> None:
        super().__init__()
        episodes = len(generators)
        self.state, self.dt_rank, self.conv = state, dt_rank, conv
        self.in_proj = EpisodeLinear(generators, width, 2 * width, bias=False)
        bound = 1.0 / math.sqrt(conv)
        self.conv_weight = nn.Parameter(_uniform(generators, (width, conv), bound))  # [E, C, K]
        self.conv_bias = nn.Parameter(_uniform(generators, (width,), bound))  # [E, C]
        self.x_proj = EpisodeLinear(generators, width, dt_rank + 2 * state, bias=False)
        self.dt_proj = EpisodeLinear(generators, dt_rank, width, bias=False)  # bound dt_rank^−½, as the release
        dt_min, dt_max = 1e-3, 0.1
        dt = torch.stack(
            [
                torch.exp(torch.rand(width, generator=g) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
                for g in generators
            ]
        ).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(_inverse_softplus(dt))  # [E, C]
        a = torch.arange(1, state + 1, dtype=torch.float32).expand(episodes, width, state)
        self.a_log = nn.Parameter(torch.log(a).clone())  # [E, C, state], S4D-real, kept in fp32
        self.skip = nn.Parameter(torch.ones(episodes, width))  # D [E, C]
        self.out_proj = EpisodeLinear(generators, width, width, bias=False)

    def causal_conv(self, x: Tensor) -> Tensor:
        """Depthwise causal convolution over L: `[E, N, L, C]` → `[E, N, L, C]`, zero left padding of `conv − 1`."""
        length = x.shape[2]
        padded = F.pad(x, (0, 0, self.conv - 1, 0))  # [E, N, L + K − 1, C]
        weight = self.conv_weight.to(x.dtype)
        out = self.conv_bias[:, None, None].to(x.dtype)
        for k in range(self.conv):
            out = out + weight[:, None, None, :, k] * padded[:, :, k : k + length]
        return out

    def forward(self, x: Tensor) -> Tensor:
        e = x.shape[0]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [E, N, L, C] each
        u = F.silu(self.causal_conv(u))
        dt, b, c = self.x_proj(u).split([self.dt_rank, self.state, self.state], dim=-1)
        dt = self.dt_proj(dt)  # [E, N, L, C]
        with torch.autocast(device_type=x.device.type, enabled=False):
            delta = F.softplus(dt.float() + self.dt_bias.float()[:, None, None])
            a = -torch.exp(self.a_log.float())[:, None]  # [E, 1, C, state]
            u32 = u.float()
            y = selective_scan(delta, u32, b.float(), c.float(), a) + self.skip.float().view(e, 1, 1, -1) * u32
            y = y * F.silu(z.float())
        return self.out_proj(y.to(u.dtype))


class ReleaseFusion(nn.Module):
    """The fusion of the VtT authors' release, per episode: a sequence `[E, B, S², C]` → `[E, B, W]`.

    It follows the VtT authors' release, `Mamba_models/mamba_ffn_neck.py` (its neck, 'ssm' version, two-layer MLP,
    residual projection) and `mamba_simple.py` (its Mamba block, expand 1), as described in `docs/vtt.md`:

    1. tokens = `ReleaseTokenMLP`(sequence) + position `[S², C]` (truncated normal, std 0.02, cut at ±2);
    2. ONE `ReleaseMamba` block, shared, over four orderings of the S×S grid (row-major, reversed row-major,
       column-major, reversed column-major), batched as one call along the B axis;
    3. the four outputs put back in row-major grid order, summed, and averaged over the S² tokens → `[E, B, C]`;
    4. plus `residual`: a bias-free linear C→C of the INPUT sequence's token mean;
    5. when W ≠ C, a bias-free linear C→W `head` (the release has none: its text width equals C = 512); else none.

    Args:
        generators: one CPU generator per episode (E of them); each episode's weights come from its own.
        grid: S, the side of the token grid (the sequence holds S² tokens, row-major).
        width: C, the token width. outputs: W, the output width.
        state: the SSM state size N. dt_rank: the rank of Δ's projection. conv: the causal conv's kernel.
    """

    def __init__(
        self,
        generators: Generators,
        grid: int,
        width: int,
        outputs: int,
        state: int = 256,
        dt_rank: int = 256,
        conv: int = 4,
    ) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be at least 1, got {grid}")
        for name, value in (("width", width), ("outputs", outputs), ("state", state), ("dt_rank", dt_rank)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if conv < 1:
            raise ValueError(f"conv must be positive, got {conv}")
        self.grid, self.width = grid, width
        tokens = grid * grid
        self.position = nn.Parameter(
            torch.stack(
                [torch.nn.init.trunc_normal_(torch.empty(tokens, width), std=0.02, generator=g) for g in generators]
            )
        )  # [E, S², C]
        self.token_mlp = ReleaseTokenMLP(generators, tokens, width)
        self.block = ReleaseMamba(generators, width, state, dt_rank, conv)
        self.residual = EpisodeLinear(generators, width, width, bias=False)
        self.head = EpisodeLinear(generators, width, outputs, bias=False) if outputs != width else None

    def transpose_grid(self, x: Tensor) -> Tensor:
        """Row-major ↔ column-major order of the S×S grid: `[E, N, S², C]` → `[E, N, S², C]` (its own inverse)."""
        e, n, _, c = x.shape
        return x.view(e, n, self.grid, self.grid, c).transpose(2, 3).reshape(e, n, self.grid * self.grid, c)

    def forward(self, sequence: Tensor) -> Tensor:
        """`sequence` `[E, B, S², C]` → `[E, B, W]`."""
        tokens = self.grid * self.grid
        if sequence.dim() != 4 or sequence.shape[2] != tokens:
            raise ValueError(
                f"expected a sequence [E, B, {tokens}, C] (grid {self.grid}² tokens), got {tuple(sequence.shape)}"
            )
        batch = sequence.shape[1]
        x = self.token_mlp(sequence) + self.position[:, None].to(sequence.dtype)  # [E, B, S², C]
        columns = self.transpose_grid(x)
        orders = torch.cat([x, x.flip(2), columns, columns.flip(2)], dim=1)  # [E, 4B, S², C]
        row, row_flip, column, column_flip = self.block(orders).split(batch, dim=1)
        summed = row + row_flip.flip(2) + self.transpose_grid(column) + self.transpose_grid(column_flip.flip(2))
        out = summed.mean(dim=2) + self.residual(sequence.mean(dim=2))  # [E, B, C]
        return self.head(out) if self.head is not None else out
