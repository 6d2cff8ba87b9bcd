"""The reader registry: one entry per source layout, as timm's `data/readers/` factory.

A reader turns a downloaded layout (or embedded data) into an `ImageIndex`. Each layout module registers its reader
where it is written (`register_reader(Reader("eurosat", read_eurosat))`); `create_reader(name, root)` indexes the
layout `name` found under `root`. A benchmark (`cdfsl.data.benchmarks.Benchmark`) names the reader it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cdfsl.data.index import ImageIndex
from cdfsl.errors import DatasetError


@dataclass(frozen=True)
class Reader:
    """A source layout's reader.

    Attributes:
        name: the layout's name (`eurosat`, `imagefolder`, ...).
        read: indexes the layout; called with the data root (an existing folder, resolved) when `needs_root`,
            with no argument otherwise (embedded data such as `digits`).
        needs_root: whether the layout is read from a data root.
        layout: the layout on disk, in one line (for listings; "" when not given).
    """

    name: str
    read: Callable[..., ImageIndex]
    needs_root: bool = True
    layout: str = ""


READERS: dict[str, Reader] = {}
"""Every registered reader, by layout name."""


def register_reader(reader: Reader) -> Reader:
    """Add `reader` to `READERS` (returned, so a module can keep it).

    Raises:
        ValueError: a reader of that name is already registered.
    """
    if reader.name in READERS:
        raise ValueError(f"a reader named {reader.name!r} is already registered")
    READERS[reader.name] = reader
    return reader


def create_reader(name: str, root: str | Path | None, dataset: str | None = None) -> ImageIndex:
    """Index the layout `name` found under `root` (ignored by readers that need no root).

    `dataset`: the name errors are reported under (default: `name`).

    Raises:
        DatasetError: unknown reader, missing root, or a missing/malformed layout; the message says what was
            expected and what was found.
    """
    reader = READERS.get(name)
    if reader is None:
        raise DatasetError(f"unknown reader {name!r}; known readers: {', '.join(READERS)}")
    if not reader.needs_root:
        return reader.read()
    return reader.read(require_root(dataset or name, root))


def require_root(dataset: str, data_root: str | Path | None) -> Path:
    """`data_root` as an existing folder, resolved.

    Raises:
        DatasetError: no root given, or it does not exist, or it is a file.
    """
    if data_root is None:
        raise DatasetError(f"{dataset}: a data root is needed (--data-root); none was given")
    root = Path(data_root).expanduser()
    if not root.exists():
        raise DatasetError(f"{dataset}: data root not found: {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{dataset}: data root must be a folder; {root} is a file")
    return root.resolve()
