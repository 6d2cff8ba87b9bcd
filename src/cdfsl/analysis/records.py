"""Per-episode records of a stored run, summarised by name for reports and `compare`.

A method may record, per episode, named values beyond accuracy (`Method.episode_records`: VtT's `dlc_off_step`,
MaPLe's `maple_first_epoch_loss` and `maple_last_epoch_loss`); the store keeps them as they are
(`ResultStore.episode_records`). Nothing here knows a record by name: every record is summarised the same way,
over the run's episodes — in how many episodes it has a value (null counts as none: VtT's step when the loss was
never switched off), and for numbers their median, mean and range.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cdfsl.engine.store import record_names


@dataclass(frozen=True)
class RecordSummary:
    """One record of one run: its value per stored episode (episode order; None where the episode has none),
    `present` = how many have one, and, when every present value is a number, their median, mean, min and max."""

    name: str
    values: tuple[Any, ...]
    present: int
    median: float | None = None
    mean: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def episodes(self) -> int:
        return len(self.values)

    def text(self) -> str:
        """`dlc_off_step: in 3 of 10 episodes, median 12, mean 12.33, range 5–20` (numbers), or the count alone."""
        line = f"{self.name}: in {self.present} of {self.episodes} episodes"
        if self.median is None:
            return line
        spread = f", range {_number(self.low)}–{_number(self.high)}" if self.low != self.high else ""
        return f"{line}, median {_number(self.median)}, mean {_number(self.mean)}{spread}"

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> RecordSummary:
        """The summary `to_dict` gave (as `compare --json` writes it)."""
        return cls(
            name, tuple(data["per_episode"]), data["present"], data["median"], data["mean"], data["min"], data["max"]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "present": self.present,
            "median": self.median,
            "mean": self.mean,
            "min": self.low,
            "max": self.high,
            "per_episode": list(self.values),
        }


def summarise_records(per_episode: Mapping[int, Mapping[str, Any]]) -> list[RecordSummary]:
    """A summary per record name (in `record_names` order) over `per_episode` (episode index → that episode's
    records, as `ResultStore.episode_records` gives them); empty when no episode recorded anything."""
    episodes = sorted(per_episode)
    summaries = []
    for name in record_names(per_episode.values()):
        values = tuple(per_episode[episode].get(name) for episode in episodes)
        present = [value for value in values if value is not None]
        numbers = [float(v) for v in present if isinstance(v, int | float) and not isinstance(v, bool)]
        if present and len(numbers) == len(present):
            stats = statistics.median(numbers), statistics.fmean(numbers), min(numbers), max(numbers)
            summaries.append(RecordSummary(name, values, len(present), *stats))
        else:
            summaries.append(RecordSummary(name, values, len(present)))
    return summaries


def records_dict(summaries: list[RecordSummary]) -> dict[str, dict[str, Any]]:
    """Record name → its summary as JSON (`RecordSummary.to_dict`), in summary order."""
    return {summary.name: summary.to_dict() for summary in summaries}


def _number(value: float | None) -> str:
    """A whole number as such (a step), any other to 4 significant digits (a loss)."""
    if value is None:
        return "–"
    return f"{value:.0f}" if value == int(value) else f"{value:.4g}"
