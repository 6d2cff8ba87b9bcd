"""The command line's surface: parse errors as one `error:` line, help texts printed whole, listings a script can
read, and every `cdfsl …` line of the docs naming a real command and option.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cdfsl.cli import app
from test_cli_trust import assert_one_line_error

WIDE = {"COLUMNS": "200"}
SCRIPT = Path(sys.executable).parent / "cdfsl"


def invoke(args: list[str], **kwargs: Any) -> Any:
    kwargs.setdefault("env", WIDE)
    return CliRunner().invoke(app, args, **kwargs)


def command_tree() -> dict[tuple[str, ...], Any]:
    """Every command and group of the app by its path below `cdfsl` (the root is `()`), as click objects."""
    found: dict[tuple[str, ...], Any] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = command_tree()


def script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed `cdfsl` script with stdout and stderr to pipes (not a terminal), no COLUMNS set."""
    environment = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | (env or {})
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=environment, timeout=120,
        check=False,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# 13. parse errors are one line, like every other refusal


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "cdfsl")
def test_unknown_option_is_one_line_on_every_command(path: tuple[str, ...]) -> None:
    result = invoke([*path, "--no-such-option"])
    assert_one_line_error(result, "--no-such-option", f"`{' '.join(('cdfsl', *path))} --help`")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "--episodes", "1e10"], ["--episodes", "1e10", "`cdfsl run --help`"]),
        (["run", "--shots", "abc"], ["--shots", "abc"]),
        (["run", "--dataset"], ["--dataset", "requires an argument"]),
        (["demo", "--lr", "fast"], ["--lr", "fast"]),
        (["recipes", "--shots", "-"], ["--shots", "(got '-')"]),
        (["datasets", "check"], ["--dataset", "`cdfsl datasets check --help`"]),
        (["predict"], ["argument 'model'", "`cdfsl predict --help`"]),
        (["nosuch"], ["nosuch", "`cdfsl --help`"]),
        (["datasets", "nosuch"], ["nosuch", "`cdfsl datasets --help`"]),
        (["sweep", "plan", "a.toml", "extra"], ["extra"]),
    ],
)
def test_parse_errors_are_one_line(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(invoke(args), *fragments)


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "cdfsl")
def test_help_still_works(path: tuple[str, ...]) -> None:
    result = invoke([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_group_without_a_command_still_shows_its_help() -> None:
    result = invoke(["diagnose"])  # (`cdfsl datasets` alone lists the benchmarks: test_clip_suite_readers.py)
    assert "sink" in result.output and "Usage:" in result.output
    assert "error:" not in result.output


def test_parse_error_from_the_console_script_is_one_line() -> None:
    result = script("run", "--dataset", "digits", "--method", "lora", "--episodes", "1e10")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "--episodes" in lines[0] and "1e10" in lines[0]


def test_interrupt_says_finished_episodes_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import cdfsl.registry as registry

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "describe", interrupted)
    result = invoke(["methods"])
    assert result.exit_code == 130
    assert result.stderr.strip().startswith("interrupted; ")


# ----------------------------------------------------------------------------------------------------
# 16. every `[` of a help text survives rich's markup


def _bracketed_words(text: str) -> list[str]:
    """The words of `text` holding a `[` (as written in the source, before any markup escaping)."""
    return [word for word in text.replace("\\[", "[").split() if "[" in word]


def _help_texts(command: Any) -> list[str]:
    texts = [command.help or ""]
    texts += [getattr(param, "help", None) or "" for param in command.params]
    return texts


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "cdfsl")
def test_help_keeps_every_bracket(path: tuple[str, ...]) -> None:
    command = COMMANDS[path]
    words = [word for text in _help_texts(command) for word in _bracketed_words(text)]
    rendered = invoke([*path, "--help"], env={"COLUMNS": "400"}).stdout
    flat = " ".join(rendered.replace("│", " ").split())
    for word in words:
        assert word in flat, f"{word!r} of `cdfsl {' '.join(path)} --help` is not printed:\n{rendered}"


def test_run_help_names_the_tensorboard_extra() -> None:
    rendered = invoke(["run", "--help"], env={"COLUMNS": "400"}).stdout
    assert "cdfsl[tensorboard]" in rendered


# ----------------------------------------------------------------------------------------------------
# 18b. every `cdfsl …` line of the docs names a real command and real options

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`(cdfsl [^`]+)`(?!`)")
PROMPT = re.compile(r"^(?:\$\s+)?(?:python -m )?(cdfsl\s.*)$")


def doc_command_lines() -> list[tuple[str, str]]:
    """(`file:line`, command line) for every `cdfsl …` line of a fenced block (backslash continuations joined,
    a `$ ` prompt and `# comments` dropped) and every inline `cdfsl …` code span of README.md and docs/*.md."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            start = text.count("\n", 0, block.start(1)) + 1
            joined = block.group(1).replace("\\\n", " ")
            lines = block.group(1).split("\n")
            offsets = [start + i for i, line in enumerate(lines) if i == 0 or not lines[i - 1].endswith("\\")]
            for number, line in zip(offsets, joined.split("\n"), strict=False):
                match = PROMPT.match(line.strip())
                if match:
                    found.append((f"{doc.name}:{number}", match.group(1)))
        for span in INLINE.finditer(text):
            found.append((f"{doc.name}:{text.count(chr(10), 0, span.start()) + 1}", " ".join(span.group(1).split())))
    return found


def _words(line: str) -> list[str]:
    """The words of a command line without its comment (` # …`); quotes as a shell reads them."""
    line = re.split(r"\s#\s", line, maxsplit=1)[0]
    return shlex.split(line)


def _resolve(words: list[str]) -> tuple[Any, list[str], list[str]]:
    """The click command a `cdfsl …` line runs, its path, and the words after the path."""
    command, path = COMMANDS[()], []
    rest = words[1:]
    while rest and rest[0] in getattr(command, "commands", {}):
        command, path, rest = command.commands[rest[0]], [*path, rest[0]], rest[1:]
    return command, path, rest


def test_doc_command_lines_are_found() -> None:
    lines = [line for _, line in doc_command_lines()]
    assert any(line.startswith("cdfsl run --dataset eurosat") for line in lines)
    assert any("--pretrained ~/weights/ViT-B-16.safetensors" in line for line in lines), "continuations joined"
    assert len(lines) > 40


@pytest.mark.parametrize(("where", "line"), doc_command_lines(), ids=lambda value: value[:60])
def test_doc_command_line_names_a_real_command_and_options(where: str, line: str) -> None:
    command, path, rest = _resolve(_words(line))
    if rest and not rest[0].startswith("-") and getattr(command, "commands", None):
        pytest.fail(f"{where}: `{line}`: `{' '.join(('cdfsl', *path))}` has no command {rest[0]!r}")
    known = {name for param in command.params for name in (*param.opts, *param.secondary_opts)} | {"--help"}
    for word in rest:
        if word.startswith("--") and word.split("=", 1)[0] not in known:
            pytest.fail(f"{where}: `{line}`: `{' '.join(('cdfsl', *path))}` has no option {word.split('=', 1)[0]}")


# ----------------------------------------------------------------------------------------------------
# 19. `cdfsl recipes` shows each recipe's values on the base it is the default of


def _row(output: str, key: str) -> str:
    return next(line for line in output.splitlines() if line.strip("│┃ ").startswith(key + " "))


def test_recipes_resolve_on_the_recipe_base() -> None:
    result = invoke(["recipes", "--recipe", "tir-release"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "'a photo of a'" in _row(result.stdout, "prompt.context"), result.stdout
    assert "coop+lora base" in result.stdout
    vtt = invoke(["recipes", "--recipe", "vtt-release"], env={"COLUMNS": "300"})
    assert "lora base" in vtt.stdout and "coop+lora base" not in vtt.stdout
    assert "''" in _row(vtt.stdout, "prompt.context")


# ----------------------------------------------------------------------------------------------------
# 26. listings never break a name, piped or not, and have a --format json for scripts


def first_cells(output: str) -> list[str]:
    """The first cell of every table line of a rich listing (continuation lines give '')."""
    return [line.split("│")[1].strip() for line in output.splitlines() if line.startswith("│")]


@pytest.fixture(scope="module")
def backbone_names() -> list[str]:
    from cdfsl.backbone.catalog import catalogue

    return [entry.name for entry in catalogue() if entry.supported]


def test_backbones_json_lists_the_supported_models(backbone_names: list[str]) -> None:
    result = invoke(["backbones", "--format", "json"])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    assert {"name", "family", "supported", "diagnostics", "tags", "vtt_release_fusion"} <= set(entries[0])
    assert [entry["name"] for entry in entries] == backbone_names


def test_backbones_piped_keep_every_name_whole(backbone_names: list[str]) -> None:
    result = script("backbones")  # stdout is a pipe: rich would lay the table out in 80 columns
    assert result.returncode == 0, result.stderr
    cells = [cell for cell in first_cells(result.stdout) if cell]
    assert cells == backbone_names, result.stdout
    assert any(line.split("│")[1].strip() == "PE-Core-B-16" for line in result.stdout.splitlines() if "│" in line)


@pytest.mark.parametrize("columns", ["80", "140"])
def test_backbones_at_terminal_widths_keep_every_name_whole(backbone_names: list[str], columns: str) -> None:
    result = invoke(["backbones"], env={"COLUMNS": columns})
    assert [cell for cell in first_cells(result.stdout) if cell] == backbone_names, result.stdout
    if columns == "140":  # wide enough for whole names and words: the table fits the terminal
        assert max(len(line) for line in result.stdout.splitlines()) <= 140


def test_backbones_json_with_all_lists_the_others_with_why() -> None:
    entries = json.loads(invoke(["backbones", "--all", "--format", "json"]).stdout)
    others = [entry for entry in entries if not entry["supported"]]
    assert others and all(entry["reason"] for entry in others)


def test_methods_listing_keeps_names_whole() -> None:
    from cdfsl.config import METHODS
    from cdfsl.registry import BASES, PLUGINS

    result = script("methods")
    assert result.returncode == 0, result.stderr
    tables = result.stdout.split("sources")
    assert [cell for cell in first_cells(tables[0]) if cell] == list(METHODS), result.stdout
    assert [cell for cell in first_cells(tables[1]) if cell] == [*BASES, *PLUGINS], result.stdout
    rows = [line.split("│") for line in tables[0].splitlines() if line.startswith("│") and line.split("│")[1].strip()]
    assert all(row[4].strip() in ("vtt-release", "tir-release", "–") for row in rows), tables[0]
    data = json.loads(invoke(["methods", "--format", "json"]).stdout)
    assert [m["method"] for m in data["methods"]] == list(METHODS)
    assert {m["method"]: m["recipe"] for m in data["methods"]}["tir"] == "tir-release"
    assert [b["name"] for b in data["bases"]] == list(BASES)


def test_recipes_listing_keeps_keys_whole_and_has_json() -> None:
    from cdfsl.recipes import RECIPES

    result = invoke(["recipes", "--recipe", "tir-release"], env={"COLUMNS": "80"})
    keys = [value.key for value in RECIPES["tir-release"].values]
    assert [cell for cell in first_cells(result.stdout) if cell] == keys, result.stdout
    assert "zhenyuZ-HUST/CVPR26-VtT" in invoke(["recipes"], env={"COLUMNS": "80"}).stdout
    data = json.loads(invoke(["recipes", "--format", "json", "--dataset", "isic2018", "--shots", "1"]).stdout)
    assert [r["name"] for r in data] == list(RECIPES)
    tir = next(r for r in data if r["name"] == "tir-release")
    assert tir["base"] == "coop+lora" and tir["dataset"] == "isic2018" and tir["shots"] == 1
    values = {v["key"]: v for v in tir["values"]}
    assert values["prompt.context"]["value"] == "a photo of a"
    assert values["train.logit_scale"]["value"] == 2.0 and values["train.logit_scale"]["rule"]
    assert values["tir.blocks"]["value"] == [-4, -2] and values["tir.blocks"]["source"].startswith("shuaiyi308/TIR")


@pytest.mark.parametrize("command", ["backbones", "methods", "recipes"])
def test_listing_refuses_an_unknown_format(command: str) -> None:
    assert_one_line_error(invoke([command, "--format", "yaml"]), "--format", "table or json")


# ----------------------------------------------------------------------------------------------------
# 27.13 zero-shot's recipe shown one way everywhere; nothing trained is never reported as trained

TINY_RUN = ["--dataset", "digits", "--backbone", "tiny", "--pretrained", "none", "--device", "cpu"]


def test_zeroshot_run_says_evaluated_not_trained(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    result = invoke(["run", *TINY_RUN, "--method", "zeroshot", "--episodes", "2", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "zeroshot (vtt-release)" in result.stdout
    assert "2 evaluated, 0 from" in result.stdout and "trained" not in result.stdout


@pytest.mark.parametrize("setting", [["--iterations", "0"], ["--set", "train.iterations=0"]])
@pytest.mark.parametrize("method", ["lora", "tir"])
def test_zero_iterations_are_refused_for_a_trained_method(method: str, setting: list[str], tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    result = invoke(["run", *TINY_RUN, "--method", method, "--episodes", "1", "--db", str(db), *setting])
    assert_one_line_error(result, "train.iterations=0", "trains nothing", f"method {method}", "--method zeroshot")
    assert not db.exists()


def test_zero_iterations_stay_allowed_for_zeroshot(tmp_path: Path) -> None:
    args = ["run", *TINY_RUN, "--method", "zeroshot", "--episodes", "1", "--db", str(tmp_path / "r.sqlite")]
    assert invoke([*args, "--iterations", "0"]).exit_code == 0


def test_demo_shows_zeroshot_recipe_as_run_and_methods_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import cdfsl.cli.run as cli

    monkeypatch.setattr(cli, "DEMO_METHODS", ("zeroshot",))
    result = invoke(["demo", "--episodes", "1", "--episode-batch", "1", "--db", str(tmp_path / "d.sqlite")])
    assert result.exit_code == 0, result.output
    row = _row(result.stdout, "zeroshot")
    assert "vtt-release" in row, result.stdout
    methods = json.loads(invoke(["methods", "--format", "json"]).stdout)["methods"]
    assert {m["method"]: m["recipe"] for m in methods}["zeroshot"] == "vtt-release"
    assert_one_line_error(invoke(["demo", "--iterations", "0"]), "--iterations must be at least 1")


# ----------------------------------------------------------------------------------------------------
# 27.14 a refusal is its error line alone: no progress line, no blank line


def assert_error_line_alone(result: Any, *fragments: str) -> None:
    assert_one_line_error(result, *fragments)
    assert result.output.count("\n") == 1, repr(result.output)


def test_run_refusal_during_the_work_prints_no_blank_line(tmp_path: Path) -> None:
    args = ["run", *TINY_RUN[2:], "--dataset", "eurosat", "--data-root", str(tmp_path / "nowhere"), "--method", "lora"]
    assert_error_line_alone(invoke([*args, "--db", str(tmp_path / "r.sqlite")]), "data root not found")


def test_fit_refusal_prints_no_progress_line(tmp_path: Path) -> None:
    """Refused before training: no bar at all."""
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    args = ["fit", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "model"), "--method", "tir"]
    result = invoke([*args, "--backbone", "tiny", "--pretrained", "none", "--device", "cpu"])
    assert_error_line_alone(result, "zero images found")


def test_report_counts_one_figure_in_the_singular(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    assert invoke(["run", *TINY_RUN, "--method", "zeroshot", "--episodes", "2", "--db", str(db)]).exit_code == 0
    result = invoke(["report", "--db", str(db), "--per-class", "--plot", str(tmp_path / "figures")])
    assert result.exit_code == 0, result.output
    written = list((tmp_path / "figures").iterdir())
    assert len(written) == 1
    assert f"wrote 1 figure to {tmp_path / 'figures'}" in " ".join(result.stderr.split())


def test_fit_failing_while_training_leaves_no_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failing after the bar appeared (fit stops its bar in a `finally`): the error line still stands alone."""
    from cdfsl.classifier import FewShotClassifier
    from cdfsl.errors import TrainingError

    def fails_at_step_two(self: Any, data: Any, shots: Any = None, on_step: Any = None) -> Any:
        on_step(1, 5)
        raise TrainingError("loss turned nan at step 2")

    monkeypatch.setattr(FewShotClassifier, "fit", fails_at_step_two)
    (tmp_path / "train").mkdir()
    args = ["fit", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "model"), "--backbone", "tiny"]
    assert_error_line_alone(invoke([*args, "--pretrained", "none", "--device", "cpu"]), "loss turned nan")
