"""Files cdfsl writes for the user: written whole or not at all, with the mode the umask gives, never over an input.

`atomic_output` writes a file under a private temporary name in the target's folder and renames it into place
(`os.replace`), so a crash or an error leaves the old file, never a half-written one. `tempfile` creates its files
mode 0600; the file is given the mode a plain `open()` would give it (0666 less the umask) before the rename, so a
model folder shared with a colleague stays readable. `replace_folder` does the same for a whole folder.
`refuse_overwriting` is the one check that an output is neither a file the command reads nor inside a folder it
reads (paths resolved, symlinks followed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cdfsl.errors import ConfigError


def umask_mode(folder: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) gets from the process's umask."""
    return (0o777 if folder else 0o666) & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux's `/proc/self/status`), so no
    other thread ever creates a file under a borrowed mask; elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the most private mask while it is borrowed
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is given the umask's mode and renamed to `path`
    (replacing an existing file at once), on an error it is removed and `path` is left as it was."""
    target = Path(path)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, umask_mode())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, with the umask's mode."""
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def replace_folder(folder: str | Path, fill: Callable[[Path], None]) -> None:
    """Create `folder`, or replace it, with what `fill(staging)` writes into a new folder beside it.

    The staged folder (the umask's mode) takes `folder`'s name by renames once `fill` returned: an error in `fill`
    leaves `folder` as it was. An existing `folder` is moved aside and removed after the new one is in place.
    """
    target = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = staging.with_name(staging.name.removesuffix(".tmp") + ".old")
    try:
        os.chmod(staging, umask_mode(folder=True))
        fill(staging)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _resolved(path: Path) -> Path:
    """`path` with every symlink resolved (a path that does not exist yet: its existing part resolved)."""
    return Path(os.path.realpath(path))


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: one existing file (hard links and symlinks included), or the same resolved
    path for a file still to be created."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return _resolved(a) == _resolved(b)
    except OSError:
        return False


def refuse_overwriting(
    path: str | Path, option: str, inputs: Iterable[str | Path] = (), folders: Iterable[str | Path] = ()
) -> None:
    """Refuse an output `path` that is one of the `inputs` files or lies inside one of `folders` (a saved classifier,
    say): writing it would destroy what the command reads. Paths are compared resolved, symlinks included."""
    target = _resolved(Path(path))
    for folder in folders:
        root = _resolved(Path(folder))
        if target == root or target.is_relative_to(root):
            raise ConfigError(
                f"{option} {path} is inside {folder}, which this command reads; write the output outside that folder"
            )
    for given in inputs:
        if same_file(target, Path(given)):
            raise ConfigError(f"{option} {path} is {given}, an input of this command; choose another output path")


__all__ = ["atomic_output", "refuse_overwriting", "replace_folder", "same_file", "umask_mode", "write_text"]
