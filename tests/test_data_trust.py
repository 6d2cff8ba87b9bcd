"""Data trust: the run identity covers the pixels, the image cache is keyed by content, and files that are hostile,
damaged, wide (16-bit, float) or oddly named are handled without a hang, a crash or a silently wrong image."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import shutil
import sqlite3
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cdfsl.data.fingerprint as fingerprint_module
from cdfsl.data.fingerprint import DIGEST_DB, cache_dir, file_contents, file_digest
from cdfsl.data.images import ImageCache, cache_folder, resize_square
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers import IMAGE_FORMATS, DigitsLoader, deep_check, load_index, open_rgb
from cdfsl.errors import DatasetError, DatasetWarning
from layouts import (
    corrupt_middle,
    cut_in_half,
    make_chestx,
    make_eurosat,
    make_imagefolder,
    make_isic2018,
    noise_image,
    png_with_broken_chunk,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own digest cache folder and a fresh warn-once memory."""
    folder = tmp_path_factory.mktemp("cdfsl-cache")
    monkeypatch.setenv("CDFSL_CACHE_DIR", str(folder))
    monkeypatch.setattr(fingerprint_module, "_warned", set())
    yield folder


def load_quietly(dataset: str, root: Path | None) -> ImageIndex:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_index(dataset, root)


def fingerprint_quietly(index: ImageIndex) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return index.fingerprint()


class HashCounter:
    """Counts the files `cdfsl.data.fingerprint` actually reads and hashes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()
        original = fingerprint_module._hash_one

        def counting(path: str):  # type: ignore[no-untyped-def]
            with self._lock:
                self.paths.append(path)
            return original(path)

        monkeypatch.setattr(fingerprint_module, "_hash_one", counting)


# 1. data content in the identity -------------------------------------------------------------------------------


def test_same_layout_other_pixels_is_another_fingerprint(tmp_path: Path) -> None:
    first = make_imagefolder(tmp_path / "one", classes=("a", "b"), per_class=3)
    second = make_imagefolder(tmp_path / "two", classes=("a", "b"), per_class=3)
    noise_image(second / "a" / "img_001.png", side=12, seed=7)  # same name, other pixels
    one, two = load_quietly("imagefolder", first), load_quietly("imagefolder", second)
    assert one.items == two.items and one.labels == two.labels
    assert fingerprint_quietly(one) != fingerprint_quietly(two)


def test_same_bytes_elsewhere_is_the_same_fingerprint(tmp_path: Path) -> None:
    original = make_imagefolder(tmp_path / "one", classes=("a", "b"), per_class=3)
    copy = tmp_path / "elsewhere" / "two"
    shutil.copytree(original, copy, copy_function=shutil.copyfile)  # bytes only: new times
    for file in copy.rglob("*.png"):
        os.utime(file, ns=(10**18, 10**18))
    assert (copy / "a" / "img_000.png").stat().st_mtime_ns != (original / "a" / "img_000.png").stat().st_mtime_ns
    assert fingerprint_quietly(load_quietly("imagefolder", original)) == fingerprint_quietly(
        load_quietly("imagefolder", copy)
    )


def test_editing_one_file_changes_the_fingerprint(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=3)
    before = load_quietly("imagefolder", root)
    fingerprint = fingerprint_quietly(before)  # digests are computed once per index object, when first needed
    path = root / "b" / "img_002.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0, 0] ^= 1  # one bit of one pixel
    Image.fromarray(pixels).save(path)
    after = load_quietly("imagefolder", root)
    assert before.items == after.items
    assert fingerprint_quietly(after) != fingerprint
    position = after.items.index("b/img_002.png")
    assert after.item_digest(position) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert before.item_digest(position) != after.item_digest(position)
    assert before.item_digest(0) == after.item_digest(0)


def test_digits_fingerprint_covers_the_pixels() -> None:
    index = load_quietly("digits", None)
    assert isinstance(index.loader, DigitsLoader)
    pixels = index.loader.pixels.copy()
    number = int(index.items[10].split("/")[1])
    assert index.item_digest(10) == hashlib.sha256(pixels[number].tobytes()).hexdigest()
    pixels[number, 3, 3] ^= 1
    changed = dataclasses.replace(index, loader=DigitsLoader(pixels))
    assert changed.fingerprint() != index.fingerprint()
    assert dataclasses.replace(index, loader=DigitsLoader(index.loader.pixels.copy())).fingerprint() == (
        index.fingerprint()
    )


def test_in_memory_index_fingerprint_covers_decoded_pixels() -> None:
    def index_of(colour: int) -> ImageIndex:
        images = {"a/0": Image.new("RGB", (3, 3), (colour, 0, 0)), "b/0": Image.new("RGB", (3, 3))}
        return ImageIndex("toy", ("a", "b"), ("a", "b"), tuple(images), (0, 1), loader=lambda k: images[k])

    assert index_of(1).fingerprint() == index_of(1).fingerprint() != index_of(2).fingerprint()


def test_file_digest_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    data = os.urandom(3 * 2**20 + 17)
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    assert file_digest(str(path)) == hashlib.sha256(data).hexdigest()
    with pytest.raises(OSError):
        file_digest(tmp_path / "missing.bin")
    with pytest.raises(OSError):
        file_digest(tmp_path)


def test_digest_cache_is_used_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_cache: Path):
    counter = HashCounter(monkeypatch)
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=4)
    first = fingerprint_quietly(load_quietly("imagefolder", root))
    assert len(counter.paths) == 8
    assert (private_cache / DIGEST_DB).is_file()
    # A new index object on the same files reads none of them again.
    assert fingerprint_quietly(load_quietly("imagefolder", root)) == first
    assert len(counter.paths) == 8
    # A changed mtime (same bytes) is hashed again; the fingerprint does not change.
    touched = root / "a" / "img_001.png"
    os.utime(touched, ns=(10**18, 10**18))
    assert fingerprint_quietly(load_quietly("imagefolder", root)) == first
    assert counter.paths[8:] == [os.path.realpath(touched)]
    # A changed size is hashed again and changes the fingerprint.
    grown = root / "b" / "img_000.png"
    with grown.open("ab") as handle:
        handle.write(b"\0")
    assert fingerprint_quietly(load_quietly("imagefolder", root)) != first
    assert counter.paths[9:] == [os.path.realpath(grown)]


def test_same_size_and_mtime_but_other_bytes_is_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Rewriting a file and restoring its mtime (`cp -p`, `touch -d`) still changes its status-change time."""
    path = tmp_path / "x.bin"
    path.write_bytes(b"a" * 100)
    before = file_digest(path)
    info = path.stat()
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_mtime_ns == info.st_mtime_ns
    assert file_digest(path) == hashlib.sha256(b"b" * 100).hexdigest() != before


def test_unusable_cache_folder_still_fingerprints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    expected = fingerprint_quietly(load_quietly("imagefolder", root))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CDFSL_CACHE_DIR", str(blocker / "cache"))  # cannot be created, even by root
    with pytest.warns(DatasetWarning, match=r"cannot be used.*CDFSL_CACHE_DIR") as record:
        assert load_index("imagefolder", root).fingerprint() == expected
        assert load_index("imagefolder", root).fingerprint() == expected
    assert len(record) == 1  # warned once


def test_damaged_cache_database_still_fingerprints(tmp_path: Path, private_cache: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    expected = fingerprint_quietly(load_quietly("imagefolder", root))
    (private_cache / DIGEST_DB).write_bytes(b"this is not a database" * 100)
    with pytest.warns(DatasetWarning, match="cannot be used"):
        assert load_index("imagefolder", root).fingerprint() == expected


@pytest.mark.skipif(os.name != "posix", reason="permission bits")
def test_read_only_cache_folder_still_fingerprints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("permissions are not enforced for this user (root)")
        monkeypatch.setenv("CDFSL_CACHE_DIR", str(folder))
        path = tmp_path / "x.bin"
        path.write_bytes(b"abc")
        with pytest.warns(DatasetWarning, match="cannot be used"):
            assert file_digest(path) == hashlib.sha256(b"abc").hexdigest()
    finally:
        folder.chmod(0o700)


def test_default_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDFSL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "cdfsl"
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    file_digest(path)
    assert (tmp_path / "xdg" / "cdfsl" / DIGEST_DB).is_file()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cdfsl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "cdfsl"


def test_cache_rows_are_keyed_by_resolved_path(tmp_path: Path, private_cache: Path) -> None:
    target = tmp_path / "real.bin"
    target.write_bytes(b"x" * 10)
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    assert file_contents([link, target]) == [(10, hashlib.sha256(b"x" * 10).hexdigest())] * 2
    with sqlite3.connect(private_cache / DIGEST_DB) as db:
        paths = [bytes(row[0]) for row in db.execute("SELECT path FROM file_digests_v1")]
    assert paths == [os.fsencode(os.path.realpath(target))]


def test_fingerprint_of_a_file_gone_since_indexing(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
    index = load_quietly("imagefolder", root)
    (root / "a" / "img_001.png").unlink()
    with pytest.raises(DatasetError, match=r"img_001\.png"):
        index.fingerprint()


def test_index_with_digests_pickles(tmp_path: Path) -> None:
    index = load_quietly("imagefolder", make_imagefolder(tmp_path, classes=("a", "b"), per_class=2))
    fingerprint = fingerprint_quietly(index)
    again = pickle.loads(pickle.dumps(index))
    assert again.fingerprint() == fingerprint and again.item_digest(3) == index.item_digest(3)


# 2. image disk cache keyed by content -------------------------------------------------------------------------


def cached_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.npy") if ".tmp" not in p.name)


@pytest.mark.parametrize(
    "bad",
    [
        b"garbage, not an npy file",
        np.zeros((16, 16), dtype=np.uint8),  # wrong shape
        np.zeros((16, 16, 3), dtype=np.float32),  # wrong dtype
        np.zeros((8, 8, 3), dtype=np.uint8),  # another size
    ],
    ids=["corrupt", "shape", "dtype", "size"],
)
def test_bad_cache_entry_is_replaced(tmp_path: Path, bad: bytes | np.ndarray) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    index = load_quietly("imagefolder", root)
    expected = ImageCache(index, 16, tmp_path / "cache").get([0, 1])
    entry = cache_folder(tmp_path / "cache", index, 16) / f"{index.item_digest(0)}.npy"
    if isinstance(bad, bytes):
        entry.write_bytes(bad)
    else:
        np.save(entry, bad)
    fresh = load_quietly("imagefolder", root)
    with pytest.warns(DatasetWarning, match=rf"{entry.name}.*decoding the image again") as record:
        batch = ImageCache(fresh, 16, tmp_path / "cache").get([0, 1])
    assert len(record) == 1
    assert np.array_equal(batch.numpy(), expected.numpy())
    assert np.array_equal(np.load(entry), expected[0].permute(1, 2, 0).numpy())  # overwritten


class BarrierLoader:
    """Decodes in-memory images, holding every decode until `parties` of them run at the same time."""

    def __init__(self, images: dict[str, Image.Image], parties: int) -> None:
        self.images = images
        self.barrier = threading.Barrier(parties, timeout=20)

    def __call__(self, key: str) -> Image.Image:
        self.barrier.wait()
        return self.images[key].copy()

    def item_contents(self, keys: list[str]) -> list:
        from cdfsl.data.index import decoded_content

        return [decoded_content(self.images[k]) for k in keys]


def test_concurrent_writers_of_the_same_entry(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = {
        f"{c}/{n}": Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for c in "ab" for n in "01"
    }
    loader = BarrierLoader(images, parties=2)
    index = ImageIndex("toy", ("a", "b"), ("a", "b"), tuple(images), (0, 0, 1, 1), loader=loader)
    caches = [ImageCache(index, 16, tmp_path, workers=1) for _ in range(2)]
    results: list[object] = [None, None]

    def fill(slot: int) -> None:
        try:
            results[slot] = caches[slot].get([0, 1, 2, 3])
        except BaseException as error:
            results[slot] = error

    threads = [threading.Thread(target=fill, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(isinstance(r, BaseException) for r in results), results
    assert np.array_equal(results[0].numpy(), results[1].numpy())  # type: ignore[union-attr]
    assert len(cached_files(tmp_path)) == 4 and not list(tmp_path.rglob("*.tmp*"))


def test_changed_image_at_the_same_path_is_not_served_from_the_cache(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    key = "a/img_000.png"
    old = ImageCache(load_quietly("imagefolder", root), 16, tmp_path / "cache").get([0])
    Image.new("RGB", (12, 12), (255, 0, 255)).save(root / key)
    index = load_quietly("imagefolder", root)
    assert index.items[0] == key
    new = ImageCache(index, 16, tmp_path / "cache").get([0])
    assert not np.array_equal(old.numpy(), new.numpy())
    assert (new[0, :, 5, 5].tolist()) == [255, 0, 255]


def test_identical_files_share_one_entry(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    shutil.copyfile(root / "a" / "img_000.png", root / "b" / "img_001.png")
    index = load_quietly("imagefolder", root)
    ImageCache(index, 16, tmp_path / "cache").get(list(range(4)))
    assert len(cached_files(tmp_path / "cache")) == 3


def test_failed_cache_write_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    index = load_quietly("imagefolder", root)
    expected = ImageCache(index, 16).get([0, 1, 2])

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.warns(DatasetWarning, match="No space left") as record:
        batch = ImageCache(index, 16, tmp_path / "cache", workers=1).get([0, 1, 2])
    assert len(record) == 1
    assert np.array_equal(batch.numpy(), expected.numpy())
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_uncreatable_cache_folder_is_a_dataset_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    index = load_quietly("imagefolder", make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=1))
    with pytest.raises(DatasetError, match="--cache-dir"):
        ImageCache(index, 16, blocker / "cache")


# 3. only our formats are parsed ---------------------------------------------------------------------------------


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"


@pytest.mark.parametrize("content", ["gif", "eps"])
def test_other_formats_named_jpg_are_unreadable(tmp_path: Path, content: str) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
    path = root / "a" / "x.jpg"
    if content == "gif":
        Image.new("RGB", (12, 12), (1, 2, 3)).save(path, format="GIF")
        with Image.open(path) as image:
            assert image.format == "GIF"  # Pillow would parse it without `formats`
    else:
        path.write_bytes(EPS)
    with pytest.warns(DatasetWarning, match=r"1 unreadable image file\(s\): 'a/x\.jpg'"):
        index = load_index("imagefolder", root)
    assert "a/x.jpg" not in index.items and index.skipped == ("a/x.jpg",)


def test_image_open_always_names_the_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    original = Image.open

    def recording(fp, mode="r", formats=None):  # type: ignore[no-untyped-def]
        calls.append(formats)
        return original(fp, mode, formats)

    monkeypatch.setattr(Image, "open", recording)
    index = load_quietly("imagefolder", make_imagefolder(tmp_path / "f", classes=("a", "b"), per_class=2))
    index.open(0)
    deep_check(index)
    chestx = load_quietly("chestx", make_chestx(tmp_path / "c", per_class=1))
    chestx.open(0)
    assert len(calls) >= 4 + 1 + 4 + 7 + 1
    assert all(formats == IMAGE_FORMATS for formats in calls)


# 4. files that hang or escape -----------------------------------------------------------------------------------


def load_in_thread(dataset: str, root: Path, timeout: float = 30) -> tuple[ImageIndex, list[str]]:
    """load_index in a thread, failing (not hanging) if it does not finish; returns the warning messages too."""
    outcome: dict[str, object] = {}

    def work() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome["index"] = load_index(dataset, root)
            except BaseException as error:
                outcome["error"] = error
        outcome["warnings"] = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in root.rglob("*"):  # release a reader blocked on a FIFO
            if stat.S_ISFIFO(fifo.lstat().st_mode):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"indexing {root} did not finish in {timeout} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["index"], outcome["warnings"]  # type: ignore[return-value]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("dataset", ["imagefolder", "eurosat"])
def test_fifo_named_like_an_image_is_skipped(tmp_path: Path, dataset: str) -> None:
    if dataset == "eurosat":
        root = make_eurosat(tmp_path, per_class=2)
        fifo = root / "Forest" / "a.png"
    else:
        root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
        fifo = root / "a" / "a.png"
    os.mkfifo(fifo)
    index, messages = load_in_thread(dataset, root)
    key = fifo.relative_to(root).as_posix()
    assert key not in index.items and key in index.skipped
    assert any("not regular files" in m and repr(key) in m for m in messages)


def test_symlinks_outside_the_root_are_skipped_inside_kept(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    outside = noise_image(tmp_path / "secret.png", side=8)
    (root / "a" / "escape.png").symlink_to(outside)
    (root / "b" / "inside.png").symlink_to(root / "a" / "img_000.png")
    (root / "b" / "relative.png").symlink_to(Path("..") / "a" / "img_001.png")
    index, messages = load_in_thread("imagefolder", root)
    assert "a/escape.png" not in index.items and "a/escape.png" in index.skipped
    assert any("outside the data root" in m and "'a/escape.png'" in m for m in messages)
    assert {"b/inside.png", "b/relative.png"} <= set(index.items)
    assert np.array_equal(
        np.asarray(index.open(index.items.index("b/inside.png"))),
        np.asarray(index.open(index.items.index("a/img_000.png"))),
    )
    assert len(messages) == 1


def test_class_folder_linked_from_elsewhere_is_followed(tmp_path: Path) -> None:
    """A class folder that is itself a symlink is the user's explicit choice: its files are its own boundary."""
    elsewhere = make_imagefolder(tmp_path / "elsewhere", classes=("c",), per_class=2)
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    (root / "c").symlink_to(elsewhere / "c", target_is_directory=True)
    index = load_quietly("imagefolder", root)
    assert index.counts() == [2, 2, 2]


def test_broken_symlink_is_skipped(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=2)
    (root / "a" / "gone.png").symlink_to(root / "a" / "never-there.png")
    index, messages = load_in_thread("imagefolder", root)
    assert "a/gone.png" in index.skipped and any("'a/gone.png'" in m for m in messages)


def test_unlistable_class_folder_warns(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b", "c"), per_class=2)
    locked = root / "c"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("permissions are not enforced for this user (root)")
        with pytest.warns(DatasetWarning, match=r"could not list 1 folder\(s\).*'c'"):
            index = load_index("imagefolder", root)
        assert index.counts() == [2, 2, 0]
    finally:
        locked.chmod(0o755)


def test_unlistable_folder_warns_whoever_runs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same as above with listing refused by a stand-in for the OS, so it also runs as root."""
    root = make_imagefolder(tmp_path, classes=("a", "b", "c"), per_class=2)
    (root / "b" / "deeper").mkdir()
    Image.new("RGB", (4, 4)).save(root / "b" / "deeper" / "x.png")
    refused = {str(root / "c"), str(root / "b" / "deeper")}
    original = os.scandir

    def scandir(path):  # type: ignore[no-untyped-def]
        if os.fspath(path) in refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return original(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(DatasetWarning, match=r"could not list 2 folder\(s\).*'b/deeper', 'c'"):
        index = load_index("imagefolder", root)
    assert index.counts() == [2, 2, 0]


# 5. 16-bit and float images ---------------------------------------------------------------------------------------


def grey_ramp(height: int = 16, width: int = 32) -> np.ndarray:
    return np.linspace(0, 65535, height * width).round().astype(np.uint16).reshape(height, width)


@pytest.mark.parametrize("dataset", ["imagefolder", "chestx"])
def test_16_bit_png_is_scaled_not_saturated(tmp_path: Path, dataset: str) -> None:
    ramp = grey_ramp()
    if dataset == "chestx":
        root = make_chestx(tmp_path, per_class=1)
        key = "images/00000001_000.png"
    else:
        root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=1)
        key = "a/img_000.png"
    Image.fromarray(ramp).save(root / key)
    with Image.open(root / key) as image:
        assert image.mode in {"I;16", "I"}  # Pillow's convert("RGB") of this is all white (or all black)
    index = load_quietly(dataset, root)
    image = np.asarray(index.open(index.items.index(key)))
    assert image.std() > 50
    expected = ramp.astype(np.float64) * 255 / 65535  # ChestX too: its pre-resize is the run's, not the loader's
    assert np.abs(image[:, :, 0] - expected).max() <= 1
    assert np.array_equal(image[:, :, 0], image[:, :, 2])


def test_32_bit_integer_values_are_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535, 70000], [-5, 1, 257, 2**31 - 1]], dtype=np.int32)
    path = tmp_path / "wide.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I"
    pixels = np.asarray(open_rgb(tmp_path, "wide.tif"))[:, :, 0]
    assert pixels.tolist() == [[0, 128, 255, 255], [0, 0, 1, 255]]


def test_float_tiff_in_unit_range_is_scaled(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 12 * 12, dtype=np.float32).reshape(12, 12)
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=1)
    Image.fromarray(values).save(root / "a" / "float.tif")
    index = load_quietly("imagefolder", root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = np.asarray(index.open(index.items.index("a/float.tif")))
    assert np.abs(image[:, :, 1] - values * 255).max() <= 0.5 + 1e-6
    assert image.min() == 0 and image.max() == 255


def test_float_tiff_out_of_range_is_clipped_with_one_warning(tmp_path: Path) -> None:
    values = np.array([[-3.0, 0.5, 12.4, 300.0], [np.nan, np.inf, -np.inf, 254.6]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "hdr.tif")
    with pytest.warns(DatasetWarning, match=r"hdr\.tif.*outside \[0, 1\]") as record:
        first = np.asarray(open_rgb(tmp_path, "hdr.tif"))
        again = np.asarray(open_rgb(tmp_path, "hdr.tif"))
    assert len(record) == 1
    assert np.array_equal(first, again)
    assert first[:, :, 0].tolist() == [[0, 1, 12, 255], [0, 255, 0, 255]]


# 6. broken files and names ----------------------------------------------------------------------------------------


def test_broken_png_chunk_is_a_dataset_error_at_decode(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
    png_with_broken_chunk(root / "b" / "img_001.png")
    with pytest.raises(SyntaxError):
        Image.open(root / "b" / "img_001.png").load()  # what Pillow raises: not an OSError
    index = load_quietly("imagefolder", root)  # header and IEND intact: kept at indexing
    with pytest.raises(DatasetError, match=r"b/img_001\.png.*broken PNG"):
        ImageCache(index, 16).get(list(range(len(index.items))))
    assert deep_check(index) == [("b/img_001.png", "SyntaxError: broken PNG file (chunk b'\\x00\\x01\\x02\\x03')")]


def test_syntax_error_at_indexing_skips_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
    original = Image.open

    def picky(fp, mode="r", formats=None):  # type: ignore[no-untyped-def]
        if getattr(fp, "name", "").endswith("img_000.png") and "/b/" in fp.name:
            raise SyntaxError("broken PNG file")
        return original(fp, mode, formats)

    monkeypatch.setattr(Image, "open", picky)
    with pytest.warns(DatasetWarning, match=r"1 unreadable image file\(s\): 'b/img_000\.png'"):
        index = load_index("imagefolder", root)
    assert index.counts() == [2, 1]


@pytest.mark.parametrize("bad", ["ISIC_00\x0099", "ISIC_\x01x", "new\nline"])
def test_isic_control_characters_in_names_are_unsafe(tmp_path: Path, bad: str) -> None:
    root = make_isic2018(tmp_path, per_class=2, extra_rows=[f'"{bad}",1.0,0.0,0.0,0.0,0.0,0.0,0.0'])
    with pytest.warns(DatasetWarning, match=r"1 CSV entr\(ies\) whose file name is unsafe") as record:
        index = load_index("isic2018", root)
    assert len(record) == 1 and repr(f"{bad}.jpg") in str(record[0].message)
    assert index.counts() == [2] * 7


def test_chestx_nul_in_name_is_unsafe(tmp_path: Path) -> None:
    root = make_chestx(tmp_path, per_class=2, extra_rows=[("0000\x00.png", "Mass")])
    with pytest.warns(DatasetWarning, match="unsafe") as record:
        index = load_index("chestx", root)
    assert len(record) == 1 and "'0000\\x00.png'" in str(record[0].message)
    assert index.counts() == [2] * 7


def bytes_path(folder: Path, name: bytes) -> bytes:
    return os.path.join(os.fsencode(folder), name)


def printable(messages: list[str]) -> None:
    for message in messages:
        message.encode("utf-8")  # never a surrogate: printing it cannot crash


@pytest.mark.parametrize("dataset", ["imagefolder", "eurosat", "cropdiseases"])
def test_non_utf8_names_in_folder_layouts_are_skipped(tmp_path: Path, dataset: str) -> None:
    if dataset == "eurosat":
        root, folder = make_eurosat(tmp_path, per_class=2), "Forest"
    elif dataset == "cropdiseases":
        root, folder = make_cropdiseases_two(tmp_path), "Apple___healthy"
    else:
        root, folder = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2), "a"
    source = (root / folder).iterdir().__next__().read_bytes()
    with open(bytes_path(root / folder, b"\xff\xfe.png"), "wb") as handle:
        handle.write(source)
    os.mkdir(bytes_path(root / folder, b"sub\xff"))
    with open(os.path.join(bytes_path(root / folder, b"sub\xff"), b"y.png"), "wb") as handle:
        handle.write(source)
    if dataset == "imagefolder":
        os.mkdir(bytes_path(root, b"class\xff"))
    index, messages = load_in_thread(dataset, root)
    printable(messages)
    assert any("not valid UTF-8" in m and "\\udcff\\udcfe.png" in m for m in messages)
    assert any("\\udcff" in m for m in messages)
    assert all(key.encode("utf-8") for key in index.items)
    assert f"{folder}/\\udcff\\udcfe.png" in index.skipped and f"{folder}/sub\\udcff" in index.skipped
    assert all(name.encode("utf-8") for name in index.skipped)
    assert index.fingerprint()
    if dataset == "imagefolder":
        assert index.class_keys == ("a", "b")
        assert any("class folder(s) whose name is not valid UTF-8" in m for m in messages)


def make_cropdiseases_two(root: Path) -> Path:
    from layouts import make_cropdiseases

    return make_cropdiseases(root, classes=("Apple___Apple_scab", "Apple___healthy"), per_class=2)


@pytest.mark.parametrize("dataset", ["isic2018", "chestx"])
def test_non_utf8_names_in_csv_layouts_are_skipped(tmp_path: Path, dataset: str) -> None:
    if dataset == "isic2018":
        root = make_isic2018(tmp_path, per_class=2)
        folder = root / "ISIC2018_Task3_Training_Input"
    else:
        root = make_chestx(tmp_path, per_class=2)
        folder = root / "images"
    with open(bytes_path(folder, b"\xff.png"), "wb") as handle:
        handle.write(b"whatever")
    index, messages = load_in_thread(dataset, root)
    printable(messages)
    assert index.counts() == [2] * 7
    assert any("not valid UTF-8" in m and "\\udcff.png" in m for m in messages)


# 7. truncated images never stop a run half-way -----------------------------------------------------------------


def test_png_cut_in_half_is_skipped_at_indexing(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
    noise_image(root / "a" / "big.png")
    cut_in_half(root / "a" / "big.png")
    with Image.open(root / "a" / "big.png") as image:
        assert image.size == (64, 64)  # the header alone looks fine
    with pytest.warns(DatasetWarning, match=r"1 unreadable image file\(s\): 'a/big\.png'"):
        index = load_index("imagefolder", root)
    assert index.skipped == ("a/big.png",)
    ImageCache(index, 16).get(list(range(len(index.items))))  # the run goes through


def test_jpeg_without_its_end_marker_is_skipped(tmp_path: Path) -> None:
    root = make_eurosat(tmp_path, per_class=3)
    path = root / "River" / "River_2.jpg"
    data = path.read_bytes()
    assert data.endswith(b"\xff\xd9")
    path.write_bytes(data[:-2])
    (root / "River" / "padded.jpg").write_bytes(data + bytes(300))  # trailing zero padding is allowed
    with pytest.warns(DatasetWarning, match=r"1 unreadable image file\(s\): 'River/River_2\.jpg'") as record:
        index = load_index("eurosat", root)
    assert len(record) == 1
    assert "River/padded.jpg" in index.items and "River/River_2.jpg" not in index.items


def test_png_with_trailing_zeros_is_kept_and_other_formats_not_tail_checked(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=1)
    padded = noise_image(root / "a" / "padded.png", side=16)
    padded.write_bytes(padded.read_bytes() + bytes(10))
    noise_image(root / "b" / "pic.bmp", side=16)
    noise_image(root / "b" / "pic.webp", side=16)
    noise_image(root / "b" / "pic.tif", side=16)
    index = load_quietly("imagefolder", root)
    assert {"a/padded.png", "b/pic.bmp", "b/pic.webp", "b/pic.tif"} <= set(index.items)


def test_deep_check_reports_files_damaged_in_the_middle(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
    noise_image(root / "b" / "big.png")
    assert deep_check(load_quietly("imagefolder", root)) == []
    corrupt_middle(root / "b" / "big.png")
    index = load_quietly("imagefolder", root)  # header and IEND intact: the cheap check passes it
    assert "b/big.png" in index.items
    problems = deep_check(index, workers=2)
    assert [key for key, _ in problems] == ["b/big.png"]
    assert problems[0][1].startswith("OSError")
    assert deep_check(index, workers=1) == problems


def test_deep_check_on_embedded_and_chestx_data(tmp_path: Path) -> None:
    assert deep_check(load_quietly("digits", None)) == []
    root = make_chestx(tmp_path, per_class=2)
    key = "images/00000002_000.png"
    corrupt_middle(noise_image(root / key, side=64))
    index = load_quietly("chestx", root)
    assert [k for k, _ in deep_check(index)] == [key]
    with pytest.raises(OSError):
        open_rgb(root, key)


def test_resized_pixels_unchanged_for_8_bit_images(tmp_path: Path) -> None:
    """The wide-mode handling leaves ordinary 8-bit images exactly as Pillow's convert("RGB") gives them."""
    root = make_imagefolder(tmp_path, classes=("a", "b"), per_class=2)
    Image.fromarray(np.arange(144, dtype=np.uint8).reshape(12, 12)).save(root / "a" / "grey.png")
    Image.new("P", (12, 12), 3).save(root / "b" / "palette.png")
    Image.new("RGBA", (12, 12), (10, 20, 30, 40)).save(root / "b" / "alpha.png")
    index = load_quietly("imagefolder", root)
    for key in ("a/grey.png", "b/palette.png", "b/alpha.png"):
        with Image.open(root / key) as image:
            expected = resize_square(image.convert("RGB"), 16)
        assert np.array_equal(resize_square(index.open(index.items.index(key)), 16), expected)
