"""The one tolerance of every "E episodes at once equal each alone" test (docs/methods.md, "Training many episodes at
once").

Why a tolerance and not bit-for-bit equality: a batch of E episodes runs every frozen op of both towers on E times
the rows, and the text sequence is cut after the batch's longest prompt. Which CPU kernel (and so which summation
order inside a dot product, a softmax or an attention) computes a row depends on the call's shapes and on the CPU's
instruction set (`ATEN_CPU_CAPABILITY`, the BLAS's own dispatch). On one machine the batched and the single runs often
agree to the last bit; on another (an AVX-512 Xeon) the same code differs in the last bits of some ops. Training then
carries those differences on: a step's update is a smooth function of its gradient, so each step adds about the
rounding of its own passes, scaled by the learning rate and by how sharply the loss bends.

What the computation guarantees, in cosine units (a logit divided by the logit scale; a feature divided by its norm):
fp32 rounds each op to u = 2^-24 ≈ 6e-8, and a forward pass through two 12-block towers lands within a few u
(measured: 2.6e-7 between kernels for `zeroshot`). Two training steps then amplify it; the worst measured is the
learned prompt context on the PE-Core family (SGD on the context through the causal text tower): 3.7e-6 when the
single run computes with other kernels than the batched one (`ATEN_CPU_CAPABILITY=default` against `avx2`). The
tolerance, 1e-5 (≈ 170 u), leaves a margin of 2.7 over that, while one training step moves the cosines by 4e-5
(MaPLe at its warm-up rate) to 1e-1: an episode that gets another episode's gradient, random draw or parameters
fails by far. It holds for the tests' fits of one or two steps (a longer fit would amplify more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cdfsl.methods.base import Method

COSINE_TOLERANCE = 1e-5
"""Largest difference, in cosine units, between an episode trained in a batch and the same episode trained alone."""


def logit_scale_of(method: Method) -> float:
    """The factor between `method`'s logits and cosines (its train.logit_scale, or MaPLe's CLIP scale): the logit of
    a unit vector against itself."""
    unit = F.normalize(torch.ones(1, 1, method.backbone.embed_dim), dim=-1).to(method.backbone.device)
    return float(method.logits(unit, unit)[0, 0, 0])


def assert_same_as_alone(alone: Tensor, together: Tensor, unit: float | None = None) -> None:
    """`alone` (an episode's result run by itself) equals `together` (its slice of the batched run) within
    `COSINE_TOLERANCE · unit`, elementwise.

    Args:
        alone, together: logits `[Q, K]` or features `[..., C]` of one episode, same shape.
        unit: the size one cosine has in these numbers: the logit scale for logits (`logit_scale_of`); None for
            features: the largest L2 norm of a feature vector (last axis) in `together`.
    """
    if unit is None:
        unit = float(together.float().norm(dim=-1).max())
    torch.testing.assert_close(alone, together, atol=COSINE_TOLERANCE * unit, rtol=0)
