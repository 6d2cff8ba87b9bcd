"""The store, the runner and sweeps under what users and clusters do to them: a process killed with SIGKILL, a store
another program changed, a sweep that repeats a run or cannot run on its cluster, an enormous grid, data not yet
downloaded, and Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cdfsl.engine.context as context_module
from cdfsl.cli import app
from cdfsl.engine.runner import Runner, RunResult
from cdfsl.engine.store import Holder, ResultStore
from cdfsl.errors import StoreError
from digits_world import stored_run_config
from test_cli_trust import assert_one_line_error, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

EPISODES = 4
WIDE = {"COLUMNS": "200"}


def invoke(args: list[str], **kwargs: Any) -> Any:
    kwargs.setdefault("env", WIDE)
    return CliRunner().invoke(app, args, **kwargs)


def make_config(db: Path, **changes: Any) -> Any:
    """lora on digits, tiny with random weights, 4 episodes of 2 iterations, one episode per batch."""
    return stored_run_config(db, 2, episode_batch=1, **changes)


def claim_rows(db: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(db)) as connection:
        return list(connection.execute("SELECT run_id, episode, owner, expires_at FROM claims"))


def add_claim(db: Path, run_id: str, episode: int, owner: str, expires_at: float) -> None:
    with closing(sqlite3.connect(db)) as connection:
        connection.execute("INSERT INTO claims VALUES (?, ?, ?, ?)", (run_id, episode, owner, expires_at))
        connection.commit()


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """The uninterrupted single-process run every other run of `make_config` must reproduce."""
    return Runner().run(make_config(tmp_path_factory.mktemp("reference") / "results.sqlite"))


# ----------------------------------------------------------------------------------------------------------
# 8. a process killed with SIGKILL: its claims are taken over at once on its host, and leases are kept by a heartbeat

KILLED_WORKER = """
import pathlib, sys, time
import cdfsl.engine.runner as runner_module
from digits_world import stored_run_config

db, marker = sys.argv[1:3]
original = runner_module._train_batch
calls = 0

def stall_on_second(*args, **kwargs):
    global calls
    calls += 1
    if calls == 2:  # the second batch: its claim is held, the first batch is stored
        pathlib.Path(marker).touch()
        time.sleep(600)
    return original(*args, **kwargs)

runner_module._train_batch = stall_on_second
runner_module.Runner().run(stored_run_config(db, 2, episode_batch=1))
"""

RESUME = """
import json, sys
from cdfsl.engine.runner import Runner
from digits_world import stored_run_config

result = Runner(poll_seconds=0.2).run(stored_run_config(sys.argv[1], 2, episode_batch=1))
print(json.dumps({"trained": result.trained_episodes, "per_episode": result.per_episode}))
"""


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, "-c", script, *args]


def test_resume_after_sigkill_takes_over_the_dead_claim_at_once(reference: RunResult, tmp_path: Path) -> None:
    import json

    db, marker = tmp_path / "results.sqlite", tmp_path / "stalled"
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(python(KILLED_WORKER, str(db), str(marker)), env=env)
    try:
        deadline = time.time() + 120
        while not marker.exists() and worker.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the worker never reached its second batch"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    held = claim_rows(db)
    assert [(episode, owner.split(":")[1]) for _, episode, owner, _ in held] == [(1, str(worker.pid))]
    assert held[0][3] - time.time() <= 60  # a short lease, not half an hour
    started = time.perf_counter()
    resumed = subprocess.run(python(RESUME, str(db)), env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert resumed.returncode == 0, resumed.stderr
    done = json.loads(resumed.stdout.splitlines()[-1])
    assert done["trained"] == EPISODES - 1
    assert [tuple(pair) for pair in done["per_episode"]] == reference.per_episode
    assert claim_rows(db) == []
    assert elapsed < 60, elapsed  # no wait for the dead process's lease (the process start is most of it)


def test_a_dead_local_owner_is_taken_over_at_once_a_remote_one_when_its_lease_lapses(
    reference: RunResult, tmp_path: Path
) -> None:
    db = tmp_path / "results.sqlite"
    ResultStore(db).close()
    add_claim(db, reference.run_id, 0, f"{socket.gethostname()}:{dead_pid()}:0000", time.time() + 3600)
    remote_expiry = time.time() + 3600
    add_claim(db, reference.run_id, 2, "another-host:4242:abcd", remote_expiry)
    waits: list[tuple[Holder, ...]] = []

    def lapse(holders: tuple[Holder, ...]) -> None:
        """Told what it waits on; then the remote owner stops renewing, and its lease runs out in half a second."""
        waits.append(holders)
        with closing(sqlite3.connect(db)) as connection:
            connection.execute("UPDATE claims SET expires_at = ? WHERE episode = 2", (time.time() + 0.5,))
            connection.commit()

    runner = Runner(poll_seconds=0.1, on_wait=lapse)
    started = time.time()
    result = runner.run(make_config(db))
    assert result.per_episode == reference.per_episode
    assert result.trained_episodes == EPISODES
    assert time.time() - started < 60
    # It said once which episodes it waited on, whose they were and until when; never the dead owner's.
    assert len(waits) == 1 and len(waits[0]) == 1
    holder = waits[0][0]
    assert (holder.first, holder.last, holder.count, holder.process) == (2, 2, 1, "process 4242 on another-host")
    assert holder.expires_at == pytest.approx(remote_expiry)


def test_a_lease_is_renewed_while_a_long_batch_trains(
    reference: RunResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 s lease held over a batch of 2.5 s: the heartbeat keeps it ahead of the clock."""
    db = tmp_path / "results.sqlite"
    original = context_module.build_batch
    seen: list[float] = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        if not seen:
            time.sleep(2.5)
            seen.extend(expires_at - time.time() for _, _, _, expires_at in claim_rows(db))
        return original(*args, **kwargs)

    monkeypatch.setattr(context_module, "build_batch", slow)
    result = Runner(lease_seconds=1.0).run(make_config(db))
    assert result.per_episode == reference.per_episode
    assert len(seen) == 1 and seen[0] > 0, seen


def test_the_cli_says_which_episodes_it_waits_on(reference: RunResult, tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    ResultStore(db).close()
    add_claim(db, reference.run_id, 3, "another-host:4242:abcd", time.time() + 3600)

    def lapse_once_the_rest_is_stored() -> None:
        """The remote owner stops 1 s after this process stored everything else (and started to wait)."""
        deadline = time.time() + 300
        while time.time() < deadline:
            with closing(sqlite3.connect(db)) as connection:
                if connection.execute("SELECT COUNT(*) FROM episodes").fetchone()[0] == EPISODES - 1:
                    time.sleep(1.0)
                    connection.execute("UPDATE claims SET expires_at = 0 WHERE episode = 3")
                    connection.commit()
                    return
            time.sleep(0.05)

    args = ["run", "--dataset", "digits", "--method", "lora", "--backbone", "tiny", "--pretrained", "none",
            "--episodes", "4", "--iterations", "2", "--set", "device=cpu", "--db", str(db)]  # fmt: skip
    remote = threading.Thread(target=lapse_once_the_rest_is_stored)
    remote.start()
    try:
        result = invoke(args)
    finally:
        remote.join()
    assert result.exit_code == 0, result.output
    assert "waiting for episode 3, claimed by process 4242 on another-host until" in result.output


# ----------------------------------------------------------------------------------------------------------
# 4. a store holding objects cdfsl did not create (a trigger, a view, an index) is another program's file


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    db = tmp_path / "results.sqlite"
    result = invoke(["run", "--dataset", "digits", "--method", "zeroshot", "--backbone", "tiny", "--pretrained",
                     "none", "--episodes", "2", "--set", "device=cpu", "--db", str(db)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return db


TRIGGER = (
    "CREATE TRIGGER perfect AFTER INSERT ON episodes BEGIN "
    "UPDATE episodes SET correct = total, accuracy = 1.0 WHERE rowid = new.rowid; END"
)


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        (TRIGGER, "trigger 'perfect'"),
        ("CREATE VIEW best AS SELECT * FROM episodes", "view 'best'"),
        ("CREATE INDEX by_accuracy ON episodes (accuracy)", "index 'by_accuracy'"),
        ("CREATE TABLE notes (text TEXT)", "table 'notes'"),
    ],
)
def test_a_store_with_objects_cdfsl_did_not_create_is_refused(filled: Path, sql: str, kind: str) -> None:
    with closing(sqlite3.connect(filled)) as connection:
        connection.execute(sql)
        connection.commit()
    before = snapshot(filled)
    result = invoke(["run", "--dataset", "digits", "--method", "zeroshot", "--backbone", "tiny", "--pretrained",
                     "none", "--episodes", "4", "--set", "device=cpu", "--db", str(filled)])  # fmt: skip
    assert_one_line_error(result, kind, "cdfsl did not create", "another program's file")
    assert snapshot(filled) == before
    assert_one_line_error(invoke(["report", "--db", str(filled)]), kind)
    with pytest.raises(StoreError, match="cdfsl did not create"):
        ResultStore(filled, read_only=True)


def test_a_store_after_analyze_still_opens(filled: Path) -> None:
    """SQLite's own statistics tables (`ANALYZE`) are not another program's objects."""
    with closing(sqlite3.connect(filled)) as connection:
        connection.execute("ANALYZE")
        connection.commit()
    with ResultStore(filled) as store:
        assert len(store.runs()) == 1


# ----------------------------------------------------------------------------------------------------------
# sweeps: a run listed twice (6), data not there yet (27), an enormous grid (11)


def sweep_text(db: Path, *, episodes: int = 4, grid: str = "", roots: str = "", runs: str = "") -> str:
    """A sweep of zero-shot runs on digits (tiny model, CPU) with `grid`, `roots` and `runs` lines added."""
    head = [
        "[sweep]", f'db = "{db}"', f"episodes = {episodes}", "episode_batch = 1", 'device = "cpu"',
        "[grid]", 'method = "zeroshot"', 'dataset = "digits"', 'backbone = "tiny"', 'pretrained = "none"', grid,
        "[roots]", roots,
    ]  # fmt: skip
    return "\n".join(head) + "\n" + runs


DUPLICATE = """
[[run]]
method = "zeroshot"
dataset = "digits"
backbone = "tiny"
pretrained = "none"
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_run_listed_twice_is_counted_once(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    file = write(tmp_path / "sweep.toml", sweep_text(db, runs=DUPLICATE))
    assert invoke(["sweep", "run", str(file)]).exit_code == 0
    status = invoke(["sweep", "status", str(file)])
    assert status.exit_code == 0, status.output
    assert "4 of 4 episodes stored" in status.output
    assert "same run as #1, counted once" in status.output
    planned = invoke(["sweep", "plan", str(file)])
    assert planned.exit_code == 0, planned.output
    assert "same run as #1" in planned.output and "every episode is stored" in planned.output


def test_plan_lists_runs_whose_data_is_not_there_yet(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    missing = tmp_path / "not-downloaded"
    text = sweep_text(db, roots=f'eurosat = "{missing}"', runs='[[run]]\nmethod = "lora"\ndataset = "eurosat"\n')
    file = write(tmp_path / "sweep.toml", text)
    for command in ("plan", "status"):
        result = invoke(["sweep", command, str(file)])
        assert result.exit_code == 0, result.output
        assert "(no data here)" in result.output
        assert f"no data for run(s) 2 here (eurosat: data root not found: {missing}" in result.output
    planned = invoke(["sweep", "plan", str(file)])
    assert "8 episodes to train at most" in planned.output  # 4 of digits, and up to 4 of eurosat


def test_an_enormous_grid_is_refused_before_it_is_built(tmp_path: Path) -> None:
    seeds = list(range(1000))
    grid = f"seed = {seeds}\nshots = {list(range(1, 101))}\nqueries = {list(range(1, 101))}"
    file = write(tmp_path / "sweep.toml", sweep_text(tmp_path / "r.sqlite", grid=grid))
    started = time.perf_counter()
    result = invoke(["sweep", "plan", str(file)])
    assert time.perf_counter() - started < 10
    assert_one_line_error(result, "10000000 runs", "at most 10000")


# ----------------------------------------------------------------------------------------------------------
# 14. Ctrl-C says what is stored and how to resume


def interrupt_second_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    original = context_module.build_batch
    calls = 0

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(context_module, "build_batch", interrupt)


def test_ctrl_c_in_run_says_what_is_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "results.sqlite"
    interrupt_second_batch(monkeypatch)
    args = ["run", "--dataset", "digits", "--method", "lora", "--backbone", "tiny", "--pretrained", "none",
            "--episodes", "4", "--iterations", "1", "--set", "device=cpu", "--db", str(db)]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"interrupted: 1 of 4 episodes stored in {db}; run the same command again to resume"]
    assert claim_rows(db) == []


def test_ctrl_c_in_a_local_sweep_says_what_is_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "results.sqlite"
    file = write(tmp_path / "sweep.toml", sweep_text(db))
    interrupt_second_batch(monkeypatch)
    result = invoke(["sweep", "run", str(file)])
    assert result.exit_code == 130, result.output
    assert result.output.splitlines()[-1] == (
        f"interrupted: 1 of 4 episodes stored in {db}; run the same command again to resume"
    )


# ----------------------------------------------------------------------------------------------------------
# Ray: a cluster without the asked GPUs (9), claims shared with other processes (10), counts (6)


@pytest.fixture(scope="module")
def ray_cpus() -> Iterator[Any]:
    """A local Ray of 2 CPUs and no GPU."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cdfsl[ray]')")
    try:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, ignore_reinit_error=True)
    except Exception as error:
        pytest.skip(f"Ray cannot start here: {error}")
    yield ray
    ray.shutdown()


def within(seconds: float, work: Any) -> Any:
    """`work()`'s value, or a failed test when it has not returned within `seconds` (it may hang before a fix)."""
    box: dict[str, Any] = {}

    def target() -> None:
        box["value"] = work()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return box["value"]


def test_ray_without_the_gpus_a_task_asks_for_is_refused(tmp_path: Path, ray_cpus: Any) -> None:
    file = write(tmp_path / "sweep.toml", sweep_text(tmp_path / "r.sqlite"))
    result = within(120, lambda: invoke(["sweep", "run", str(file), "--executor", "ray"]))
    assert_one_line_error(result, "--gpus-per-task 1", "0 GPUs", "--gpus-per-task 0")
    assert not (tmp_path / "r.sqlite").exists()


def test_the_ray_driver_shares_claims_and_counts_only_what_it_stored(tmp_path: Path, ray_cpus: Any) -> None:
    from cdfsl.engine.store import EpisodeResult
    from cdfsl.engine.sweep import load_sweep, plan_sweep, run_ray

    db = tmp_path / "results.sqlite"
    sweep = load_sweep(write(tmp_path / "sweep.toml", sweep_text(db, runs=DUPLICATE)))
    run_id = plan_sweep(sweep, device="cpu")[0].run_id
    assert run_id is not None
    other = "another-host:4242:abcd"
    ResultStore(db).close()
    add_claim(db, run_id, 1, other, time.time() + 3600)  # a `cdfsl run` elsewhere trains episode 1

    def other_finishes() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            with closing(sqlite3.connect(db)) as connection:
                if connection.execute("SELECT COUNT(*) FROM episodes").fetchone()[0] >= EPISODES - 1:
                    break
            time.sleep(0.05)
        with ResultStore(db) as store:
            store.add_episodes(run_id, [EpisodeResult(1, 0, 75, 0.5)], owner=other)

    waits: list[Any] = []
    thread = threading.Thread(target=other_finishes)
    thread.start()
    try:
        stored = run_ray(sweep, gpus_per_task=0, poll_seconds=0.2, on_wait=lambda plan, held: waits.append(held))
    finally:
        thread.join()
    assert stored == EPISODES - 1  # neither the repeated run nor the other process's episode
    with closing(sqlite3.connect(db)) as connection:
        owners = dict(connection.execute("SELECT episode, trained_by FROM episodes"))
    assert owners[1] == other and len(owners) == EPISODES
    assert [h.first for h in waits[0]] == [1]
    assert claim_rows(db) == []
