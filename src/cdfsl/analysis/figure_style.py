"""One look for every figure cdfsl draws: paper-column sizes, 8 pt fonts, 200 dpi PNG."""

from __future__ import annotations

DPI = 200
COLUMN_WIDTH_IN = 3.5
PAGE_WIDTH_IN = 7.0
FONT_PT = 8
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
