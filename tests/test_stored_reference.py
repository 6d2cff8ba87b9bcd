"""Nothing stored changes when the code is reorganised: every method stores what it stored before (issue 28).

`fixtures/stored_reference.json` was recorded by `stored_reference.py` on the code before the methods, the training
loop, the records and the configuration were reorganised. Each method must give the same run id (existing stores keep
serving their runs), the same per-episode accuracies and query predictions, the same training curves (to the 6
decimals they are stored with) and store every record its fit makes (MaPLe's epoch losses were computed and dropped
before). The demo's accuracies are checked by `make test-slow` (six minutes).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from cdfsl.config import METHODS
from stored_reference import FIXTURE, legacy_run_id, observe

RECORDED: dict[str, Any] = json.loads(FIXTURE.read_text())

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a: Any, b: Any, tolerance: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    return a == b


def test_the_registry_still_lists_every_recorded_method() -> None:
    assert set(RECORDED["methods"]) <= set(METHODS)


@pytest.mark.parametrize("method", sorted(RECORDED["methods"]))
def test_a_method_stores_what_it_stored_before(method: str, tmp_path: Path) -> None:
    before = RECORDED["methods"][method]
    now = observe(method, tmp_path / "results.sqlite")
    # A run keeps its id, or (where its identity held fields the method never reads) its legacy id is the recorded
    # one, which the runner adopts (`RunConfig.legacy_identity`, `ResultStore.adopt_run`).
    legacy = legacy_run_id(method, tmp_path / "results.sqlite", now["run_id"])
    assert before["run_id"] in (now["run_id"], legacy), "a run's identity changed: existing stores would not find it"
    assert now["per_episode"] == before["per_episode"]
    for stored, recorded, made in zip(now["episodes"], before["episodes"], before["fit_records"], strict=True):
        assert (stored["episode"], stored["correct"], stored["total"]) == (
            recorded["episode"], recorded["correct"], recorded["total"]
        )  # fmt: skip
        assert stored["predicted"] == recorded["predicted"]
        # curves are stored rounded to 6 decimals: a difference in the last one is rounding, not a changed loop
        assert _close(stored["curves"], recorded["curves"], 2e-6)
        expected = {k: v for k, v in made.items() if v is not None}
        assert _close({k: v for k, v in stored["records"].items() if v is not None}, expected, 1e-6)


@pytest.mark.slow
def test_the_demo_prints_the_accuracies_it_printed_before(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cdfsl.cli import app

    result = CliRunner().invoke(app, ["demo", "--db", str(tmp_path / "demo.sqlite")])
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.split("│")] for line in result.output.splitlines() if "│" in line]
    printed = {row[1]: float(row[4]) for row in rows if re.fullmatch(r"\d+\.\d\d", row[4])}
    assert printed == RECORDED["demo"]
