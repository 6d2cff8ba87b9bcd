"""What the command line prints and where: the two consoles, user text made printable, listings that never break a
name, and the checks, before any work, that a file or folder output can be written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cdfsl.errors import ConfigError
from cdfsl.files import same_file

console = Console(stderr=True)
out = Console()


def shown(text: object) -> str:
    r"""`text` as valid UTF-8 for the terminal: a name that is not valid UTF-8 (surrogate-escaped by the filesystem
    layer) keeps its undecodable bytes as `\udcff`-style escapes instead of crashing the print."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def counted(number: int, noun: str) -> str:
    """`1 figure`, `2 figures`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def plain(text: object) -> Text:
    """A table cell or message part with user-supplied text: printable (`shown`) and never read as rich markup."""
    return Text(shown(text))


def check_output_file(path: Path, option: str, store: Path | None = None) -> None:
    """Refuse, before any work, a file output that could not be written afterwards.

    The parent folder must exist (it is never created) and be writable, `path` must not be a folder, and it must
    not be the result store `store`; an existing file is overwritten.
    """
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file path (an existing file is overwritten)")
    _check_parent(path, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path} is not writable; change its permissions or choose another path")
    if store is not None and same_file(path, store):
        raise ConfigError(f"{option} {path} is the result store (--db); choose another path")


def check_output_folder(path: Path, option: str) -> None:
    """Refuse, before any work, a folder output that could not be written afterwards.

    `path` must be a folder or not exist; when it does not exist its parent must be an existing, writable folder
    (the output folder itself is created, deeper trees are not).
    """
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {path} is a file, not a folder; remove it or choose another folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} folder {path} is not writable; change its permissions or choose another")
        return
    _check_parent(path, option)


def _check_parent(path: Path, option: str) -> None:
    parent = path.parent
    if not parent.exists():
        raise ConfigError(f"{option} {path}: folder {parent} does not exist; create it or choose another path")
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: folder {parent} is not writable; choose another path")


ListingFormat = Annotated[str, typer.Option("--format", help="table, or json for scripts.")]


def check_listing_format(format_: str) -> None:
    if format_ not in ("table", "json"):
        raise ConfigError(f"--format must be table or json, not {format_!r}")


def print_json(data: Any) -> None:
    out.print(json.dumps(data, indent=2), markup=False, highlight=False, soft_wrap=True)


def print_listing(table: Table) -> None:
    """Print a listing without breaking a word: a `no_wrap` column (names) is never wrapped, the others wrap between
    words only. The table takes the console's width, or more when its names and longest words need it (stdout to a
    pipe gets 80 columns, and a script greps for a whole model name)."""
    columns = table.columns
    lowest, highest = [], []
    for column in columns:
        texts = [str(cell) for cell in (column.header, *column.cells)]
        longest = max(cell_len(text) for text in texts)
        lowest.append(longest if column.no_wrap else max(cell_len(w) for text in texts for w in text.split() or [""]))
        highest.append(longest)
    frame = 3 * len(columns) + 1  # a space each side of a cell, a rule after it, and the left edge
    width = max(out.width, sum(lowest) + frame)
    widths, spare = list(lowest), width - sum(lowest) - frame
    # share the spare width out evenly, a column that needs less than its share taking just what it needs
    pending = sorted(range(len(columns)), key=lambda i: highest[i] - lowest[i])
    while pending:
        share = spare // len(pending)
        need = highest[pending[0]] - lowest[pending[0]]
        if need > share:
            for i in pending:
                widths[i] += share
            break
        widths[pending.pop(0)] += need
        spare -= need
    for column, column_width in zip(columns, widths, strict=True):
        column.width = column_width
    Console(width=width).print(table)  # `out.print(width=)` would not go beyond the console's width
