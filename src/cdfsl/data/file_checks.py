"""File safety: which entries under a data root may be indexed, and which image files can be read.

What is left out, never shifting other labels (the readers list each kind in `ImageIndex.skipped` and report it in one
`DatasetWarning` per reader call naming up to five entries, with `repr`, so any name prints):

- Unreadable files. Every image file gets a cheap check at indexing (`readable`): Pillow must identify it as one of
  `IMAGE_FORMATS` (JPEG, PNG, BMP, TIFF, WebP; no other Pillow parser ever runs, whatever the extension says) from
  its header, and a PNG must end with its IEND chunk and a JPEG with its EOI marker (trailing zero bytes allowed;
  only the last 4 KiB are read, `ends_complete`), so a file cut short is left out here rather than stopping a run
  half-way. Files damaged in the middle pass this check; `deep_check` decodes every item to find them.
- Folder layouts (`entry_kind`): entries named like images that are not regular files (a FIFO would hang the reader,
  a device, a broken symlink), and symlinks whose target resolves outside both the data root and the class folder
  they are listed in (a class folder that is itself a symlink is followed). Subfolder symlinks are not followed.
- A file name read from a CSV (`unsafe_name`, `resolves_inside`) must resolve (symlinks followed) inside the image
  folder it is looked up in; `../x.png`, an absolute path, or a name holding a control character (NUL, newline, ...)
  is skipped with a warning naming it.
- File and folder names that are not valid UTF-8 (Python sees them with surrogate escapes, `is_decodable`) are
  skipped; they are listed with the undecodable bytes written as `\\udcXX` (`printable`).

Image files are those with extension .jpg .jpeg .png .bmp .tif .tiff .webp (any case, `is_image_name`); hidden files
and folders (name starting with `.`, such as `.DS_Store` or macOS `._x.jpg`) are ignored.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, Literal

from PIL import Image

from cdfsl.data.decode import DECODE_ERRORS, IMAGE_FORMATS
from cdfsl.data.fingerprint import open_regular
from cdfsl.data.index import ImageIndex
from cdfsl.errors import DatasetWarning

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

EntryKind = Literal["folder", "file", "escaping", "special", "link"]

_HEADER_CHECK_WORKERS = 8
_NAMES_IN_WARNING = 5
_TAIL_BYTES = 4096  # how much of a file's end the indexing check reads
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: zero length, type, CRC
_JPEG_END = b"\xff\xd9"  # the EOI marker


# ----------------------------------------------------------------------------------------------------
# names


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_decodable(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (surrogate escapes from the OS listing)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """`name` with undecodable bytes written as `\\udcXX`, safe to print anywhere."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def unsafe_name(name: str) -> bool:
    """True for names that are empty, hold a control character, are absolute (POSIX or Windows style), or climb
    with `..`."""
    if not name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return True
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        return True
    return PureWindowsPath(name).drive != "" or ".." in PurePosixPath(name.replace("\\", "/")).parts


def resolves_inside(resolved_folder: Path, folder: Path, name: str) -> bool:
    """True if `folder/name`, all symlinks resolved, lies inside `resolved_folder` (`folder.resolve()`)."""
    return (folder / name).resolve().is_relative_to(resolved_folder)


# ----------------------------------------------------------------------------------------------------
# folder entries


def entry_kind(entry: os.DirEntry[str], boundaries: Sequence[str]) -> EntryKind:
    """`folder` (a real subfolder), `file` (a regular file, or a symlink to one inside a boundary), `escaping`
    (a symlink resolving outside every boundary: real paths, such as the data root and the class folder),
    `special` (anything else: FIFO, device, socket, broken or looping symlink), or `link` (a symlink to a folder,
    not followed)."""
    try:
        if not entry.is_symlink():
            if entry.is_dir(follow_symlinks=False):
                return "folder"
            return "file" if entry.is_file(follow_symlinks=False) else "special"
        target = os.path.realpath(entry.path)
        if not any(target == b or target.startswith(b.rstrip(os.sep) + os.sep) for b in boundaries):
            return "escaping"
        if entry.is_dir():
            return "link"
        return "file" if entry.is_file() else "special"
    except OSError:
        return "special"


def is_regular(entry: os.DirEntry[str]) -> bool:
    """True for a regular file, symlinks followed (a FIFO, device or broken link is not)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def is_folder(entry: os.DirEntry[str]) -> bool:
    """True for a folder, symlinks followed; False when it cannot be told."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def image_files(folder: Path) -> list[Path]:
    """Every image file (by extension, not hidden, a regular file) in `folder` and below it, sorted."""
    found = []
    for current, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if not is_hidden(f))
        found += [Path(current) / name for name in files if is_decodable(name) and is_image_name(name)]
    return sorted(p for p in found if p.is_file())


# ----------------------------------------------------------------------------------------------------
# file contents


def readable(path: Path) -> bool:
    """Cheap readability check: a regular file that Pillow identifies as one of `IMAGE_FORMATS` from its header,
    and, for PNG and JPEG, whose end is the format's end marker (`ends_complete`)."""
    try:
        with open_regular(path) as handle, Image.open(handle, formats=IMAGE_FORMATS) as image:
            image.size  # noqa: B018 - touching the header is the point
            return ends_complete(handle, image.format)
    except DECODE_ERRORS:
        return False


def ends_complete(handle: BinaryIO, image_format: str | None) -> bool:
    """True unless a PNG's last bytes are not the IEND chunk or a JPEG's are not the EOI marker (trailing zero bytes
    allowed); other formats are not checked. Reads at most the last `_TAIL_BYTES` bytes."""
    marker = {"PNG": _PNG_END, "JPEG": _JPEG_END, "MPO": _JPEG_END}.get(image_format or "")
    if marker is None:
        return True
    size = os.fstat(handle.fileno()).st_size
    handle.seek(max(0, size - _TAIL_BYTES))
    return handle.read(_TAIL_BYTES).rstrip(b"\0").endswith(marker)


def check_files(root: Path, keys: Sequence[str]) -> list[bool]:
    """`readable(root/key)` for each key, in the same order, on a thread pool."""
    if not keys:
        return []
    with ThreadPoolExecutor(max_workers=_HEADER_CHECK_WORKERS) as pool:
        return list(pool.map(readable, (root / key for key in keys), chunksize=64))


def readable_images(root: Path, keys: Sequence[str]) -> list[bool]:
    """Whether each `root/key` is an image Pillow can identify as one of `IMAGE_FORMATS`; the others are named in one
    `DatasetWarning` (they are left out, never guessed at)."""
    found = check_files(root, keys)
    warn_names([key for key, ok in zip(keys, found, strict=True) if not ok], "skipped {n} unreadable image file(s)")
    return found


def deep_check(index: ImageIndex, workers: int = 4) -> list[tuple[str, str]]:
    """Decode every item of `index` fully, with its loader, on `workers` threads.

    Finds what the cheap indexing check cannot: files damaged in the middle (header and end intact). Slow: it costs
    one full decode per image.

    Returns:
        (item key, reason) for each item that fails to decode, in index order; empty when all decode.
    """

    def failure(key: str) -> str | None:
        try:
            index.loader(key)
        except DECODE_ERRORS as error:
            return f"{type(error).__name__}: {error}"
        return None

    if workers > 1 and len(index.items) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(failure, index.items))
    else:
        reasons = [failure(key) for key in index.items]
    return [(key, reason) for key, reason in zip(index.items, reasons, strict=True) if reason is not None]


# ----------------------------------------------------------------------------------------------------
# reporting


def warn_names(names: Sequence[str], message: str) -> None:
    """One warning for a whole list: `message` (with `{n}`) plus up to 5 of the names."""
    if not names:
        return
    shown = ", ".join(repr(n) for n in names[:_NAMES_IN_WARNING])
    more = f" and {len(names) - _NAMES_IN_WARNING} more" if len(names) > _NAMES_IN_WARNING else ""
    warnings.warn(f"{message.format(n=len(names))}: {shown}{more}", DatasetWarning, stacklevel=2)
