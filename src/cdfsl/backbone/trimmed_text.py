"""Trainable text encoding on token ids cut after the last end token (tiny-CLIP pretraining).

`ClipAdapter` freezes the model it wraps; pretraining needs the text tower trainable, so this is a separate function.
It lives in `cdfsl.backbone` because it reads open_clip's text-tower internals, which nothing outside this package does.
"""

from __future__ import annotations

import torch
from torch import nn


def encode_text_trimmed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` (unnormalized, `[U, D]`) computed on tokens `[U, 77]` cut after the last end token.

    Exact for open_clip's causal text tower with argmax pooling: positions after a row's end token never influence
    it. Falls back to `encode_text` for other text towers.
    """
    if getattr(model, "text_pool_type", None) != "argmax" or not hasattr(model, "token_embedding"):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max().item()) + 1
    text = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
    projection = model.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection
