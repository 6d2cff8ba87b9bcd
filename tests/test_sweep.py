"""Sweeps: the file (grid, roots, extra runs, overrides, bad entries), plan and status from the store, the local
executor, and the Ray executor against the local one — with a worker killed in the middle of a task and a driver
restarted on a partly stored sweep."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdfsl.cli import app
from cdfsl.engine.store import ResultStore
from cdfsl.engine.sweep import FAIL_ONCE_ENV, load_sweep, plan_sweep, run_local, run_ray
from cdfsl.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def sweep_file(folder: Path, db: Path, episodes: int = 4, extra: str = "") -> Path:
    path = folder / f"sweep-{episodes}.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [sweep]
            db = "{db}"
            episodes = {episodes}
            episode_batch = 2
            device = "cpu"

            [grid]
            method = ["zeroshot", "lora"]
            dataset = "digits"
            shots = 1
            backbone = "tiny"
            pretrained = "none"

            [set]
            "train.iterations" = 2
            queries = 3
            """
        )
        + extra
    )
    return path


def test_the_file_is_a_product_plus_extra_runs(tmp_path: Path) -> None:
    extra = (
        '\n[[run]]\nmethod = "tir"\ndataset = "digits"\nshots = 5\nbackbone = "tiny"\n[run.set]\n"tir.ratio" = 0.2\n'
    )
    sweep = load_sweep(sweep_file(tmp_path, tmp_path / "r.sqlite", extra=extra))
    assert [(r.config.method, r.config.shots) for r in sweep.runs] == [("zeroshot", 1), ("lora", 1), ("tir", 5)]
    assert all(r.config.queries == 3 and r.config.episode_batch == 2 for r in sweep.runs)
    assert sweep.runs[2].config.tir.ratio == 0.2 and sweep.runs[1].config.tir.ratio != 0.2
    label = "zeroshot / vtt-release [queries=3, pretrained=none] · digits · 1-shot · tiny · seed 0"
    assert sweep.runs[0].label == label


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[grid]\nmethod = 'lora'\n", "run 1 .*: no dataset"),
        ("[grid]\nmethod = 'lora'\ndataset = 'digits'\ncolour = 'red'\n", r"\[grid\] takes"),
        ("[grid]\nmethod = ['lora', 'nope']\ndataset = 'digits'\n", r"run 2 \(method=nope.*not a base"),
        ("[grid]\nmethod = 'lora'\ndataset = 'eurosat'\n", "--data-root is required"),
        ("[grid\n", "not valid TOML"),
        ("[sweep]\ndb = 'x'\n", "names no run"),
        ("[grids]\n", "unknown section"),
    ],
)
def test_bad_files_are_refused_with_the_run_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_local_run_then_plan_and_status(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    sweep = load_sweep(sweep_file(tmp_path, db))
    before = plan_sweep(sweep)
    assert [(p.total, p.stored, p.seconds_left) for p in before] == [(4, 0, None), (4, 0, None)]
    small = load_sweep(sweep_file(tmp_path, db, episodes=2))
    run_local(small)
    after = plan_sweep(sweep)
    assert [p.stored for p in after] == [2, 2] and all(p.seconds_left is not None for p in after)
    assert after[1].seconds_left == pytest.approx(2 * after[1].seconds_per_episode)
    runner = CliRunner(env={"COLUMNS": "200"})
    shown = runner.invoke(app, ["sweep", "status", str(sweep.path)])
    assert shown.exit_code == 0 and "4 of 8 episodes stored" in shown.output
    ran = runner.invoke(app, ["sweep", "run", str(sweep.path)])
    assert ran.exit_code == 0, ran.output
    planned = runner.invoke(app, ["sweep", "plan", str(sweep.path)])
    assert "every episode is stored" in planned.output


# ------------------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A local Ray of 2 CPU workers whose first task kills its own worker (marker file: FAIL_ONCE_ENV)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cdfsl[ray]')")
    marker = tmp_path_factory.mktemp("ray") / "killed-once"
    try:
        ray.init(
            num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {FAIL_ONCE_ENV: str(marker)}},
            ignore_reinit_error=True,
        )  # fmt: skip
    except Exception as error:
        pytest.skip(f"Ray cannot start here: {error}")
    yield marker
    ray.shutdown()


def stored_rows(db: Path) -> dict[str, dict[int, object]]:
    with ResultStore(db, read_only=True) as store:
        return {r.run_id: store.episode_queries(r.run_id) for r in store.runs()}


def test_ray_equals_local_and_survives_a_killed_worker(tmp_path: Path, ray_session: Path) -> None:
    local_db, ray_db = tmp_path / "local.sqlite", tmp_path / "ray.sqlite"
    run_local(load_sweep(sweep_file(tmp_path, local_db)))
    stored = run_ray(load_sweep(sweep_file(tmp_path, ray_db)), gpus_per_task=0)
    assert ray_session.exists()  # a worker died in the middle of its task, and the task was retried
    assert stored == 8
    assert stored_rows(ray_db) == stored_rows(local_db)  # the same episodes, query by query


def test_a_restarted_driver_trains_only_what_is_missing(tmp_path: Path, ray_session: Path) -> None:
    db = tmp_path / "r.sqlite"
    run_local(load_sweep(sweep_file(tmp_path, db, episodes=2)))  # the first driver got this far
    assert run_ray(load_sweep(sweep_file(tmp_path, db)), gpus_per_task=0) == 4
    with ResultStore(db, read_only=True) as store:
        assert all(len(store.finished_episodes(r.run_id)) == 4 for r in store.runs())


def test_the_shipped_paper_sweep_reads() -> None:
    sweep = load_sweep(Path(__file__).parents[1] / "sweeps" / "paper-main-table.toml")
    assert len(sweep.runs) == 32 and {r.config.resolved_episodes() for r in sweep.runs} == {800, 400}
    assert {r.config.dataset for r in sweep.runs} == {"eurosat", "isic2018", "cropdiseases", "chestx"}


def test_planning_for_gpus_needs_none_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver without the workers' GPUs plans (and drives) their runs: the identity for `cuda` is the one a
    CUDA machine computes (checked by pretending CUDA exists), and it differs from the CPU run's."""
    import torch

    from cdfsl.engine.context import build_context
    from cdfsl.engine.runner import run_identity

    sweep = load_sweep(sweep_file(tmp_path, tmp_path / "r.sqlite"))
    on_gpu, on_cpu = plan_sweep(sweep, device="cuda"), plan_sweep(sweep, device="cpu")
    assert all(p.config.device == "cuda" for p in on_gpu)
    assert all(g.run_id != c.run_id for g, c in zip(on_gpu, on_cpu, strict=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for plan in on_gpu:
        assert run_identity(build_context(plan.config))[0] == plan.run_id
