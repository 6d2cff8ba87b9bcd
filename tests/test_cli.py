"""The `cdfsl` command line on every dataset layout: runs, `datasets check`, and user errors (exit 2, one line)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cdfsl.engine.context as context_module
from cdfsl.cli import app
from cdfsl.data.readers import DATASETS
from layouts import (
    CHESTX_CLASSES,
    CHESTX_DROPPED_LABELS,
    EUROSAT_FOLDERS,
    ISIC_COLUMNS,
    PLANTVILLAGE_FOLDERS,
    make_chestx,
    make_cropdiseases,
    make_eurosat,
    make_imagefolder,
    make_isic2018,
)
from suite_trees import make_split_tree

SUITE_CLASSES = ("banded", "braided", "bubbly", "bumpy", "chequered")  # a dtd tree stands for the suite's readers
TINY = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu"]
WIDE = {"COLUMNS": "200"}  # rich wraps at the console width; keep tables on one line per row


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    return {
        "eurosat": make_eurosat(base / "eurosat", nested=True),
        "isic2018": make_isic2018(base / "isic2018"),
        "cropdiseases": make_cropdiseases(base / "cropdiseases", nested=True),
        "chestx": make_chestx(base / "chestx", spread=True),
        "imagefolder": make_imagefolder(base / "imagefolder"),
        "small_eurosat": make_eurosat(base / "small_eurosat", per_class=8),
        "dtd": make_split_tree(base / "dtd", SUITE_CLASSES, {"train": 2, "val": 1, "test": 16}),
    }


def invoke(args: list[str], **kwargs: Any) -> Any:
    return CliRunner().invoke(app, args, **kwargs)


def root_args(dataset: str, roots: dict[str, Path]) -> list[str]:
    return ["--data-root", str(roots[dataset])] if DATASETS[dataset].needs_root else []


def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    original = context_module.build_batch

    def recording(*args: Any, **kwargs: Any) -> Any:
        batch = original(*args, **kwargs)
        seen.append(batch)
        return batch

    monkeypatch.setattr(context_module, "build_batch", recording)
    return seen


@pytest.mark.parametrize(
    "dataset",  # the suite: dtd stands for it; md-*: test_md_readers
    [n for n in DATASETS if not n.startswith("md-") and DATASETS[n].suite != "clip-fewshot"] + ["dtd"],
)
def test_run_on_every_dataset(
    dataset: str, roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = record_batches(monkeypatch)
    out, db = tmp_path / "out.json", tmp_path / "tmp.sqlite"
    episode_batch = "auto" if dataset == "digits" else "4"  # auto means 4 on CPU
    args = [
        "run", "--dataset", dataset, *root_args(dataset, roots), "--method", "lora", *TINY, "--episodes", "4",
        "--iterations", "5", "--json", str(out), "--db", str(db), "--episode-batch", episode_batch,
    ]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "warning" not in result.stderr
    summary = json.loads(out.read_text())
    assert summary["episodes"] == 4
    assert [row["episode"] for row in summary["per_episode"]] == [0, 1, 2, 3]
    assert all(0 <= row["acc"] <= 100 for row in summary["per_episode"])
    assert (summary["dataset"], summary["method"], summary["backbone"]) == (dataset, "lora", "tiny")
    assert (summary["ways"], summary["shots"], summary["queries"]) == (5, 1, 15)
    assert summary["config"]["train"]["iterations"] == 5
    assert summary["config"]["data_root"] == (None if dataset == "digits" else str(roots[dataset]))
    assert f"{summary['mean_acc']:.2f} ± {summary['ci95']:.2f}%" in result.stdout
    assert "4 trained, 0 from" in result.stdout
    with sqlite3.connect(db) as connection:
        rows = list(connection.execute("SELECT run_id, episode FROM episodes ORDER BY episode"))
    assert rows == [(summary["run_id"], i) for i in range(4)]
    assert [len(batch) for batch in seen] == [4]
    names = {name for batch in seen for names in batch.class_names for name in names}
    if dataset == "chestx":  # only the seven single-label classes, never No Finding, Pneumonia, Hernia
        assert names <= set(CHESTX_CLASSES)
        assert len(names) >= 5
    if dataset == "isic2018":
        assert names <= {
            "melanoma", "melanocytic nevus", "basal cell carcinoma", "actinic keratosis", "benign keratosis",
            "dermatofibroma", "vascular lesion",
        }  # fmt: skip

    # Re-running the same command trains nothing.
    again = invoke(args)
    assert again.exit_code == 0, again.output
    assert "0 trained, 4 from" in again.stdout
    assert json.loads(out.read_text())["run_id"] == summary["run_id"]


def test_auto_episode_batch_sees_set_overrides(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    args = [
        "run", "--dataset", "digits", "--method", "zeroshot", *TINY, "--episode-batch", "auto", "--set", "episodes=2",
        "--db", str(tmp_path / "r.sqlite"), "--json", str(out),
    ]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["episodes"] == 2
    assert summary["config"]["episode_batch"] == 2  # min(CPU_EPISODE_BATCH = 4, episodes = 2)


@pytest.mark.parametrize(
    ("dataset", "keys", "count"),
    [
        ("eurosat", EUROSAT_FOLDERS, 20),
        ("isic2018", ISIC_COLUMNS, 20),
        ("chestx", CHESTX_CLASSES, 20),
        ("cropdiseases", PLANTVILLAGE_FOLDERS, 20),
        ("imagefolder", ("bird", "cat", "dog", "fish", "frog"), 20),
        ("digits", tuple(str(d) for d in range(10)), None),
        ("dtd", SUITE_CLASSES, 19),
    ],
)
def test_datasets_check(dataset: str, keys: tuple[str, ...], count: int | None, roots: dict[str, Path]) -> None:
    result = invoke(["datasets", "check", "--dataset", dataset, *root_args(dataset, roots)], env=WIDE)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for key in keys:
        row = [line for line in lines if f" {key} " in line]
        assert len(row) == 1, (key, result.stdout)
        if count is not None:
            assert row[0].rstrip(" │|").endswith(f" {count}"), row[0]
    assert f"{len(keys)} classes" in result.stdout
    assert "fingerprint" in result.stdout
    if dataset == "chestx":
        for dropped in CHESTX_DROPPED_LABELS:
            assert dropped not in result.stdout
        assert f"{7 * 20} images, 7 classes" in result.stdout
    if dataset == "eurosat":
        assert "herbaceous vegetation land" in result.stdout and "sea or lake" in result.stdout
    if dataset == "cropdiseases":
        assert "Corn (maize) Cercospora leaf spot Gray leaf spot" in result.stdout
    if dataset == "dtd":  # images per split (train, val, test), and the fingerprint of the split episodes use
        for key in keys:
            row = next(line for line in lines if f" {key} " in line)
            assert row.replace("│", " ").split()[-4:] == ["2", "1", "16", "19"], row
        assert "(the test split, which episodes use)" in result.stdout


@pytest.fixture(scope="module")
def malformed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("malformed")
    isic = make_isic2018(base / "isic_bad_columns", per_class=1)
    csv_path = isic / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    csv_path.write_text("image,melanoma,nevus\nISIC_0024306,1.0,0.0\n")
    chestx = make_chestx(base / "chestx_bad_columns", per_class=1)
    (chestx / "Data_Entry_2017.csv").write_text("Image,Labels\n00000001_000.png,Effusion\n")
    return {"isic2018": isic, "chestx": chestx}


def run_args(dataset: str, root: Path | None, *extra: str) -> list[str]:
    roots = [] if root is None else ["--data-root", str(root)]
    return [
        "run",
        "--dataset",
        dataset,
        *roots,
        "--method",
        "lora",
        *TINY,
        "--episodes",
        "2",
        "--iterations",
        "1",
        *extra,
    ]


def assert_user_error(result: Any, *fragments: str) -> str:
    """Exit 2, an `error:` message on stderr naming the fragments, no traceback; returns the message (unwrapped)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    starts = [i for i, line in enumerate(result.stderr.splitlines()) if line.startswith("error: ")]
    assert len(starts) == 1, result.stderr
    message = " ".join(" ".join(result.stderr.splitlines()[starts[0] :]).split())
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_error_missing_data_root(tmp_path: Path) -> None:
    result = invoke(run_args("eurosat", tmp_path / "nowhere", "--db", str(tmp_path / "r.sqlite")))
    assert_user_error(result, "eurosat: data root not found", "does not exist")
    assert not (tmp_path / "r.sqlite").exists() or _episodes(tmp_path / "r.sqlite") == 0
    check = invoke(["datasets", "check", "--dataset", "eurosat", "--data-root", str(tmp_path / "nowhere")])
    assert_user_error(check, "data root not found")
    no_root = invoke(run_args("eurosat", None, "--db", str(tmp_path / "r.sqlite")))
    assert_user_error(no_root, "--data-root is required")


def _episodes(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM episodes").fetchone()[0])


@pytest.mark.parametrize(("dataset", "fragment"), [("isic2018", "unexpected columns"), ("chestx", "lacks column")])
def test_error_malformed_csv(dataset: str, fragment: str, malformed: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(run_args(dataset, malformed[dataset], "--db", str(tmp_path / "r.sqlite")))
    assert_user_error(result, f"{dataset}:", fragment)
    check = invoke(["datasets", "check", "--dataset", dataset, "--data-root", str(malformed[dataset])])
    assert_user_error(check, fragment)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--set", "lora.nosuch=1"], ["unknown config key 'lora.nosuch'"]),
        (["--set", "shots=three"], ["shots expects int, got 'three'"]),
        (["--set", "lora.dropout"], ["--set expects key=value"]),
        (["--episode-batch", "many"], ["--episode-batch expects a positive integer or 'auto'"]),
        (["--ways", "1"], ["ways must be at least 2"]),
    ],
)
def test_error_bad_options(extra: list[str], fragments: list[str], tmp_path: Path) -> None:
    result = invoke(run_args("digits", None, "--db", str(tmp_path / "r.sqlite"), *extra))
    assert_user_error(result, *fragments)


def test_error_bad_method_and_dataset(tmp_path: Path) -> None:
    bad_method = invoke(["run", "--dataset", "digits", "--method", "finetune", *TINY, "--db", str(tmp_path / "r")])
    assert_user_error(bad_method, "is not a base followed by plug-ins", "'finetune'")
    bad_dataset = invoke(["run", "--dataset", "mnist", "--method", "lora", *TINY, "--db", str(tmp_path / "r")])
    assert_user_error(bad_dataset, "dataset must be one of", "'mnist'")
    check = invoke(["datasets", "check", "--dataset", "mnist"])
    assert_user_error(check, "'mnist'")


def test_error_impossible_episodes(roots: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    too_many_ways = invoke(run_args("eurosat", roots["eurosat"], "--db", str(db), "--ways", "12"))
    assert_user_error(too_many_ways, "12-way", "needs 12 classes", "only 10 of 10")
    too_few_images = invoke(
        run_args("eurosat", roots["small_eurosat"], "--db", str(db), "--shots", "5", "--queries", "15")
    )
    assert_user_error(too_few_images, "at least 20 images", "AnnualCrop (8)", "Use fewer ways, shots or queries")
    assert not db.exists() or _episodes(db) == 0


def test_error_message_is_one_line(tmp_path: Path) -> None:
    result = invoke(
        run_args("digits", None, "--db", str(tmp_path / "r.sqlite"), "--set", "nosuch=1"), env={"COLUMNS": "80"}
    )
    assert result.exit_code == 2
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert message[-1].startswith("error: unknown config key 'nosuch'")
    assert message[-1].rstrip().endswith("maple.warmup_lr")


@pytest.fixture(scope="module")
def console_script(roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    """One run of the installed `cdfsl` script with an impossible episode, stderr to a pipe (80 columns)."""
    script = Path(sys.executable).parent / "cdfsl"
    assert script.is_file(), "the console script is installed next to the interpreter"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["OMP_NUM_THREADS"] = "1"
    db = tmp_path_factory.mktemp("script") / "r.sqlite"
    return subprocess.run(
        [str(script), *run_args("eurosat", roots["eurosat"], "--db", str(db), "--ways", "12")],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=120,
        check=False,
    )


def test_console_script_user_error(console_script: subprocess.CompletedProcess) -> None:
    assert console_script.returncode == 2, console_script.stderr
    assert "Traceback" not in console_script.stderr + console_script.stdout
    assert "error: eurosat: a 12-way episode" in console_script.stderr
    assert console_script.stdout == ""


def test_console_script_error_is_one_line(console_script: subprocess.CompletedProcess) -> None:
    lines = [line for line in console_script.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: eurosat: a 12-way episode")
    assert lines[-1].rstrip().endswith("Use fewer ways, shots or queries.")


def test_module_entry_point_and_version() -> None:
    from cdfsl import __version__

    result = subprocess.run(
        [sys.executable, "-m", "cdfsl", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cdfsl {__version__}"


def test_help_loads_neither_torch_nor_open_clip() -> None:
    """`cdfsl --help` stays quick: the command line and `import cdfsl` import the heavy libraries only when used."""
    script = (
        "import sys, cdfsl, cdfsl.cli; "
        "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules)); "
        "cdfsl.run; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


def test_cka_against_another_dataset_compares_zero_shot_image_sets(tmp_path: Path) -> None:
    """`diagnose cka --other-dataset`: both sets are zero-shot's (`--method` is for before vs after); the same
    dataset on both sides is the same images, whose linear CKA is 1 at every layer."""
    out = tmp_path / "cka"
    args = ["diagnose", "cka", "--out", str(out), "--dataset", "digits", "--other-dataset", "digits", "--masks", "none"]
    result = invoke([*args, "--backbone", "tiny", "--pretrained", "none", "--episodes", "1", "--set", "device=cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "cka.json").read_text())
    assert data["config"]["method"] == data["other_config"]["method"] == "zeroshot"
    assert data["cka"]["none"] == pytest.approx([1.0] * data["layers"], abs=1e-5)
