"""What a dataset reader produces: an `ImageIndex` of items, labels and class prompt names.

Items are stable string keys (a path relative to the data root, or `digits/00042` for in-memory images), sorted so
that the filesystem's listing order never matters. Episode sampling is a pure function of the index (its classes and
its (key, label) items in order).

The fingerprint, which enters a run's identity (`docs/protocol.md`, "Run identity"), hashes the dataset name, the
classes and, for every item, its key, label, size and content digest, so the same layout with other pixels is another
dataset, and the same bytes at another data root are the same one. Content digests are:

- for a file-backed index (`root` set): sha256 of each file's bytes (`cdfsl.data.fingerprint.file_contents`,
  cached across runs by path and file metadata; only the bytes count, not the times);
- for items that are parts of files (crops, array rows: `cdfsl.data.readers.meta_dataset.items`), the loader's
  `part_contents(keys)` combines each file's digest with the part's description (its box, its row);
- for embedded data, a loader with an `item_contents(keys)` method supplies them (the `digits` loader hashes each
  item's pixel bytes);
- for any other in-memory loader, sha256 of each decoded image's mode, size and pixel bytes.

They are computed once per index object, when first needed (`fingerprint`, `item_digest`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cdfsl.data.classnames import check_distinct_prompts
from cdfsl.data.fingerprint import Content, file_contents, open_regular
from cdfsl.errors import DatasetError


@dataclass(frozen=True)
class ImageIndex:
    """A labelled image collection.

    Attributes:
        name: dataset name (`eurosat`, `digits`, ...).
        class_keys: the raw class identifiers (folder names, CSV columns), label `c` is `class_keys[c]`.
        class_names: the prompt name of each class, same order.
        items: image keys, sorted by (label, key).
        labels: label of each item, same length as `items`.
        loader: opens one item key as an RGB `PIL.Image`; for a file-backed index (`root` set) it also takes the
            file's bytes, `loader(key, data)`, and decodes those instead of reading the file (see `open`).
        root: data root, or None for embedded data.
        skipped: keys left out while indexing (unreadable files, paths escaping the root), for reporting.
        splits: the split of each item (`train`, `val`, `test`), same length as `items`, for a source that
            publishes splits (the CLIP few-shot suite's split files); empty for one that has none. `split(name)`
            gives the index of one split; the split names enter the fingerprint only when present, so an index
            without splits keeps the fingerprint it always had.
    """

    name: str
    class_keys: tuple[str, ...]
    class_names: tuple[str, ...]
    items: tuple[str, ...]
    labels: tuple[int, ...]
    loader: Callable[..., Image.Image] = field(compare=False, repr=False)
    root: Path | None = None
    skipped: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Raises `DatasetError` when two classes share a prompt name (`check_distinct_prompts`)."""
        if len(self.items) != len(self.labels):
            raise ValueError("items and labels differ in length")
        if self.splits and len(self.splits) != len(self.items):
            raise ValueError("splits and items differ in length")
        if len(self.class_keys) != len(self.class_names):
            raise ValueError("class_keys and class_names differ in length")
        check_distinct_prompts(self.name, self.class_keys, self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_keys)

    def items_by_class(self) -> list[list[int]]:
        """Item positions per label, each list in index order."""
        groups: list[list[int]] = [[] for _ in self.class_keys]
        for position, label in enumerate(self.labels):
            groups[label].append(position)
        return groups

    def counts(self) -> list[int]:
        return [len(g) for g in self.items_by_class()]

    @property
    def split_names(self) -> tuple[str, ...]:
        """The splits present, in order of first appearance (empty for an index without splits)."""
        return tuple(dict.fromkeys(self.splits))

    def split(self, name: str) -> ImageIndex:
        """The index of split `name` alone: same name and classes, only that split's items (in index order), its
        own fingerprint (its items' contents only).

        Raises:
            DatasetError: the index has no split `name`.
        """
        if name not in self.splits:
            present = ", ".join(self.split_names) or "none (the source publishes no splits)"
            raise DatasetError(f"{self.name}: no {name!r} split; splits present: {present}")
        keep = [i for i, split in enumerate(self.splits) if split == name]
        return dataclasses.replace(
            self,
            items=tuple(self.items[i] for i in keep),
            labels=tuple(self.labels[i] for i in keep),
            splits=(name,) * len(keep),
        )

    def open(self, position: int) -> Image.Image:
        """Item `position` decoded as RGB, from content whose digest is `item_digest(position)`.

        For a file-backed index the file's bytes are read once, hashed, and those same bytes are decoded, so what is
        decoded is always what the run's fingerprint (taken when it started) describes; a file whose bytes changed
        since is refused, never decoded under the old file's identity.

        Raises:
            DatasetError: the file changed (or went away) since the index was fingerprinted.
            One of `cdfsl.data.decode.DECODE_ERRORS`: the content does not decode.
        """
        key = self.items[position]
        if self.root is None:
            return self.loader(key)
        open_part = getattr(self.loader, "open_part", None)  # items that are parts of files (readers/meta_dataset)
        if open_part is not None:
            return open_part(key, self._contents[position])
        expected = self._contents[position]
        path = self.root / key
        try:
            with open_regular(path) as handle:
                data = handle.read()
        except OSError as error:
            raise DatasetError(
                f"{path} cannot be read any more ({error.strerror or error}) though it was there when the run "
                "started; restore it, or re-run to index the data afresh"
            ) from None
        if len(data) != expected.size or hashlib.sha256(data).hexdigest() != expected.digest:
            raise DatasetError(
                f"{path} changed since the run started (its bytes no longer match the digest taken then); "
                "nothing was stored for it: re-run to use the new file"
            )
        return self.loader(key, data)

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of name, classes, and (key, label, size, content digest) of every item.

        Raises:
            DatasetError: an item's file can no longer be read.
        """
        return self._fingerprint

    def item_digest(self, position: int) -> str:
        """sha256 (64 hex digits) of the content of item `position` (see the module docstring)."""
        return self._contents[position].digest

    @functools.cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.name.encode())
        for key, name in zip(self.class_keys, self.class_names, strict=True):
            digest.update(f"\0class\0{key}\0{name}".encode())
        for item, label, content in zip(self.items, self.labels, self._contents, strict=True):
            digest.update(f"\0item\0{item}\0{label}\0{content.size}\0{content.digest}".encode())
        for split in self.splits:  # absent (and so the fingerprint unchanged) for an index without splits
            digest.update(f"\0split\0{split}".encode())
        return digest.hexdigest()[:16]

    @functools.cached_property
    def _contents(self) -> tuple[Content, ...]:
        """(size, sha256) of every item's content, in index order."""
        if self.root is not None:
            part_contents = getattr(self.loader, "part_contents", None)  # crops, array rows: file + part
            try:
                if part_contents is not None:
                    return tuple(part_contents(self.items))
                return tuple(file_contents([self.root / key for key in self.items]))
            except OSError as error:
                raise DatasetError(
                    f"{self.name}: cannot read an image file to fingerprint it ({error}); "
                    f"check the files under {self.root} and re-run"
                ) from None
        supplied = getattr(self.loader, "item_contents", None)
        if callable(supplied):
            contents = tuple(supplied(self.items))
            if len(contents) != len(self.items):
                raise ValueError("item_contents returned a different number of items")
            return contents
        return tuple(decoded_content(self.loader(key)) for key in self.items)


def decoded_content(image: Image.Image) -> Content:
    """Content of a decoded image: sha256 of its mode, size and pixel bytes."""
    pixels = image.tobytes()
    digest = hashlib.sha256(f"{image.mode}\0{image.width}x{image.height}\0".encode())
    digest.update(pixels)
    return Content(len(pixels), digest.hexdigest())


@dataclass(frozen=True)
class Episode:
    """One few-shot task. Episode label `j` is dataset label `classes[j]`.

    Attributes:
        index: episode number within the run's sequence.
        classes: dataset labels of the `ways` classes, in episode-label order.
        support: per episode class, item positions of its `shots` support images.
        query: per episode class, item positions of its `queries` query images.
    """

    index: int
    classes: tuple[int, ...]
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]

    @property
    def ways(self) -> int:
        return len(self.classes)

    def support_items(self) -> list[tuple[int, int]]:
        """(item position, episode label) for the support set, class-major."""
        return [(item, label) for label, items in enumerate(self.support) for item in items]

    def query_items(self) -> list[tuple[int, int]]:
        """(item position, episode label) for the query set, class-major."""
        return [(item, label) for label, items in enumerate(self.query) for item in items]
