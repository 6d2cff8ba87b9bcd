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
protocol = "episodic"        # or "all-way": one fit on K shots of every class per run (shots x seed name it)

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
import math
import os
import statistics
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdfsl.config import RunConfig, check_field, read_data_file, update_from_dict
from cdfsl.errors import CdfslError, ConfigError
from cdfsl.labels import changed_settings, run_label, variant_text
from cdfsl.spec import RunSpec

RUN_KEYS = ("method", "dataset", "shots", "backbone", "pretrained", "seed", "recipe", "ways", "queries", "protocol")
ALL_WAY = "all-way"  # `RunConfig.protocol` of one all-way K-shot fit per run (the CLIP few-shot suite's protocol)
SWEEP_KEYS = ("db", "episodes", "episode_batch", "device", "cache_dir")
TASK_RETRIES = 3
MAX_RUNS = 10_000  # runs per sweep file: each is identified (dataset index, config) when planned
FAIL_ONCE_ENV = "CDFSL_TEST_FAIL_ONCE"  # tests only: a marker path; the first task to see it missing kills its worker


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its position in the file's order, a readable label, its config as the file gives it and
    its run spec (the config validated and resolved once, as the sweep was loaded: what planning and running use)."""

    position: int
    label: str
    config: RunConfig
    spec: RunSpec


@dataclass(frozen=True)
class Sweep:
    path: Path
    db: Path
    runs: list[SweepRun]


@dataclass(frozen=True)
class RunPlan:
    """Where one run stands: its resolved config and identity, `stored` of `total` episodes in the store, seconds per
    stored episode (median; None when none is stored), the estimate of the time left (None when nothing to estimate
    from) and the mean accuracy and 95% half-width so far (None when nothing is stored); whether it repeats an earlier
    run (`same_as`) and why its data cannot be read here (`data_missing`)."""

    run: SweepRun
    config: RunConfig  # resolved, on the planned device: what the run trains and stores
    run_id: str | None  # None: its dataset cannot be read here (`data_missing`)
    identity: dict[str, Any]
    total: int
    stored: int | None  # None: unknown without the dataset
    seconds_per_episode: float | None
    seconds_left: float | None
    mean: float | None = None
    ci95: float | None = None
    same_as: int | None = None  # the position of an earlier run with the same identity: the same run, listed twice
    data_missing: str | None = None  # why the run's dataset cannot be read here


# ------------------------------------------------------------------------------------------------------ reading
def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; raises `ConfigError` naming the file (and the run) for anything wrong."""
    path = Path(path)
    data = read_data_file(path, f"sweep file {path}", "toml")
    unknown = set(data) - {"sweep", "grid", "roots", "set", "run"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown section(s) {', '.join(sorted(unknown))}")
    sweep = _table(data, "sweep", path)
    bad = set(sweep) - set(SWEEP_KEYS)
    if bad:
        raise ConfigError(f"sweep file {path}: [sweep] takes {', '.join(SWEEP_KEYS)}, not {', '.join(sorted(bad))}")
    hints = typing.get_type_hints(RunConfig)
    sweep = {key: check_field(key, value, hints[key], f"sweep file {path}, [sweep]") for key, value in sweep.items()}
    roots = {k: check_field(k, v, str, f"sweep file {path}, [roots]") for k, v in _table(data, "roots", path).items()}
    common = _table(data, "set", path)
    entries = _grid_entries(_table(data, "grid", path), path)
    extra = data.get("run", [])
    if not isinstance(extra, list) or not all(isinstance(e, dict) for e in extra):
        raise ConfigError(f"sweep file {path}: [[run]] entries must be tables")
    entries += [dict(e) for e in extra]
    if len(entries) > MAX_RUNS:
        raise ConfigError(f"sweep file {path} names {len(entries)} runs; a sweep holds at most {MAX_RUNS}: split it")
    if not entries:
        raise ConfigError(f"sweep file {path} names no run: give a [grid] or [[run]] entries")
    db = Path(sweep.get("db", "results.sqlite")).expanduser()
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
    count = math.prod(len(v) for v in values)
    if count > MAX_RUNS:  # counted before the product is built: a huge grid is refused at once, not after minutes
        sizes = " × ".join(f"{len(v)} {k}" for k, v in zip(keys, values, strict=True) if len(v) > 1)
        raise ConfigError(
            f"sweep file {path}: [grid] names {count} runs ({sizes}); a sweep holds at most {MAX_RUNS} runs: split "
            "it into several files or shorten its lists"
        )
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
    own = entry.pop("set", {})
    bad = set(entry) - set(RUN_KEYS)
    where = f"sweep file {path}, run {position + 1} ({', '.join(f'{k}={v}' for k, v in entry.items())})"
    if not isinstance(own, dict):
        raise ConfigError(f"{where}: set must be a table of config keys ([run.set]), got {own!r}")
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
    # Typed values, as in a config file: each is checked against its field's type, naming the table it came from.
    config = RunConfig.from_dict(fields, source=where)
    update_from_dict(config, common, f"{where}, [set]")
    update_from_dict(config, own, f"{where}, [run.set]")
    try:
        spec = RunSpec.of(config)
    except CdfslError as error:
        raise ConfigError(f"{where}: {error}") from None
    return SweepRun(position, _label(config), config, spec)


def _label(config: RunConfig) -> str:
    """`method / recipe [N-way, changed settings] · dataset · N-shot · backbone · seed N`: the settings that differ
    from the recipe's as report rows show them (`cdfsl.labels`), the seed in its own place."""
    changes = {key: value for key, value in changed_settings(config).items() if key != "seed"}
    name = run_label(config.method, config.recipe_name, variant_text(config.ways, changes))
    return f"{name} · {config.dataset} · {config.shots}-shot · {config.backbone} · seed {config.seed}"


# ---------------------------------------------------------------------------------------------------- planning
def plan_sweep(
    sweep: Sweep,
    device: str | None = None,
    loads: Any = None,
    on_planned: Callable[[int, int], None] | None = None,
) -> list[RunPlan]:
    """Each run's id, episode count, stored count, timing and accuracy so far (the store is only read).

    `device`: the device the runs will train on (`cpu`, `cuda`), which is part of a trained run's identity; None:
    each run's own `device` setting resolved on this machine. Runs with nothing stored are estimated from the median
    seconds per episode of stored runs with the same method and backbone (an all-way fit: of stored fits with the same
    method, backbone, dataset and shots, i.e. the other seeds). A run whose dataset cannot be read here
    (its root not downloaded yet) is planned without an id (`data_missing` says why; whether it is stored cannot be
    told without its images). A run with the same identity as an earlier one is marked `same_as` that run (see
    `distinct_runs`). `on_planned(done, total)` is told after each run.
    """
    from cdfsl.engine.context import LoadCache, build_context
    from cdfsl.engine.runner import run_identity, stored_run_id
    from cdfsl.engine.store import ResultStore
    from cdfsl.errors import DatasetError
    from cdfsl.stats import mean_ci95

    loads = loads or LoadCache()
    plans: list[RunPlan] = []
    seconds: dict[str, list[float]] = {}
    first: dict[str, int] = {}
    store = ResultStore(sweep.db, read_only=True) if sweep.db.is_file() else None
    try:
        for run in sweep.runs:
            total = planned_episodes(run.config)
            try:
                # The identity for `device` is computed without that device: the context itself is built on the CPU.
                context = build_context(_on_device(run.spec, "cpu" if device else None), loads)
            except DatasetError as error:
                config = _on_device(run.spec, device).config
                plans.append(RunPlan(run, config, None, {}, total, None, None, None, data_missing=str(error)))
            else:
                run_id, identity = run_identity(context, device)
                config = _on_device(context.spec, device).config
                stored_as = stored_run_id(store, context, run_id, device) if store else run_id
                accuracies = store.episode_accuracies(stored_as, below=total) if store else {}
                timings = list(store.episode_seconds(stored_as, below=total).values()) if store else []
                per_episode = statistics.median(timings) if timings else None
                if per_episode is not None:
                    seconds.setdefault(_kind(run), []).append(per_episode)
                mean, ci = mean_ci95(list(accuracies.values())) if accuracies else (None, None)
                same_as = first.setdefault(run_id, run.position)
                plans.append(
                    RunPlan(
                        run, config, run_id, identity, total, len(accuracies), per_episode, None, mean, ci,
                        same_as=None if same_as == run.position else same_as,
                    )
                )  # fmt: skip
            if on_planned is not None:
                on_planned(len(plans), len(sweep.runs))
    finally:
        if store is not None:
            store.close()
    estimated = []
    for plan in plans:
        per_episode = plan.seconds_per_episode
        if per_episode is None and seconds.get(_kind(plan.run)):
            per_episode = statistics.median(seconds[_kind(plan.run)])
        left = None if per_episode is None else per_episode * (plan.total - (plan.stored or 0))
        estimated.append(dataclasses.replace(plan, seconds_left=left))
    return estimated


def distinct_runs(plans: list[RunPlan]) -> list[RunPlan]:
    """One plan per run identity, in file order: what sums and executors count, so a run listed twice (an
    identical `[[run]]`, or a grid point repeated) is counted and trained once. Of runs that share an identity the one
    asking for the most episodes stands for them; runs without an id (data missing) are kept."""
    chosen: dict[str, RunPlan] = {}
    order: list[str | int] = []
    kept: dict[int, RunPlan] = {}
    for plan in plans:
        if plan.run_id is None:
            kept[plan.run.position] = plan
            order.append(plan.run.position)
        elif plan.run_id not in chosen:
            chosen[plan.run_id] = plan
            order.append(plan.run_id)
        elif plan.total > chosen[plan.run_id].total:
            chosen[plan.run_id] = plan
    return [kept[key] if isinstance(key, int) else chosen[key] for key in order]


def planned_episodes(config: RunConfig) -> int:
    """What a run stores: its episodes, or the one fit of an all-way run."""
    return 1 if config.protocol == ALL_WAY else config.resolved_episodes()


def _kind(run: SweepRun) -> str:
    """Runs whose stored timings estimate each other's: an episode of the same method and backbone; an all-way fit
    only from fits of the same method, backbone, dataset and shots (its steps and test split differ with each)."""
    config = run.config
    if config.protocol == ALL_WAY:
        return f"{config.method}|{config.backbone}|{ALL_WAY}|{config.dataset}|{config.shots}"
    return f"{config.method}|{config.backbone}"


def _on_device(spec: RunSpec, device: str | None) -> RunSpec:
    """`spec` on `device` (a device name `check_device` accepts; None: as it is), not validated again."""
    return spec if device is None else spec.replaced(device=device)


# ----------------------------------------------------------------------------------------------------- running
def run_local(
    sweep: Sweep,
    run: Callable[[RunSpec], Any] | None = None,
    on_run: Callable[[SweepRun], None] | None = None,
) -> list[Any]:
    """Run every run of `sweep` in this process, one after another, with `run` given each run's spec (default
    `Runner().run`: stored episodes are skipped); `on_run` is told each run before it starts. Returns the runs'
    results."""
    if run is None:
        from cdfsl.engine.runner import Runner

        run = Runner().run
    results = []
    for each in sweep.runs:
        if on_run is not None:
            on_run(each)
        results.append(run(each.spec))
    return results


def run_ray(
    sweep: Sweep,
    address: str | None = None,
    gpus_per_task: float = 0,
    cpus_per_task: float = 1,
    on_stored: Callable[[RunPlan, int], None] | None = None,
    init_options: dict[str, Any] | None = None,
    on_wait: Callable[[RunPlan, tuple[Any, ...]], None] | None = None,
    lease_seconds: float = 60.0,
    poll_seconds: float = 5.0,
) -> int:
    """Run the missing episodes of every run of `sweep` as Ray tasks (module docstring); returns how many episodes
    this driver stored (an episode another process stored first is not counted). `address`: an existing cluster
    (None: a local Ray on this machine's devices). `on_stored(plan, episodes)` is called after each stored chunk;
    `on_wait(plan, holders)` when the driver starts waiting on episodes other processes hold (`store.Holder`).

    The driver claims episodes as `Runner` does (so a `cdfsl run` or another driver on the same runs shares them),
    keeps its claims alive with a heartbeat while it lives, and hands them back when interrupted or failed; an
    interrupt reaches the caller as `runner.RunInterrupted` with the sweep's stored and total episodes. A cluster
    without the GPUs or CPUs one task asks for is refused before anything is submitted.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'cdfsl[ray]'") from None
    from cdfsl.engine.store import ResultStore, new_owner_id

    started_here = not ray.is_initialized()
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, **(init_options or {}))
    try:
        _check_resources(ray.cluster_resources(), gpus_per_task, cpus_per_task, address)
        plans = distinct_runs(plan_sweep(sweep, device="cuda" if gpus_per_task > 0 else "cpu"))
        lacking = [plan for plan in plans if plan.data_missing is not None]
        if lacking:
            plan = lacking[0]
            raise ConfigError(
                f"sweep file {sweep.path}, run {plan.run.position + 1} ({plan.run.label}): {plan.data_missing}; the "
                "Ray driver reads every dataset to identify its runs (`cdfsl sweep plan` lists the runs without data)"
            )
        task = ray.remote(num_gpus=gpus_per_task, num_cpus=cpus_per_task, max_retries=TASK_RETRIES)(_train_task)
        owner = new_owner_id()
        with ResultStore(sweep.db) as store:
            try:
                with store.keep_claims_alive(owner, lease_seconds):
                    return _drive(ray, task, store, plans, owner, lease_seconds, poll_seconds, on_stored, on_wait)
            except BaseException as error:
                from contextlib import suppress

                from cdfsl.engine.runner import RunInterrupted
                from cdfsl.errors import StoreError

                with suppress(StoreError):
                    for plan in plans:
                        store.release_claims(str(plan.run_id), owner)
                if isinstance(error, KeyboardInterrupt) and not isinstance(error, RunInterrupted):
                    done = sum(store.pending(str(plan.run_id), plan.total).stored for plan in plans)
                    raise RunInterrupted(done, sum(plan.total for plan in plans), store.path) from None
                raise
    finally:
        if started_here:
            ray.shutdown()


def _check_resources(resources: dict[str, float], gpus: float, cpus: float, address: str | None) -> None:
    """Refuse a task shape the cluster can never place (Ray would queue it forever)."""
    where = "this machine's Ray" if address is None else f"the Ray cluster at {address}"
    for option, asked, name in (("--gpus-per-task", gpus, "GPU"), ("--cpus-per-task", cpus, "CPU")):
        have = float(resources.get(name, 0.0))
        if asked > have:
            hint = "pass --gpus-per-task 0 for CPU tasks, or" if name == "GPU" else "pass fewer, or"
            raise ConfigError(
                f"{option} {asked:g}: {where} has {have:g} {name}s in all, so no task could ever start; {hint} "
                f"--address of a cluster that has them"
            )


def _drive(
    ray: Any,
    task: Any,
    store: Any,
    plans: list[RunPlan],
    owner: str,
    lease_seconds: float,
    poll_seconds: float,
    on_stored: Callable[[RunPlan, int], None] | None,
    on_wait: Callable[[RunPlan, tuple[Any, ...]], None] | None,
) -> int:
    """Claim every free episode of every run, submit them in chunks, store results as they arrive, and wait on
    episodes other processes hold, until every run is stored; returns the episodes this driver stored."""
    import time

    from cdfsl.engine.context import chunks

    fields = {str(plan.run_id): plan.config.to_dict() for plan in plans}
    position = {str(plan.run_id): 0 for plan in plans}
    in_flight = {str(plan.run_id): 0 for plan in plans}
    waited_on: dict[str, tuple[tuple[str, int, int, int], ...]] = {}
    submitted: dict[Any, RunPlan] = {}
    open_runs = list(plans)
    stored = 0
    while open_runs or submitted:
        for plan in open_runs:
            run_id = str(plan.run_id)
            if position[run_id] < plan.total:
                claimed, position[run_id] = store.claim_episodes(
                    run_id, plan.total, plan.total, owner, lease_seconds, position[run_id]
                )
                for chunk in chunks(claimed, plan.config.episode_batch):
                    submitted[task.remote(fields[run_id], chunk)] = plan
                    in_flight[run_id] += 1
        if submitted:
            done, _ = ray.wait(list(submitted), num_returns=1, timeout=poll_seconds)
            for ref in done:
                plan = submitted.pop(ref)
                run_id = str(plan.run_id)
                in_flight[run_id] -= 1
                added = store.add_episodes(
                    run_id, ray.get(ref), owner=owner, config=fields[run_id], identity=plan.identity
                )
                stored += added
                if on_stored is not None:
                    on_stored(plan, added)
        still_open, next_expiry = [], float("inf")
        for plan in open_runs:
            run_id = str(plan.run_id)
            if in_flight[run_id]:
                still_open.append(plan)
                continue
            pending = store.pending(run_id, plan.total)
            if pending.stored >= plan.total:
                continue
            still_open.append(plan)
            if pending.stored + pending.claimed < plan.total:
                position[run_id] = 0  # an episode came free behind the sweep: claim it next round
                continue
            holding = tuple((h.owner, h.count, h.first, h.last) for h in pending.holders)
            if holding != waited_on.get(run_id) and on_wait is not None:
                on_wait(plan, pending.holders)
            waited_on[run_id] = holding
            next_expiry = min(next_expiry, pending.next_expiry or next_expiry)
        open_runs = still_open
        if open_runs and not submitted and all(position[str(p.run_id)] >= p.total for p in open_runs):
            time.sleep(min(poll_seconds, max(next_expiry - time.time(), 0.0) + 0.01))
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
        method = build_method(context.spec, context.backbone, context.autocast_dtype)
        context.load()
        _WORKER.update(key=key, context=context, method=method)
    return train_episodes(_WORKER["context"], _WORKER["method"], episodes)
