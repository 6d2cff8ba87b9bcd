"""Sweeps: a grid of runs from one TOML file, planned, followed, and run locally or on a Ray cluster.

The file (read with the standard library's `tomllib`; every key optional but a method and a dataset):

```toml
[sweep]
db = "results.sqlite"        # the store every run writes (default results.sqlite, beside where cdfsl runs)
episodes = 400               # default: the protocol's (800 for 1-shot, 400 otherwise)
episode_batch = 8

[grid]                       # the product of these lists (a single value is a list of one)
method = ["lora", "tir", "vtt"]
dataset = ["eurosat", "isic2018", "cropdiseases", "chestx"]
shots = [1, 5]
backbone = "ViT-B-16"
pretrained = "openai"
seed = 0
recipe = "vtt-release"       # optional: each method's default recipe otherwise

[roots]                      # dataset → its folder
eurosat = "~/data/EuroSAT"

[set]                        # --set overrides for every run
"train.precision" = "bf16"

[[run]]                      # runs outside the grid: the same keys, one value each, and an optional set table
method = "tir+vtt"
dataset = "eurosat"
shots = 5
```

Every run is checked when the file is read (a bad one is named with its position). `plan` and `status` read the store
only. Executors:

- `local`: the runs one after another in this process (`Runner.run`: claims, resume, several processes may share).
- `ray`: every missing chunk of `episode_batch` episodes of every run is a Ray task (one GPU each with
  `gpus_per_task=1`, else CPUs), all in one queue. A worker process keeps the backbones it loaded (and the built
  method of the run it last trained) between tasks. Results come back to the driver, which alone writes the store, as
  they arrive. A task whose worker died is retried by Ray (up to `TASK_RETRIES` times); an episode already stored is
  never stored twice (the store keeps a run's first row of an episode); a driver killed and started again trains only
  the episodes still missing. Episodes are deterministic by index and a fit starts afresh per chunk, so the results
  equal the local executor's episode by episode.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdfsl.config import RunConfig, apply_override
from cdfsl.errors import CdfslError, ConfigError
from cdfsl.labels import changed_settings, run_label, variant_text

RUN_KEYS = ("method", "dataset", "shots", "backbone", "pretrained", "seed", "recipe", "ways", "queries")
SWEEP_KEYS = ("db", "episodes", "episode_batch", "device", "cache_dir")
TASK_RETRIES = 3
FAIL_ONCE_ENV = "CDFSL_TEST_FAIL_ONCE"  # tests only: a marker path; the first task to see it missing kills its worker


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its position in the file's order, a readable label and its config."""

    position: int
    label: str
    config: RunConfig


@dataclass(frozen=True)
class Sweep:
    path: Path
    db: Path
    runs: list[SweepRun]


@dataclass(frozen=True)
class RunPlan:
    """Where one run stands: its resolved config and identity, `stored` of `total` episodes in the store, seconds per
    stored episode (median; None when none is stored), the estimate of the time left (None when nothing to estimate
    from) and the mean accuracy and 95% half-width so far (None when nothing is stored)."""

    run: SweepRun
    config: RunConfig  # resolved, on the planned device: what the run trains and stores
    run_id: str
    identity: dict[str, Any]
    total: int
    stored: int
    seconds_per_episode: float | None
    seconds_left: float | None
    mean: float | None = None
    ci95: float | None = None


# ------------------------------------------------------------------------------------------------------ reading
def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; raises `ConfigError` naming the file (and the run) for anything wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read sweep file {path}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"sweep file {path} is not valid TOML: {error}") from None
    unknown = set(data) - {"sweep", "grid", "roots", "set", "run"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown section(s) {', '.join(sorted(unknown))}")
    sweep = _table(data, "sweep", path)
    bad = set(sweep) - set(SWEEP_KEYS)
    if bad:
        raise ConfigError(f"sweep file {path}: [sweep] takes {', '.join(SWEEP_KEYS)}, not {', '.join(sorted(bad))}")
    roots = {str(k): str(v) for k, v in _table(data, "roots", path).items()}
    common = _table(data, "set", path)
    entries = _grid_entries(_table(data, "grid", path), path)
    extra = data.get("run", [])
    if not isinstance(extra, list) or not all(isinstance(e, dict) for e in extra):
        raise ConfigError(f"sweep file {path}: [[run]] entries must be tables")
    entries += [dict(e) for e in extra]
    if not entries:
        raise ConfigError(f"sweep file {path} names no run: give a [grid] or [[run]] entries")
    db = Path(str(sweep.get("db", "results.sqlite"))).expanduser()
    runs = [_run(i, entry, sweep, roots, common, db, path) for i, entry in enumerate(entries)]
    return Sweep(path, db, runs)


def _table(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"sweep file {path}: [{name}] must be a table")
    return table


def _grid_entries(grid: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    if not grid:
        return []
    bad = set(grid) - set(RUN_KEYS)
    if bad:
        raise ConfigError(f"sweep file {path}: [grid] takes {', '.join(RUN_KEYS)}, not {', '.join(sorted(bad))}")
    keys = list(grid)
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    return [dict(zip(keys, combination, strict=True)) for combination in itertools.product(*values)]


def _run(
    position: int,
    entry: dict[str, Any],
    sweep: dict[str, Any],
    roots: dict[str, str],
    common: dict[str, Any],
    db: Path,
    path: Path,
) -> SweepRun:
    overrides = {**common, **entry.pop("set", {})}
    bad = set(entry) - set(RUN_KEYS)
    where = f"sweep file {path}, run {position + 1} ({', '.join(f'{k}={v}' for k, v in entry.items())})"
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; a run takes {', '.join(RUN_KEYS)}")
    for needed in ("method", "dataset"):
        if needed not in entry:
            raise ConfigError(f"{where}: no {needed}")
    dataset = str(entry["dataset"])
    root = roots.get(dataset)
    fields = {**{k: v for k, v in sweep.items() if k != "db"}, **entry, "db": str(db)}
    if root is not None:
        fields["data_root"] = str(Path(root).expanduser())
    try:
        config = RunConfig(**fields)
        for key, value in overrides.items():
            apply_override(config, f"{key}={_text(value)}")
        config.validate()
    except (CdfslError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from None
    return SweepRun(position, _label(config), config)


def _label(config: RunConfig) -> str:
    """`method / recipe [N-way, changed settings] · dataset · N-shot · backbone · seed N`: the settings that differ
    from the recipe's as report rows show them (`cdfsl.labels`), the seed in its own place."""
    changes = {key: value for key, value in changed_settings(config).items() if key != "seed"}
    name = run_label(config.method, config.recipe_name, variant_text(config.ways, changes))
    return f"{name} · {config.dataset} · {config.shots}-shot · {config.backbone} · seed {config.seed}"


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# ---------------------------------------------------------------------------------------------------- planning
def plan_sweep(sweep: Sweep, device: str | None = None, loads: Any = None) -> list[RunPlan]:
    """Each run's id, episode count, stored count, timing and accuracy so far (the store is only read).

    `device`: the device the runs will train on (`cpu`, `cuda`), which is part of a trained run's identity; None:
    each run's own `device` setting resolved on this machine. Runs with nothing stored are estimated from the median
    seconds per episode of stored runs with the same method and backbone.
    """
    from cdfsl.engine.context import LoadCache, build_context
    from cdfsl.engine.runner import run_identity
    from cdfsl.engine.store import ResultStore
    from cdfsl.stats import mean_ci95

    loads = loads or LoadCache()
    plans: list[RunPlan] = []
    seconds: dict[str, list[float]] = {}
    store = ResultStore(sweep.db, read_only=True) if sweep.db.is_file() else None
    try:
        for run in sweep.runs:
            # The identity for `device` is computed without that device: the context itself is built on the CPU.
            context = build_context(_on_device(run.config, "cpu" if device else None), loads)
            run_id, identity = run_identity(context, device)
            config = _on_device(context.config, device)
            total = context.config.resolved_episodes()
            accuracies = store.episode_accuracies(run_id, below=total) if store else {}
            timings = list(store.episode_seconds(run_id, below=total).values()) if store else []
            per_episode = statistics.median(timings) if timings else None
            if per_episode is not None:
                seconds.setdefault(_kind(run), []).append(per_episode)
            mean, ci = mean_ci95(list(accuracies.values())) if accuracies else (None, None)
            plans.append(RunPlan(run, config, run_id, identity, total, len(accuracies), per_episode, None, mean, ci))
    finally:
        if store is not None:
            store.close()
    estimated = []
    for plan in plans:
        per_episode = plan.seconds_per_episode
        if per_episode is None and seconds.get(_kind(plan.run)):
            per_episode = statistics.median(seconds[_kind(plan.run)])
        left = None if per_episode is None else per_episode * (plan.total - plan.stored)
        estimated.append(dataclasses.replace(plan, seconds_left=left))
    return estimated


def _kind(run: SweepRun) -> str:
    return f"{run.config.method}|{run.config.backbone}"


def _on_device(config: RunConfig, device: str | None) -> RunConfig:
    if device is None:
        return config
    import copy

    moved = copy.deepcopy(config)
    moved.device = device
    return moved


# ----------------------------------------------------------------------------------------------------- running
def run_local(
    sweep: Sweep,
    run: Callable[[RunConfig], Any] | None = None,
    on_run: Callable[[SweepRun], None] | None = None,
) -> list[Any]:
    """Run every run of `sweep` in this process, one after another, with `run` (default `Runner().run`: stored
    episodes are skipped); `on_run` is told each run before it starts. Returns the runs' results."""
    if run is None:
        from cdfsl.engine.runner import Runner

        run = Runner().run
    results = []
    for each in sweep.runs:
        if on_run is not None:
            on_run(each)
        results.append(run(each.config))
    return results


def run_ray(
    sweep: Sweep,
    address: str | None = None,
    gpus_per_task: float = 0,
    cpus_per_task: float = 1,
    on_stored: Callable[[RunPlan, int], None] | None = None,
    init_options: dict[str, Any] | None = None,
) -> int:
    """Run the missing episodes of every run of `sweep` as Ray tasks (module docstring); returns how many episodes
    were stored. `address`: an existing cluster (None: a local Ray on this machine's devices). `on_stored(plan,
    episodes)` is called after each stored chunk."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'cdfsl[ray]'") from None
    from cdfsl.engine.context import chunks
    from cdfsl.engine.runner import _owner_id
    from cdfsl.engine.store import ResultStore

    device = "cuda" if gpus_per_task > 0 else "cpu"
    plans = plan_sweep(sweep, device=device)
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, **(init_options or {}))
    task = ray.remote(num_gpus=gpus_per_task, num_cpus=cpus_per_task, max_retries=TASK_RETRIES)(_train_task)
    owner = _owner_id()
    stored = 0
    with ResultStore(sweep.db) as store:
        pending: dict[Any, tuple[RunPlan, dict[str, Any]]] = {}
        for plan in plans:
            fields = plan.config.to_dict()
            missing = sorted(set(range(plan.total)) - store.finished_episodes(plan.run_id))
            for chunk in chunks(missing, plan.config.episode_batch):
                pending[task.remote(fields, chunk)] = (plan, fields)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                plan, fields = pending.pop(ref)
                results = ray.get(ref)
                store.add_episodes(plan.run_id, results, owner=owner, config=fields, identity=plan.identity)
                stored += len(results)
                if on_stored is not None:
                    on_stored(plan, len(results))
    return stored


# In a Ray worker process: its LoadCache and the last run's (key, context, method). The one process-global cache in
# cdfsl, on purpose: a Ray task is a function, and this is what lets a worker keep its loaded backbone between tasks.
_WORKER: dict[str, Any] = {}


def _train_task(config_fields: dict[str, Any], episodes: list[int]) -> list[Any]:
    """A Ray task: fit and predict `episodes` of the run `config_fields` describes; their results (not stored)."""
    import json

    from cdfsl.engine.context import LoadCache, build_context
    from cdfsl.engine.runner import train_episodes
    from cdfsl.methods import build_method

    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        Path(marker).write_text("killed once\n")
        os._exit(17)  # the worker dies in the middle of its task: Ray must retry it elsewhere
    loads = _WORKER.setdefault("loads", LoadCache())
    key = json.dumps(config_fields, sort_keys=True, default=str)
    if _WORKER.get("key") != key:
        context = build_context(RunConfig.from_dict(config_fields, source="a sweep task"), loads)
        method = build_method(context.config, context.backbone, context.autocast_dtype)
        context.load()
        _WORKER.update(key=key, context=context, method=method)
    return train_episodes(_WORKER["context"], _WORKER["method"], episodes)
