"""Where probe results go: one JSON file of every number and PNG figures sized for a paper column.

Figures are `matplotlib.figure.Figure` objects on the Agg renderer (no pyplot, no global figure state), 3.5 in wide,
fonts of 8 pt, saved at 200 dpi. Numbers are written as plain JSON: NaN and infinities become `null`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cdfsl.analysis.figure_style import COLUMN_WIDTH_IN, DPI

# Colors per condition (before / fine-tuned methods), fixed so that every figure of a probe agrees.
CONDITION_COLORS = ("#4d4d4d", "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e")


def new_figure(height_in: float, width_in: float = COLUMN_WIDTH_IN) -> Figure:
    """An Agg figure with constrained layout, a column wide by default."""
    return Figure(figsize=(width_in, height_in), layout="constrained")


def save_figure(figure: Figure, out: Path, stem: str) -> Path:
    """Save `figure` as `out/stem.png` at 200 dpi; return the path."""
    path = out / f"{stem}.png"
    figure.savefig(path, dpi=DPI)
    return path


def plain(value: Any) -> Any:
    """Tensors, numpy values, tuples and non-finite floats → JSON-ready Python values (NaN/inf → None)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_result(result: dict[str, Any], out: Path | None, name: str, figures: Sequence[Path]) -> dict[str, Any]:
    """Record the figure file names in `result["figures"]`, write `out/name.json` (when `out` is given) and return
    the JSON-ready dict (identical to the file's content)."""
    result = plain({**result, "figures": [Path(f).name for f in figures]})
    if out is not None:
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def condition_color(position: int) -> str:
    return CONDITION_COLORS[position % len(CONDITION_COLORS)]
