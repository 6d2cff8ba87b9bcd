"""What a config field accepts: numeric rules (`Rule`, built by `integer`, `number`, `integers`), choices, and the
bounds the built-in parts share. Torch-free and free of `cdfsl.config`, so every part's settings module (and a third
party's) can declare its rules without an import cycle."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cdfsl.errors import ConfigError

ALL_SUPPORT = "all"
MAX_ITERATIONS = 1_000_000  # the recipes train 100 or 250 steps; beyond this a typo, not a run
MAX_HORIZON = 1e6  # cosine period / iterations (8 in the recipes); from about 1e3 on the rate is constant anyway
MAX_LR = 1e6  # an optimizer's step is lr / bias correction in float32: far larger rates overflow it
LR_WHY = "a larger rate overflows the optimizer's float32 step"
DECAY_WHY = "a larger decay overflows the optimizer's float32 step"
MAX_WIDTH = 4096  # LoRA rank and VtT widths allocate per episode and block; wider than any CLIP's projections
MAX_DEPTH = 64  # VtT's sequence layers and convolution kernel (2 and 4 in the recipes)
BLOCK_RANGE = "negative from the end; checked against the backbone's depth when the method is built"


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise `ConfigError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class Rule:
    """What one numeric config field accepts: `allows(value)` decides, `allowed` says the same in words.

    Build rules with `integer`, `number` or `integers`, which derive both from one set of bounds, so the message can
    never disagree with the check.
    """

    key: str
    allows: Callable[[Any], bool]
    allowed: str

    def check(self, value: Any) -> None:
        """Raise `ConfigError` naming the key, the value and the allowed range unless `allows(value)`."""
        if not self.allows(value):
            raise ConfigError(f"{self.key} must be {self.allowed}, got {value!r}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(
    key: str, low: int | None = None, high: int | None = None, *, optional: bool = False, why: str = ""
) -> Rule:
    """An integer in `[low, high]` (either side may be open-ended); `optional`: None (automatic) is allowed too."""

    def allows(value: Any) -> bool:
        if value is None:
            return optional
        return is_int(value) and (low is None or value >= low) and (high is None or value <= high)

    if high is not None:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(low) if low is not None else None
        words = f"{kind} <= {high:,}" if kind else f"an integer in [{low}, {high}]"
    elif low not in (None, 0, 1):
        words, why = f"at least {low}", "a whole number" + (f"; {why}" if why else "")
    else:
        words = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}[low]
    return Rule(key, allows, _words(words, optional, why))


def number(
    key: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    why: str = "",
) -> Rule:
    """A finite number between `low` and `high` (each bound closed unless `*_open`, either may be absent)."""

    def allows(value: Any) -> bool:
        if value is None:
            return optional
        if not _is_real(value):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    if low is not None and high is not None:
        words = f"a number in {'(' if low_open else '['}{_shown(low)}, {_shown(high)}{')' if high_open else ']'}"
    elif low is not None:
        words = f"a finite number {'>' if low_open else '>='} {_shown(low)}"
    elif high is not None:
        words = f"a finite number {'<' if high_open else '<='} {_shown(high)}"
    else:
        words = "a finite number"
    return Rule(key, allows, _words(words, optional, why))


def _shown(bound: float) -> str:
    """A bound as a message shows it: `0`, `180`, `1,000,000`, `0.5`."""
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


def integers(key: str, why: str) -> Rule:
    """A tuple of integers (block indices whose range depends on the backbone: checked when the method is built)."""
    return Rule(key, lambda v: isinstance(v, tuple) and all(is_int(i) for i in v), f"a list of integers ({why})")


def batch_size_allows(value: Any) -> bool:
    return value == ALL_SUPPORT or (is_int(value) and value >= 1)


def _words(words: str, optional: bool, why: str) -> str:
    return words + (" or none (auto)" if optional else "") + (f" ({why})" if why else "")
