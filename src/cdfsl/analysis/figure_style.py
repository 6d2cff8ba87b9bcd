"""One look for every figure cdfsl draws: paper-column sizes, 8 pt fonts, 200 dpi PNG."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib

DPI = 200
COLUMN_WIDTH_IN = 3.5
PAGE_WIDTH_IN = 7.0
FONT_PT = 8
# Height one line of 8 pt text takes (inches, with line spacing): to size figures for wrapped titles and labels.
TEXT_LINE_IN = 0.17
PAPER_RC = {
    "font.size": FONT_PT,
    "axes.titlesize": FONT_PT + 1,
    "axes.labelsize": FONT_PT,
    "xtick.labelsize": FONT_PT,
    "ytick.labelsize": FONT_PT,
    "legend.fontsize": FONT_PT,
    "legend.title_fontsize": FONT_PT,
    "figure.titlesize": FONT_PT + 1,
    "figure.labelsize": FONT_PT,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
}


@contextmanager
def paper_style() -> Iterator[None]:
    """Figures made inside use `PAPER_RC` (8 pt fonts, no top/right spines)."""
    with matplotlib.rc_context(PAPER_RC):
        yield
