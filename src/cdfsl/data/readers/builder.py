"""What the folder and CSV readers share: an `IndexBuilder` that collects (key, label) pairs under a data root, leaves
out (and reports) what `cdfsl.data.file_checks` refuses, and builds the `ImageIndex`; and listing and CSV helpers.

Item keys are POSIX paths relative to the data root, items are sorted by (label, key) and folder-class keys are
sorted, so the filesystem's listing order never matters. A class that ends up with no images stays in the class list
(the episode sampler excludes and reports it). A folder that cannot be listed (permission denied) is reported, not
silently counted as empty.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cdfsl.data import file_checks
from cdfsl.data.decode import open_rgb
from cdfsl.data.file_checks import IMAGE_EXTENSIONS, warn_names
from cdfsl.data.index import ImageIndex
from cdfsl.errors import DatasetError


@dataclass
class IndexBuilder:
    """Collects (key, label) pairs, checks files, reports skipped entries and builds the `ImageIndex`.

    `opener(root, key)` opens one item as RGB; the index's loader is `functools.partial(opener, root)`, so the
    opener must be a module-level function for the index to pickle into data-loader workers.
    """

    name: str
    root: Path
    class_keys: Sequence[str]
    class_names: Sequence[str]
    opener: Callable[[Path, str], Image.Image] = open_rgb
    pairs: list[tuple[int, str]] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)  # named like images, not regular files
    escaping: list[str] = field(default_factory=list)  # symlinks resolving outside the data root
    unlistable: list[str] = field(default_factory=list)  # folders that could not be listed
    undecodable: list[str] = field(default_factory=list)  # names that are not UTF-8 (surrogate escapes)
    splits: dict[str, str] = field(default_factory=dict)  # key -> its split, for a source that publishes splits
    _seen: set[str] = field(default_factory=set)
    _resolved: dict[Path, Path] = field(default_factory=dict)

    def add_files(self, label: int, keys: Iterable[str], split: str | None = None) -> None:
        for key in keys:
            self._add(label, key, split)

    def add_folder(self, label: int, folder: Path, split: str | None = None) -> None:
        """Add the image files directly in `folder` (a class folder under the root) and in every folder below it;
        `split`: the split they belong to (`train`, `val`, `test`), for a source that publishes splits.

        Hidden entries are ignored; subfolder symlinks are not followed. An entry named like an image is left out
        (and reported) when it is not a regular file, when it is a symlink resolving outside both the data root and
        the resolved `folder`, or when its name is not UTF-8 (`file_checks.entry_kind`); a folder that cannot be
        listed is reported.
        """
        boundaries = (os.path.realpath(self.root), os.path.realpath(folder))
        pending = [(folder, Path(folder).relative_to(self.root).as_posix() + "/")]
        keys: list[str] = []
        while pending:
            current, prefix = pending.pop()
            try:
                with os.scandir(current) as listing:
                    entries = list(listing)
            except OSError:
                self.unlistable.append(prefix.rstrip("/"))
                continue
            for entry in entries:
                name = entry.name
                if file_checks.is_hidden(name):
                    continue
                if not file_checks.is_decodable(name):
                    self.undecodable.append(prefix + name)
                    continue
                kind = file_checks.entry_kind(entry, boundaries)
                if kind == "folder":
                    pending.append((Path(entry.path), prefix + name + "/"))
                elif kind == "file" and file_checks.is_image_name(name):
                    keys.append(prefix + name)
                elif kind == "escaping" and file_checks.is_image_name(name):
                    self.escaping.append(prefix + name)
                elif kind == "special" and file_checks.is_image_name(name):
                    self.special.append(prefix + name)
        self.add_files(label, sorted(keys), split)

    def file_names(self, folder: Path) -> frozenset[str]:
        """Names of the regular files (symlinks followed) in `folder`; names that are not UTF-8 are left out and
        reported.

        Raises:
            DatasetError: `folder` cannot be listed.
        """
        names: set[str] = set()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not file_checks.is_regular(entry):
                        continue
                    if file_checks.is_decodable(entry.name):
                        names.add(entry.name)
                    elif not file_checks.is_hidden(entry.name):
                        self.undecodable.append((folder / entry.name).relative_to(self.root).as_posix())
        except OSError as error:
            raise DatasetError(
                f"{self.name}: cannot list {folder}: {error.strerror or error}; check its permissions"
            ) from None
        return frozenset(names)

    def add_csv_entry(
        self, label: int, folder: Path, name: str, present: Container[str], split: str | None = None
    ) -> None:
        """Add `folder/name` named by a CSV row (or a split file's entry, of `split`) unless unsafe or missing
        (`present`: names in `folder`)."""
        if folder not in self._resolved:
            self._resolved[folder] = folder.resolve()
        if file_checks.unsafe_name(name) or not file_checks.resolves_inside(self._resolved[folder], folder, name):
            self.unsafe.append(name)
        elif name not in present:
            self.missing.append((folder / name).relative_to(self.root).as_posix())
        else:
            self._add(label, (folder / name).relative_to(self.root).as_posix(), split)

    def _add(self, label: int, key: str, split: str | None = None) -> None:
        if key in self._seen:
            self.duplicate.append(key)
            return
        self._seen.add(key)
        self.pairs.append((label, key))
        if split is not None:
            self.splits[key] = split

    def build(self, min_classes: int = 2) -> ImageIndex:
        """The index of the readable files added, sorted by (label, key).

        Raises:
            DatasetError: no readable image at all, or images in fewer than `min_classes` classes.
        """
        pairs = sorted(self.pairs)
        found = file_checks.check_files(self.root, [key for _, key in pairs])
        unreadable = [key for (_, key), ok in zip(pairs, found, strict=True) if not ok]
        pairs = [pair for pair, ok in zip(pairs, found, strict=True) if ok]
        self._report(unreadable)
        if not pairs:
            raise DatasetError(
                f"{self.name}: zero images found under {self.root} (expected image files with extensions "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}; {len(unreadable)} unreadable, "
                f"{len(self.missing)} missing, {len(self.unsafe)} unsafe, "
                f"{len(self.special) + len(self.escaping) + len(self.undecodable)} other skipped)"
            )
        with_images = sorted({label for label, _ in pairs})
        if len(with_images) < min_classes:
            raise DatasetError(
                f"{self.name}: expected images in at least {min_classes} classes; found images only in "
                f"{describe([self.class_keys[c] for c in with_images])} under {self.root}"
            )
        return ImageIndex(
            name=self.name,
            class_keys=tuple(self.class_keys),
            class_names=tuple(self.class_names),
            items=tuple(key for _, key in pairs),
            labels=tuple(label for label, _ in pairs),
            loader=functools.partial(self.opener, self.root),
            root=self.root,
            splits=tuple(self.splits[key] for _, key in pairs) if self.splits else (),
            skipped=(
                tuple(sorted(self.unsafe))
                + tuple(sorted(self.missing))
                + tuple(unreadable)
                + tuple(sorted(self.escaping))
                + tuple(sorted(self.special))
                + tuple(sorted(file_checks.printable(n) for n in self.undecodable))
            ),
        )

    def _report(self, unreadable: Sequence[str]) -> None:
        warn_names(
            sorted(self.unsafe),
            f"{self.name}: skipped {{n}} CSV entr(ies) whose file name is unsafe (a control character) or does not "
            "resolve inside the image folder",
        )
        warn_names(sorted(self.missing), f"{self.name}: skipped {{n}} CSV row(s) whose image file is missing")
        warn_names(sorted(self.duplicate), f"{self.name}: ignored {{n}} repeated entr(ies) for the same file")
        warn_names(
            sorted(self.unlistable),
            f"{self.name}: could not list {{n}} folder(s) (permission denied?), so their images are left out; "
            "fix the permissions to include them",
        )
        warn_names(
            sorted(self.undecodable),
            f"{self.name}: skipped {{n}} file or folder name(s) that are not valid UTF-8; rename them to include them",
        )
        warn_names(
            sorted(self.escaping),
            f"{self.name}: skipped {{n}} symlink(s) whose target lies outside the data root",
        )
        warn_names(
            sorted(self.special),
            f"{self.name}: skipped {{n}} entr(ies) named like images that are not regular files "
            "(FIFO, device, socket, broken symlink)",
        )
        warn_names(unreadable, f"{self.name}: skipped {{n}} unreadable image file(s)")


def class_folders(base: Path, dataset: str) -> list[str]:
    """Sorted names of the non-hidden subfolders of `base` (symlinks followed); undecodable names warned about.

    Raises:
        DatasetError: `base` cannot be listed.
    """
    if not base.is_dir():
        return []
    names: list[str] = []
    undecodable: list[str] = []
    try:
        with os.scandir(base) as entries:
            for entry in entries:
                if file_checks.is_hidden(entry.name) or not file_checks.is_folder(entry):
                    continue
                (names if file_checks.is_decodable(entry.name) else undecodable).append(entry.name)
    except OSError as error:
        raise DatasetError(f"{dataset}: cannot list {base}: {error.strerror or error}; check its permissions") from None
    warn_names(sorted(undecodable), f"{dataset}: skipped {{n}} class folder(s) whose name is not valid UTF-8")
    return sorted(names)


def read_csv(path: Path, dataset: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header (stripped names) and rows (stripped values, missing cells as "") of a CSV file; blank lines skipped.

    Raises:
        DatasetError: the file cannot be read or parsed.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            rows = [
                {name: value.strip() for name, value in zip(header, line, strict=False)}
                for line in reader
                if any(value.strip() for value in line)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{dataset}: cannot read {path}: {error}") from error
    for row in rows:
        for name in header:
            row.setdefault(name, "")
    return header, rows


def describe(names: Sequence[str], limit: int = 10) -> str:
    """Up to `limit` names joined for a message (`none` when empty)."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"
