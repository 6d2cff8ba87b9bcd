"""What every registered method stores for two short `digits` episodes, observed the same way before and after a change.

`observe(method, db)` runs the method through the runner (2 episodes of 5-way 1-shot, 4 queries per class, 3 steps
on the tiny model with its shipped weights, both episodes in one batch) and reads back what a user keeps: the run id,
each episode's accuracy, its query predictions, its stored records and curves. `tests/fixtures/stored_reference.json`
holds what the code stored before the methods were reorganised (issue 28); `test_stored_reference.py` checks every
method still stores exactly that. To record it afresh (only when a change is meant to move results, said in its
commit): `python tests/stored_reference.py`.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from cdfsl.config import RunConfig
from cdfsl.engine.runner import Runner

FIXTURE = Path(__file__).parent / "fixtures" / "stored_reference.json"
"""The recorded observations: {"methods": {name: observation}, "demo": {method: accuracy in percent}}."""

SIZES: dict[str, Any] = {
    "train.iterations": 3, "augment.views": ("plain", "flip"), "maple.epochs": 2, "maple.batch_size": 4,
    "maple.warmup_epochs": 1, "vtt.state": 4, "vtt.window": 1,
}  # fmt: skip


def reference_config(method: str, db: Path) -> RunConfig:
    config = RunConfig(
        dataset="digits", method=method, backbone="tiny", pretrained="openai", shots=1, queries=4, episodes=2,
        episode_batch=2, device="cpu", db=str(db),
    )  # fmt: skip
    for key, value in SIZES.items():
        section, _, name = key.partition(".")
        setattr(getattr(config, section), name, value)
    return config


def stored_rows(db: Path, run_id: str) -> list[dict[str, Any]]:
    """The stored episodes of `run_id`, as a user reads them back: accuracy, predictions, records, curves."""
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute("SELECT * FROM episodes WHERE run_id = ? ORDER BY episode", (run_id,)).fetchall()
    observed = []
    for row in rows:
        columns = row.keys()
        records = json.loads(row["records_json"]) if "records_json" in columns and row["records_json"] else {}
        if "dlc_off_step" in columns and row["dlc_off_step"] is not None:
            records.setdefault("dlc_off_step", row["dlc_off_step"])
        queries = json.loads(row["queries_json"])
        observed.append(
            {
                "episode": row["episode"],
                "correct": row["correct"],
                "total": row["total"],
                "predicted": queries["predicted"],
                "records": records,
                "curves": json.loads(row["curves_json"]) if row["curves_json"] else None,
            }
        )
    return observed


def observe(method: str, db: Path) -> dict[str, Any]:
    result = Runner().run(reference_config(method, db))
    return {
        "run_id": result.run_id,
        "per_episode": [accuracy for _, accuracy in result.per_episode],
        "episodes": stored_rows(db, result.run_id),
    }


def legacy_run_id(method: str, db: Path, run_id: str) -> str:
    """The id `observe`'s run of `method` had under the identity of earlier versions (`RunConfig.legacy_identity`),
    from the run-level values its stored identity holds."""
    from cdfsl.config import run_id_of
    from cdfsl.engine.store import ResultStore

    with ResultStore(db, read_only=True) as store:
        identity = store.run_identity(run_id)
    config = reference_config(method, db)
    legacy = config.legacy_identity(
        identity["precision"], identity["index"], identity["activation"], identity.get("device", "cpu"),
        identity["images"], identity["pretrained"], identity.get("tokenizer"),
    )  # fmt: skip
    return run_id_of(legacy)


def fit_records(method: str, db: Path) -> list[dict[str, Any]]:
    """What the fitted method itself recorded per episode beyond its curves (the recorder's second look: before
    issue 28 the runner dropped MaPLe's epoch losses, so the store alone could not show them)."""
    from unittest import mock

    import cdfsl.engine.runner as runner_module

    seen: list[dict[str, Any]] = []
    plain = runner_module.train_episodes

    def watched(context: Any, fitted: Any, episodes: list[int]) -> Any:
        results = plain(context, fitted, episodes)
        records = fitted.episode_records() or [{}] * len(episodes)
        seen.extend({k: v for k, v in r.items() if k != "curves"} for r in records)
        return results

    with mock.patch.object(runner_module, "train_episodes", watched):
        Runner().run(reference_config(method, db))
    return seen


def main() -> None:
    from cdfsl.config import METHODS

    recorded = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
    observations = {}
    with tempfile.TemporaryDirectory() as folder:
        for method in METHODS:
            observations[method] = observe(method, Path(folder) / "results.sqlite")
            observations[method]["fit_records"] = fit_records(method, Path(folder) / "again.sqlite")
            print(method, observations[method]["per_episode"], file=sys.stderr)
    recorded["methods"] = observations
    lines = [f" {json.dumps(name)}: {json.dumps(observation, sort_keys=True)}" for name, observation in
             sorted(observations.items())]  # fmt: skip
    demo = json.dumps(recorded.get("demo", {}), sort_keys=True)
    FIXTURE.write_text('{"demo": ' + demo + ', "methods": {\n' + ",\n".join(lines) + "\n}}\n")


if __name__ == "__main__":
    main()
