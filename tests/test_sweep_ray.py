"""The Ray executor's workers that stay, on a Ray started with two logical GPUs on this CPU machine (the workers
train on the CPU, `sweep_faults`): one worker per GPU, every chunk of a run in one process, a chunk out of memory
retried in halves, and a run whose episode always fails reported while the other runs finish; the scheduling of
chunks to workers and the summary line without Ray."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from cdfsl.cli import app
from cdfsl.engine.store import ResultStore
from cdfsl.engine.sweep import SweepRunsFailed, load_sweep, run_ray, worker_slots
from sweep_faults import FAULTS_ENV

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The faults file every worker reads (a test writes it first), on a Ray of 2 CPUs and 2 logical GPUs."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cdfsl[ray]')")
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text("{}")
    tests = str(Path(__file__).parent)
    python_path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    try:
        ray.init(
            num_cpus=2, num_gpus=2, include_dashboard=False, ignore_reinit_error=True,
            runtime_env={
                "env_vars": {FAULTS_ENV: str(path), "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"},
                "worker_process_setup_hook": "sweep_faults.install",
            },
        )  # fmt: skip
    except Exception as error:
        pytest.skip(f"Ray cannot start here: {error}")
    yield path
    ray.shutdown()


def sweep_file(folder: Path, db: Path) -> Path:
    path = folder / f"sweep-{db.stem}.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [sweep]
            db = "{db}"
            episodes = 4
            episode_batch = 2

            [grid]
            method = ["zeroshot", "lora"]
            dataset = "digits"
            shots = 1
            backbone = "tiny"
            pretrained = "none"

            [set]
            "train.iterations" = 1
            queries = 2
            """
        )
    )
    return path


def write_faults(path: Path, log: Path, **faults: Any) -> None:
    path.write_text(json.dumps({"log": str(log), **faults}))


def chunks_by_method(log: Path) -> dict[str, list[tuple[int, list[int]]]]:
    """Each method's chunks in the order the workers took them: (pid, episodes)."""
    taken: dict[str, list[tuple[int, list[int]]]] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        taken.setdefault(entry["method"], []).append((entry["pid"], entry["episodes"]))
    return taken


def test_worker_slots() -> None:
    assert worker_slots({"GPU": 8.0, "CPU": 64.0}, 1, 1) == 8
    assert worker_slots({"GPU": 2.0, "CPU": 64.0}, 0.5, 4) == 4
    assert worker_slots({"GPU": 8.0, "CPU": 4.0}, 1, 1) == 4  # the CPUs bound it too
    assert worker_slots({"CPU": 3.0}, 0, 1) == 3
    assert worker_slots({"CPU": 1.0}, 0, 2) == 1


@pytest.mark.slow  # two Ray workers importing torch: ~18 CPU-seconds (make test-slow)
def test_workers_stay_retry_smaller_and_report_what_always_fails(tmp_path: Path, faults: Path) -> None:
    """One sweep, two logical GPUs: lora's chunks run out of memory above one episode (retried in halves: a split
    batch's results equal the whole batch's, `test_oom_retry`); zeroshot's episode 3 always fails (reported, after its
    other episodes are stored)."""
    log = tmp_path / "chunks.log"
    write_faults(faults, log, oom_above={"lora": 1}, fail={"zeroshot": [3]})
    retried: list[tuple[str, list[int], str]] = []
    db = tmp_path / "ray.sqlite"
    with pytest.raises(SweepRunsFailed) as caught:
        run_ray(
            load_sweep(sweep_file(tmp_path, db)),
            gpus_per_task=1,
            on_retry=lambda plan, episodes, error: retried.append((plan.config.method, episodes, error)),
        )
    taken = chunks_by_method(log)
    assert sorted(episodes for _, episodes in taken["lora"]) == [[0], [0, 1], [1], [2], [2, 3], [3]]
    assert sorted(episodes for _, episodes in taken["zeroshot"]) == [[0, 1], [2], [2, 3], [3]]
    pids = {method: {pid for pid, _ in chunks} for method, chunks in taken.items()}
    assert len(pids["lora"]) == 1 and len(pids["zeroshot"]) == 1  # every chunk of a run in one worker process
    assert pids["lora"] != pids["zeroshot"]  # two logical GPUs: two workers at once
    oom = "OutOfMemoryError: CUDA out of memory (simulated for 2 episodes)"
    assert sorted(retried) == [
        ("lora", [0, 1], oom),
        ("lora", [2, 3], oom),
        ("zeroshot", [2, 3], "RuntimeError: simulated failure of episodes [2, 3]"),
    ]
    assert caught.value.stored == 7
    (failure,) = caught.value.failures
    assert failure.plan.config.method == "zeroshot" and failure.episodes == (3,)
    assert failure.error == "RuntimeError: simulated failure of episodes [3]"
    assert failure.line().startswith("run 1 (zeroshot / vtt-release")
    assert "episode 3 failed: RuntimeError: simulated failure of episodes [3]" in str(caught.value)
    with ResultStore(db, read_only=True) as store:
        finished = {r.config["method"]: sorted(store.finished_episodes(r.run_id)) for r in store.runs()}
        assert finished == {"zeroshot": [0, 1, 2], "lora": [0, 1, 2, 3]}
        assert all(store.pending(r.run_id, 4).claimed == 0 for r in store.runs())  # the failed claim handed back


# ------------------------------------------------------------------------------------- without starting Ray


class FakeActor:
    started = 0

    @classmethod
    def remote(cls) -> str:
        cls.started += 1
        return f"worker {cls.started}"


def state(run_id: str, queued: int) -> Any:
    from cdfsl.engine.sweep import _RunState

    plan = SimpleNamespace(run_id=run_id)
    return _RunState(plan, {}, queue=[[i] for i in range(queued)])  # type: ignore[arg-type]


def test_a_worker_keeps_its_run_and_takes_over_only_a_long_queue() -> None:
    from cdfsl.engine.sweep import TAKE_OVER_CHUNKS, _WorkerPool

    FakeActor.started = 0
    pool = _WorkerPool(FakeActor, slots=3)
    a, b = state("a", 2), state("b", TAKE_OVER_CHUNKS + 1)

    def take() -> tuple[int, str] | None:
        """(worker, run) as the driver takes them: the run's first queued chunk leaves its queue."""
        taken = pool.take([a, b])
        if taken is None:
            return None
        taken[1].queue.pop(0)
        return taken[0], taken[1].run_id

    assert take() == (0, "a") and take() == (1, "b")  # a fresh worker starts a run nobody has started
    assert take() == (2, "b") and FakeActor.started == 3  # a third worker takes over b, whose queue is long
    assert take() is None  # every worker busy, none left to start
    b.queue[:] = [[9], [10]]
    pool.idle += [2]
    assert take() == (2, "b")  # its own run first
    pool.idle += [1, 2]
    assert take() == (1, "b")
    assert take() is None  # a's single chunk waits for a's worker: not worth loading a's run twice
    pool.idle += [0]
    assert take() == (0, "a") and take() is None

    FakeActor.started = 0
    pool = _WorkerPool(FakeActor, slots=3)
    a, b = state("a", 2), state("b", 0)
    assert take() == (0, "a") and take() is None
    assert FakeActor.started == 1  # no worker is started that would have nothing to take


def test_a_failed_chunk_is_retried_in_halves_and_a_failed_episode_is_the_runs_failure() -> None:
    from cdfsl.engine.sweep import _Callbacks, _failed

    retried: list[tuple[str, list[int], str]] = []
    callbacks = _Callbacks(None, None, lambda plan, episodes, error: retried.append((plan.run_id, episodes, error)))
    run = state("a", 0)
    run.queue = [[8, 9]]
    _failed(run, [4, 5, 6], "OutOfMemoryError: CUDA out of memory", callbacks)
    assert run.queue == [[4], [5, 6], [8, 9]] and run.failed == []  # the halves first
    assert retried == [("a", [4, 5, 6], "OutOfMemoryError: CUDA out of memory")]
    _failed(run, [4], "RuntimeError: boom", callbacks)
    assert run.failed == [4] and run.error == "RuntimeError: boom" and len(retried) == 1


def test_the_summary_names_the_failed_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cdfsl.engine.sweep as sweep_module
    from cdfsl.engine.sweep import RunFailure

    path = sweep_file(tmp_path, tmp_path / "r.sqlite")
    plans = [SimpleNamespace(run=SimpleNamespace(position=0, label="zeroshot / vtt-release · digits"))]

    def failing(sweep: Any, *args: Any, on_retry: Any = None, **kwargs: Any) -> int:
        on_retry(plans[0], [2, 3], "RuntimeError: boom")
        raise SweepRunsFailed(7, [RunFailure(plans[0], (3,), "RuntimeError: boom")])  # type: ignore[arg-type]

    monkeypatch.setattr(sweep_module, "run_ray", failing)
    shown = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["sweep", "run", str(path), "--executor", "ray"])
    assert shown.exit_code == 1, shown.output
    lines = shown.output.splitlines()
    assert any(
        "zeroshot / vtt-release" in line and "episodes 2–3 failed (RuntimeError: boom); retrying them as 1 + 1" in line
        for line in lines
    )
    assert "stored 7 episodes; 1 run(s) failed:" in lines
    assert any(
        line.startswith("  run 1 (zeroshot / vtt-release") and line.endswith("episode 3 failed: RuntimeError: boom")
        for line in lines
    )
