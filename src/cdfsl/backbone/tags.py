"""The names of weights that need no model to read: the tiny model's one tag and `--pretrained`'s default.

Kept apart from `factory` (which imports open_clip and torch) so that reading a stored run (labels, reports) can
tell two names of one set of weights apart without loading either."""

from __future__ import annotations

TINY = "tiny"
TINY_TAG = "shipped"  # the tiny model's one set of pretrained weights
DEFAULT_TAG = "openai"  # `--pretrained`'s default: on the tiny model it names `TINY_TAG`


def weights_alias(name: str, pretrained: str) -> str:
    """The one name of the weights `pretrained` gives backbone `name`, where two names mean the same weights (on
    `tiny`, the default tag is its shipped weights); otherwise `pretrained` as given (no tag is checked here)."""
    return TINY_TAG if name == TINY and pretrained == DEFAULT_TAG else pretrained
