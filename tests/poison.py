"""A test helper that makes the backbone's vision pass return nan features for chosen episodes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from cdfsl.backbone.adapter import ClipAdapter, VisionOutput


class Poison:
    """Makes `ClipAdapter.encode_images` return nan features `[E, B, C]` for the episodes in `rows` (set it to switch
    the poison on and off; empty: the plain output)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, rows: Sequence[int] = ()) -> None:
        self.rows: list[int] = list(rows)
        original = ClipAdapter.encode_images

        def encode_images(adapter: ClipAdapter, *args: Any, **kwargs: Any) -> VisionOutput:
            output = original(adapter, *args, **kwargs)
            if not self.rows:
                return output
            features = output.features.clone()
            features[self.rows] = float("nan")
            return dataclasses.replace(output, features=features)

        monkeypatch.setattr(ClipAdapter, "encode_images", encode_images)
