"""Bad input never costs work or results: one `error:` line, exit 2, before any work, the result store unchanged.

Covers output paths checked before the work (`run --json`, `report --out/--plot`, `diagnose … --out`, `cost
--json`, `pretrain-tiny --out`), `datasets check --deep` and names that are not valid UTF-8, `report` reading the
store read-only, `--episode-batch` against `--set episode_batch=N`, and option values refused before any model is
built (`--gamma nan`, `--steps 0`, a seed beyond 64 bits).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import warnings
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cdfsl.analysis.cost as cost_module
import cdfsl.analysis.lost_layers as lost_layers_module
import cdfsl.analysis.probes as probes_module
import cdfsl.analysis.report as report_module
import cdfsl.engine.runner as runner_module
import cdfsl.engine.store as store_module
import cdfsl.pretrain.train_tiny as train_tiny_module
from cdfsl.cli import app
from cdfsl.data.benchmarks import Benchmark
from cdfsl.errors import DatasetWarning
from layouts import make_imagefolder, make_isic2018, noise_image, png_with_broken_chunk

TINY = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu"]
PROBE = ["--dataset", "digits", "--backbone", "tiny", "--pretrained", "none", "--episodes", "1", "--iterations", "1",
         "--set", "device=cpu"]  # fmt: skip
WIDE = {"COLUMNS": "200"}
Snapshot = dict[str, Any] | None


def invoke(args: list[str], **kwargs: Any) -> Any:
    kwargs.setdefault("env", WIDE)
    return CliRunner().invoke(app, args, **kwargs)


def run_args(db: Path, *extra: str) -> list[str]:
    return ["run", "--dataset", "digits", "--method", "zeroshot", *TINY, "--episodes", "2", "--db", str(db), *extra]


def assert_one_line_error(result: Any, *fragments: str) -> str:
    """Exit 2, no traceback, and the whole output is one line starting with `error:` naming every fragment."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert result.stdout == "", result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(db: Path) -> Snapshot:
    """Every table's rows, the schema and the journal mode of the store at `db`; None when there is no file."""
    if not db.exists():
        return None
    with closing(sqlite3.connect(db)) as connection:
        schema = sorted(connection.execute("SELECT type, name, sql FROM sqlite_master"))
        tables = [row[1] for row in schema if row[0] == "table"]
        state: dict[str, Any] = {
            f"table {name}": sorted(connection.execute(f"SELECT * FROM {name}")) for name in tables
        }
        state["schema"] = schema
        state["journal_mode"] = connection.execute("PRAGMA journal_mode").fetchone()[0]
    return state


def forbid(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> None:
    """Make `target.name` fail the test when called: the command must stop before that work."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name} was called: the command started its work before refusing the input")

    monkeypatch.setattr(target, name, boom)


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A result store holding one finished 2-episode zero-shot run (copy it before use)."""
    db = tmp_path_factory.mktemp("store") / "filled.sqlite"
    result = invoke(run_args(db))
    assert result.exit_code == 0, result.output
    return db


@pytest.fixture
def store(filled_store: Path, tmp_path: Path) -> Path:
    db = tmp_path / "results.sqlite"
    shutil.copy(filled_store, db)
    return db


# ----------------------------------------------------------------------------------------------------
# 1. output paths are checked before the work


def _forbid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, runner_module.Runner, "run")
    forbid(monkeypatch, store_module, "ResultStore")
    forbid(monkeypatch, report_module, "build_report")
    forbid(monkeypatch, cost_module, "training_cost")
    forbid(monkeypatch, train_tiny_module, "pretrain_tiny")
    for probe in ("sink_probe", "lost_layers_probe", "cka_probe"):
        forbid(monkeypatch, probes_module, probe)


# (command arguments for an output PATH and a store DB, whether the output is a folder, whether it has a store)
Command = Callable[[Path, Path], list[str]]
FILE_OUTPUTS: dict[str, Command] = {
    "run --json": lambda path, db: run_args(db, "--json", str(path)),
    "report --out": lambda path, db: ["report", "--db", str(db), "--format", "csv", "--out", str(path)],
    "cost --json": lambda path, db: ["cost", "--method", "lora", "--backbone", "tiny", "--json", str(path)],
    "pretrain-tiny --out": lambda path, db: ["pretrain-tiny", "--out", str(path), "--steps", "2"],
}
FOLDER_OUTPUTS: dict[str, Command] = {
    "report --plot": lambda path, db: ["report", "--db", str(db), "--plot", str(path)],
    "diagnose sink --out": lambda path, db: ["diagnose", "sink", "--out", str(path), *PROBE],
    "diagnose lost-layers --out": lambda path, db: ["diagnose", "lost-layers", "--out", str(path), *PROBE],
    "diagnose cka --out": lambda path, db: ["diagnose", "cka", "--out", str(path), *PROBE],
}
WITH_STORE = ("run --json", "report --out", "report --plot")


def _file_name(command: str) -> str:
    return "model.safetensors" if command.startswith("pretrain-tiny") else "out.json"


@pytest.mark.parametrize("command", list(FILE_OUTPUTS))
def test_file_output_in_missing_folder(
    command: str, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_work(monkeypatch)
    before = snapshot(store)
    path = tmp_path / "nowhere" / "deeper" / _file_name(command)
    result = invoke(FILE_OUTPUTS[command](path, store))
    assert_one_line_error(result, f"folder {path.parent} does not exist", "create it or choose another path")
    assert not (tmp_path / "nowhere").exists()
    assert snapshot(store) == before


@pytest.mark.parametrize("command", list(FILE_OUTPUTS))
def test_file_output_that_is_a_folder(
    command: str, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_work(monkeypatch)
    before = snapshot(store)
    path = tmp_path / _file_name(command)
    path.mkdir()
    result = invoke(FILE_OUTPUTS[command](path, store))
    assert_one_line_error(result, f"{path} is a folder", "give a file path")
    assert path.is_dir() and not any(path.iterdir())
    assert snapshot(store) == before


@pytest.mark.parametrize("command", list(FILE_OUTPUTS))
def test_file_output_under_a_file(command: str, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_work(monkeypatch)
    before = snapshot(store)
    (tmp_path / "notes.txt").write_text("keep me\n")
    path = tmp_path / "notes.txt" / _file_name(command)
    result = invoke(FILE_OUTPUTS[command](path, store))
    assert_one_line_error(result, f"{tmp_path / 'notes.txt'} is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"
    assert snapshot(store) == before


def test_pretrain_metadata_path_that_is_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_work(monkeypatch)
    (tmp_path / "model.meta.json").mkdir()
    result = invoke(["pretrain-tiny", "--out", str(tmp_path / "model.safetensors"), "--steps", "2"])
    assert_one_line_error(result, f"{tmp_path / 'model.meta.json'} is a folder")


@pytest.mark.parametrize("command", list(FOLDER_OUTPUTS))
def test_folder_output_that_is_a_file(
    command: str, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_work(monkeypatch)
    before = snapshot(store)
    path = tmp_path / "figures"
    path.write_text("keep me\n")
    result = invoke(FOLDER_OUTPUTS[command](path, store))
    assert_one_line_error(result, f"{path} is a file, not a folder", "choose another folder")
    assert path.read_text() == "keep me\n"
    assert snapshot(store) == before


@pytest.mark.parametrize("command", list(FOLDER_OUTPUTS))
def test_folder_output_in_missing_folder(
    command: str, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_work(monkeypatch)
    before = snapshot(store)
    path = tmp_path / "nowhere" / "figures"
    result = invoke(FOLDER_OUTPUTS[command](path, store))
    assert_one_line_error(result, f"folder {path.parent} does not exist", "create it or choose another path")
    assert not (tmp_path / "nowhere").exists()
    assert snapshot(store) == before


@pytest.mark.parametrize("command", ["run --json", "report --out"])
def test_output_that_is_the_store(command: str, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_work(monkeypatch)
    before = snapshot(store)
    result = invoke(FILE_OUTPUTS[command](store, store))
    assert_one_line_error(result, "is the result store (--db)")
    assert snapshot(store) == before


def test_json_output_that_is_a_new_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_work(monkeypatch)
    db = tmp_path / "new.sqlite"
    (tmp_path / "sub").mkdir()
    result = invoke(run_args(db, "--json", str(tmp_path / "sub" / ".." / "new.sqlite")))
    assert_one_line_error(result, "is the result store (--db)")
    assert not db.exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions that bind (not root)")
def test_output_in_read_only_folder(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_work(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = invoke(run_args(store, "--json", str(locked / "out.json")))
        assert_one_line_error(result, "is not writable")
        plots = invoke(["report", "--db", str(store), "--plot", str(locked / "figures")])
        assert_one_line_error(plots, "is not writable")
    finally:
        locked.chmod(0o755)


def test_existing_output_file_is_overwritten_and_plot_folder_created(store: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.csv"
    report.write_text("old\n")
    figures = tmp_path / "figures"
    result = invoke(["report", "--db", str(store), "--format", "csv", "--out", str(report), "--plot", str(figures)])
    assert result.exit_code == 0, result.output
    assert report.read_text().startswith("label,method,backbone")
    assert figures.is_dir() and any(figures.glob("*.png"))


# ----------------------------------------------------------------------------------------------------
# 2. datasets check --deep, and names that are not valid UTF-8


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """An imagefolder tree of 5 x 4 PNGs in which `cat/img_001.png` lost the second half of its pixel data but kept
    its header and its final IEND chunk: the cheap indexing check passes it, only decoding finds it."""
    root = make_imagefolder(tmp_path / "damaged", per_class=4)
    path = root / "cat" / "img_001.png"
    data = path.read_bytes()
    iend = b"\x00\x00\x00\x00IEND\xaeB`\x82"
    assert data.endswith(iend)
    path.write_bytes(data[: len(data) // 2] + iend)
    return root


def test_deep_check_lists_undecodable_images(damaged: Path) -> None:
    shallow = invoke(["datasets", "check", "--dataset", "imagefolder", "--data-root", str(damaged)])
    assert shallow.exit_code == 0, shallow.output
    assert "20 images" in shallow.stdout and "skipped" not in shallow.stdout  # indexing does not see the damage

    result = invoke(["datasets", "check", "--dataset", "imagefolder", "--data-root", str(damaged), "--deep"])
    assert result.exit_code == 1, result.output  # for scripts: the images that fail are listed, then exit 1
    rows = [line for line in result.stdout.splitlines() if "cat/img_001.png" in line]
    assert len(rows) == 1, result.stdout
    assert rows[0].replace("cat/img_001.png", "").strip(" │|"), "the row gives a reason"
    assert "1 of 20 images failed to decode" in result.stdout
    assert "remove" in result.stdout and str(damaged) in result.stdout
    assert "fingerprint" in result.stdout


def test_deep_check_all_decode(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "clean", per_class=4)
    result = invoke(["datasets", "check", "--dataset", "imagefolder", "--data-root", str(root), "--deep"])
    assert result.exit_code == 0, result.output
    assert "all 20 images decode" in result.stdout
    assert "failed" not in result.stdout


def _non_utf8_tree(tmp_path: Path) -> Path:
    """An imagefolder tree with a class folder `bad\\xff/` and a file `dog/img_\\xfe.png` (bytes, not UTF-8)."""
    root = make_imagefolder(tmp_path / "names", per_class=4)
    image = (root / "cat" / "img_000.png").read_bytes()
    base = os.fsencode(root)
    try:
        os.mkdir(base + b"/bad\xff")
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses names that are not valid UTF-8")
    for n in range(4):
        with open(base + b"/bad\xff/img_%d.png" % n, "wb") as file:
            file.write(image)
    with open(base + b"/dog/img_\xfe.png", "wb") as file:
        file.write(image)
    return root


def test_datasets_check_prints_non_utf8_names(tmp_path: Path) -> None:
    root = _non_utf8_tree(tmp_path)
    result = invoke(["datasets", "check", "--dataset", "imagefolder", "--data-root", str(root)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.exception is None
    assert "Traceback" not in result.output
    escaped = ("\\udcff", "\\xff", "\\udcfe", "\\xfe")
    assert any(form in result.output for form in escaped), result.output  # named, as an escape
    assert "fingerprint" in result.stdout


def test_warning_with_non_utf8_name(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Benchmark.read_splits

    def warning_read(*args: Any, **kwargs: Any) -> Any:
        warnings.warn("digits: a name that is not UTF-8: bad\udcff.png", DatasetWarning, stacklevel=1)
        return original(*args, **kwargs)

    monkeypatch.setattr(Benchmark, "read_splits", warning_read)
    result = invoke(["datasets", "check", "--dataset", "digits"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "warning: digits: a name that is not UTF-8: bad\\udcff.png" in result.stderr


def test_error_message_with_non_utf8_path(tmp_path: Path) -> None:
    missing = tmp_path / "gone\udcff"
    result = invoke(["datasets", "check", "--dataset", "eurosat", "--data-root", str(missing)])
    assert_one_line_error(result, "gone\\udcff")


def test_error_message_keeps_brackets(tmp_path: Path) -> None:
    result = invoke(run_args(tmp_path / "r.sqlite", "--set", "shots=[bold]"))
    assert_one_line_error(result, "'[bold]'")
    assert not (tmp_path / "r.sqlite").exists()


# ----------------------------------------------------------------------------------------------------
# 3. report reads the store read-only


def test_report_never_changes_the_store(store: Path) -> None:
    with closing(sqlite3.connect(store)) as connection:  # a store written by an older version, say
        assert connection.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    before, data, files = snapshot(store), store.read_bytes(), sorted(os.listdir(store.parent))
    result = invoke(["report", "--db", str(store)])
    assert result.exit_code == 0, result.output
    assert "zeroshot" in result.stdout
    assert snapshot(store) == before  # journal mode included
    assert store.read_bytes() == data
    assert sorted(os.listdir(store.parent)) == files


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions that bind (not root)")
def test_report_on_store_in_read_only_folder(store: Path) -> None:
    folder = store.parent
    store.chmod(0o444)
    folder.chmod(0o555)
    try:
        result = invoke(["report", "--db", str(store), "--format", "csv"])
        assert result.exit_code == 0, result.output
        assert "zeroshot" in result.stdout
    finally:
        folder.chmod(0o755)
        store.chmod(0o644)


def test_report_without_store(tmp_path: Path) -> None:
    db = tmp_path / "missing.sqlite"
    result = invoke(["report", "--db", str(db)])
    assert_one_line_error(result, f"no result store at {db}", "run `cdfsl run` first or pass --db")
    assert not db.exists()


def test_report_unknown_format_before_reading(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_work(monkeypatch)
    result = invoke(["report", "--db", str(store), "--format", "yaml", "--out", str(tmp_path / "r.yaml")])
    assert_one_line_error(result, "unknown report format 'yaml'")
    assert not (tmp_path / "r.yaml").exists()


# ----------------------------------------------------------------------------------------------------
# 4. options checked too late


def test_set_episode_batch_is_used(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = invoke(run_args(tmp_path / "r.sqlite", "--set", "episode_batch=2", "--json", str(out)))
    assert result.exit_code == 0, result.output
    assert '"episode_batch": 2' in out.read_text()
    default = invoke(run_args(tmp_path / "d.sqlite", "--json", str(out)))
    assert default.exit_code == 0, default.output
    assert '"episode_batch": 1' in out.read_text()


def test_episode_batch_given_twice(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, runner_module.Runner, "run")
    before = snapshot(store)
    result = invoke(run_args(store, "--episode-batch", "4", "--set", "episode_batch=2"))
    assert_one_line_error(result, "--episode-batch 4", "--set episode_batch=2", "give only one")
    assert snapshot(store) == before


def test_seed_beyond_64_bits(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, runner_module.Runner, "run")
    before = snapshot(store)
    result = invoke(run_args(store, "--seed", str(2**64)))
    assert_one_line_error(result, "seed")
    assert snapshot(store) == before
    fresh = tmp_path / "fresh.sqlite"
    assert_one_line_error(invoke(run_args(fresh, "--seed", str(2**64))), "seed")
    assert not fresh.exists()


def test_lost_layers_gamma_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, lost_layers_module, "prepare")  # loads the model and the dataset
    out = tmp_path / "probe"
    result = invoke(["diagnose", "lost-layers", "--out", str(out), "--gamma", "nan", *PROBE])
    assert_one_line_error(result, "gamma")
    assert not out.exists()


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_pretrain_tiny_steps_not_positive(steps: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, train_tiny_module, "create_tiny_model")
    out = tmp_path / "model.safetensors"
    result = invoke(["pretrain-tiny", "--out", str(out), "--steps", steps])
    assert_one_line_error(result, "steps")
    assert not out.exists() and not out.with_suffix(".meta.json").exists()


# ----------------------------------------------------------------------------------------------------
# 3. the bad-input corpus through `cdfsl run`: refused inputs leave the store as it was; skipped inputs are named


def folder_run(db: Path, root: Path, *extra: str) -> list[str]:
    """Zero-shot on an imagefolder tree of 5 classes x 4 images, 1-shot 3 queries: every episode uses every image."""
    return [
        "run", "--dataset", "imagefolder", "--data-root", str(root), "--method", "zeroshot", *TINY,
        "--shots", "1", "--queries", "3", "--episodes", "2", "--db", str(db), *extra,
    ]  # fmt: skip


REFUSED_SETTINGS = {
    "train.lr=nan": "train.lr",
    "train.lr=inf": "train.lr",
    "train.lr=-1": "train.lr",
    "lora.alpha=nan": "lora.alpha",
    "train.logit_scale=nan": "train.logit_scale",
    "augment.rotation=nan": "augment.rotation",
    "train.template={} and {}": "train.template",
    "train.template=a {kind} of {}": "train.template",
}


@pytest.mark.parametrize("assignment", list(REFUSED_SETTINGS))
def test_refused_setting(assignment: str, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, runner_module.Runner, "run")
    before = snapshot(store)
    args = run_args(store, "--set", assignment)
    args[args.index("zeroshot")] = "lora"
    assert_one_line_error(invoke(args), REFUSED_SETTINGS[assignment])
    assert snapshot(store) == before


def test_training_that_diverges_stores_nothing(store: Path) -> None:
    """A finite but absurd learning rate: the loss turns nan within two steps; the run stops and stores nothing."""
    before = snapshot(store)
    args = run_args(store, "--iterations", "2", "--set", "train.lr=1e6")
    args[args.index("zeroshot")] = "lora"
    assert_one_line_error(invoke(args), "nan or inf", "no result is stored")
    assert snapshot(store) == before


def test_image_that_fails_to_decode_mid_run(store: Path, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", per_class=4)
    png_with_broken_chunk(root / "dog" / "img_002.png")  # header and end intact: only decoding finds it
    before = snapshot(store)
    assert_one_line_error(invoke(folder_run(store, root)), "dog/img_002.png", "broken PNG")
    assert snapshot(store) == before


def test_damaged_store_is_named_and_left_as_it_was(store: Path) -> None:
    data = bytearray(store.read_bytes())
    data[4096 : 2 * 4096] = bytes(4096)  # zero the second page
    store.write_bytes(bytes(data))
    for args in (run_args(store), ["report", "--db", str(store)]):
        assert_one_line_error(invoke(args), str(store), "damaged")
        assert store.read_bytes() == bytes(data)


def test_read_only_store_file_even_with_nothing_to_train(store: Path) -> None:
    store.chmod(0o444)
    if os.access(store, os.W_OK):
        pytest.skip("needs POSIX permissions that bind (not root)")
    data = store.read_bytes()
    assert_one_line_error(invoke(run_args(store)), str(store), "read-only")  # every episode is already stored
    assert store.read_bytes() == data


def warning_lines(result: Any) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("warning: ")]


def test_skipped_inputs_are_named_and_the_run_goes_on(tmp_path: Path) -> None:
    """Files a run cannot use are skipped with a warning naming them, and never hang it: a FIFO named like an image,
    a symlink leading out of the data root, a file cut short, and an EPS file named `.jpg`."""
    root = make_imagefolder(tmp_path / "data", per_class=5)
    outside = noise_image(tmp_path / "elsewhere" / "secret.png")
    os.mkfifo(root / "cat" / "pipe.png")
    (root / "dog" / "link.png").symlink_to(outside)
    truncated = noise_image(root / "bird" / "short.png")
    truncated.write_bytes(truncated.read_bytes()[:200])
    (root / "fish" / "doc.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    result = invoke(folder_run(tmp_path / "r.sqlite", root))
    assert result.exit_code == 0, result.output
    warned = " ".join(warning_lines(result))
    for name in ("cat/pipe.png", "dog/link.png", "bird/short.png", "fish/doc.jpg"):
        assert name in warned, warned


def test_unsafe_csv_name_is_named_and_the_run_goes_on(tmp_path: Path) -> None:
    root = make_isic2018(tmp_path / "isic", per_class=2, extra_rows=['"ISIC_00\x0099",1.0,0.0,0.0,0.0,0.0,0.0,0.0'])
    args = ["run", "--dataset", "isic2018", "--data-root", str(root), "--method", "zeroshot", *TINY]
    result = invoke([*args, "--shots", "1", "--queries", "1", "--episodes", "1", "--db", str(tmp_path / "r.sqlite")])
    assert result.exit_code == 0, result.output
    assert any("unsafe" in line and "\\x00" in line for line in warning_lines(result)), result.output


def test_corrupt_cache_entry_is_named_and_replaced(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data", per_class=4)
    cache = tmp_path / "cache"
    first = invoke([*folder_run(tmp_path / "a.sqlite", root), "--cache-dir", str(cache)])
    assert first.exit_code == 0, first.output
    entries = sorted(cache.rglob("*.npy"))
    assert len(entries) == 20
    entries[0].write_bytes(b"not an array")
    entries[1].write_bytes(entries[1].read_bytes()[:100])
    second = invoke([*folder_run(tmp_path / "b.sqlite", root), "--cache-dir", str(cache)])
    assert second.exit_code == 0, second.output
    warned = " ".join(warning_lines(second))
    assert entries[0].name in warned and entries[1].name in warned, warned

    def summary(result: Any) -> str:  # the result line up to the store it names
        return result.stdout.strip().splitlines()[-1].split(" from ")[0]

    assert summary(second) == summary(first)
