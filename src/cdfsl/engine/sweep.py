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
- `ray`: every missing chunk of `episode_batch` episodes of every run goes, all runs in one queue, to long-lived
  workers: Ray actors of `gpus_per_task` GPUs (one per GPU with 1) or, with 0, of `cpus_per_task` CPUs, as many as
  the cluster holds (`worker_slots`). A worker keeps its `LoadCache` (backbones, image caches) and the built method
  of the run it last trained for its whole life, on CPU and GPU alike, and the driver sends a run's next chunk to the
  worker that trained its previous one (`_WorkerPool`), so a run's chunks land in one process. Results come back to
  the driver, which alone writes the store, as they arrive. A worker that dies is restarted and its chunk retried by
  Ray (up to `TASK_RETRIES` times); a chunk that fails otherwise (out of memory after the worker's own split, any
  error) is retried by the driver as two halves, down to one episode; an episode that fails alone is its run's
  failure: the run's other episodes and every other run go on, and `SweepRunsFailed` names the failed runs at the
  end. An episode already stored is never stored twice (the store keeps a run's first row of an episode); a driver
  killed and started again trains only the episodes still missing. Episodes are deterministic by index and a fit
  starts afresh per chunk, so the results equal the local executor's episode by episode.
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
from cdfsl.labels import changed_settings, episode_ways, run_label, variant_text
from cdfsl.spec import RunSpec

RUN_KEYS = ("method", "dataset", "shots", "backbone", "pretrained", "seed", "recipe", "ways", "queries", "protocol")
ALL_WAY = "all-way"  # `RunConfig.protocol` of one all-way K-shot fit per run (the CLIP few-shot suite's protocol)
SWEEP_KEYS = ("db", "episodes", "episode_batch", "device", "cache_dir")
TASK_RETRIES = 3  # Ray's retries of a chunk whose worker died (the worker is restarted)
TAKE_OVER_CHUNKS = 4  # queued chunks of a run another worker started, from which an idle worker takes over
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
    name = run_label(config.method, config.recipe_name, variant_text(episode_ways(config), changes))
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
    from cdfsl.engine.runner import episode_total, run_identity, stored_run_id
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
            total = episode_total(run.config)
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


@dataclass(frozen=True)
class RunFailure:
    """A run of a Ray sweep that could not be finished: the episodes that failed even alone, and the last error
    (`Type: first line of its message`). Its other episodes are stored."""

    plan: RunPlan
    episodes: tuple[int, ...]
    error: str

    def line(self) -> str:
        """`run N (label): episodes …: error`, one line of the sweep's summary."""
        episodes = ", ".join(map(str, self.episodes[:8])) + (" …" if len(self.episodes) > 8 else "")
        word = "episode" if len(self.episodes) == 1 else "episodes"
        return f"run {self.plan.run.position + 1} ({self.plan.run.label}): {word} {episodes} failed: {self.error}"


class SweepRunsFailed(CdfslError):
    """Runs of a Ray sweep failed (`failures`) while the others finished; `stored` episodes were stored by this
    driver. Raised after every other run is done."""

    def __init__(self, stored: int, failures: list[RunFailure]) -> None:
        lines = "\n".join(f"  {failure.line()}" for failure in failures)
        super().__init__(
            f"{len(failures)} run(s) of the sweep failed ({stored} episodes stored; the other runs finished):\n{lines}"
            "\nthe same command retries their missing episodes"
        )
        self.stored, self.failures = stored, failures


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
    on_retry: Callable[[RunPlan, list[int], str], None] | None = None,
) -> int:
    """Run the missing episodes of every run of `sweep` on Ray workers that stay (module docstring); returns how many
    episodes this driver stored (an episode another process stored first is not counted). `address`: an existing
    cluster (None: a local Ray on this machine's devices). `on_stored(plan, episodes)` is called after each stored
    chunk; `on_wait(plan, holders)` when the driver starts waiting on episodes other processes hold (`store.Holder`);
    `on_retry(plan, episodes, error)` when a chunk failed and is retried in halves.

    The driver claims episodes as `Runner` does (so a `cdfsl run` or another driver on the same runs shares them),
    keeps its claims alive with a heartbeat while it lives, and hands them back when interrupted or failed; an
    interrupt reaches the caller as `runner.RunInterrupted` with the sweep's stored and total episodes. A cluster
    without the GPUs or CPUs one worker asks for is refused before anything is submitted. Runs whose episodes failed
    even one at a time are raised together as `SweepRunsFailed` once every other run is done.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'cdfsl[ray]'") from None
    from cdfsl.engine.store import ResultStore, new_owner_id

    started_here = not ray.is_initialized()
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, **(init_options or {}))
    try:
        resources = ray.cluster_resources()
        _check_resources(resources, gpus_per_task, cpus_per_task, address)
        plans = distinct_runs(plan_sweep(sweep, device="cuda" if gpus_per_task > 0 else "cpu"))
        lacking = [plan for plan in plans if plan.data_missing is not None]
        if lacking:
            plan = lacking[0]
            raise ConfigError(
                f"sweep file {sweep.path}, run {plan.run.position + 1} ({plan.run.label}): {plan.data_missing}; the "
                "Ray driver reads every dataset to identify its runs (`cdfsl sweep plan` lists the runs without data)"
            )
        worker = ray.remote(
            num_gpus=gpus_per_task, num_cpus=cpus_per_task, max_restarts=-1, max_task_retries=TASK_RETRIES
        )(SweepWorker)
        pool = _WorkerPool(worker, worker_slots(resources, gpus_per_task, cpus_per_task))
        owner = new_owner_id()
        callbacks = _Callbacks(on_stored, on_wait, on_retry)
        with ResultStore(sweep.db) as store:
            try:
                with store.keep_claims_alive(owner, lease_seconds):
                    stored, failures = _drive(ray, pool, store, plans, owner, lease_seconds, poll_seconds, callbacks)
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
        if failures:
            raise SweepRunsFailed(stored, failures)
        return stored
    finally:
        if started_here:
            ray.shutdown()


def _check_resources(resources: dict[str, float], gpus: float, cpus: float, address: str | None) -> None:
    """Refuse a worker shape the cluster can never place (Ray would queue it forever)."""
    where = "this machine's Ray" if address is None else f"the Ray cluster at {address}"
    for option, asked, name in (("--gpus-per-task", gpus, "GPU"), ("--cpus-per-task", cpus, "CPU")):
        have = float(resources.get(name, 0.0))
        if asked > have:
            hint = "pass --gpus-per-task 0 for CPU tasks, or" if name == "GPU" else "pass fewer, or"
            raise ConfigError(
                f"{option} {asked:g}: {where} has {have:g} {name}s in all, so no task could ever start; {hint} "
                f"--address of a cluster that has them"
            )


def worker_slots(resources: dict[str, float], gpus: float, cpus: float) -> int:
    """How many workers of `gpus` GPUs and `cpus` CPUs each the cluster holds at once (at least 1): one per GPU with
    `gpus=1`, two per GPU with 0.5; CPU workers when `gpus` is 0."""
    counts = [
        math.floor(float(resources.get(name, 0.0)) / asked + 1e-9)
        for name, asked in (("GPU", gpus), ("CPU", cpus))
        if asked > 0
    ]
    return max(1, min(counts)) if counts else 1


@dataclass(frozen=True)
class _Callbacks:
    stored: Callable[[RunPlan, int], None] | None
    wait: Callable[[RunPlan, tuple[Any, ...]], None] | None
    retry: Callable[[RunPlan, list[int], str], None] | None


@dataclass
class _RunState:
    """The driver's view of one run: chunks waiting for a worker, chunks in flight, failed episodes and the last
    error, and the position of its claims scan."""

    plan: RunPlan
    fields: dict[str, Any]
    queue: list[list[int]] = dataclasses.field(default_factory=list)
    in_flight: int = 0
    position: int = 0
    failed: list[int] = dataclasses.field(default_factory=list)
    error: str = ""
    waited_on: tuple[tuple[str, int, int, int], ...] = ()

    @property
    def run_id(self) -> str:
        return str(self.plan.run_id)


class _WorkerPool:
    """Up to `slots` long-lived workers (Ray actors), started as chunks need them; each remembers the run it last
    trained, so the next chunk of that run goes to the process that holds its context."""

    def __init__(self, worker: Any, slots: int) -> None:
        self._worker, self.slots = worker, slots
        self.idle: list[int] = []
        self.handles: list[Any] = []
        self.last_run: dict[int, str] = {}

    def take(self, states: list[_RunState]) -> tuple[int, _RunState] | None:
        """An idle (or new) worker and the run it should train next, or None: its own last run while that has queued
        chunks; else a run no worker has started; else the run with the most queued chunks, when at least
        `TAKE_OVER_CHUNKS` wait (taking over a run costs loading its backbone and images in a second process: worth it
        only for a long queue, such as one large run on many GPUs)."""
        waiting = [state for state in states if state.queue]
        if not waiting:
            return None
        for index in self.idle:
            own = next((state for state in waiting if state.run_id == self.last_run.get(index)), None)
            if own is not None:
                return self._use(index, own)
        other = self._other_run(waiting)
        if other is not None and self.idle:
            return self._use(self.idle[0], other)
        if other is not None and len(self.handles) < self.slots:
            self.handles.append(self._worker.remote())  # started only when it has a run to take
            self.idle.append(len(self.handles) - 1)
            return self.take(states)
        return None

    def _other_run(self, waiting: list[_RunState]) -> _RunState | None:
        """For a worker without queued chunks of its own: a run no worker has started, else a long queue."""
        started = set(self.last_run.values())
        fresh = next((state for state in waiting if state.run_id not in started), None)
        if fresh is not None:
            return fresh
        busiest = max(waiting, key=lambda state: len(state.queue))
        return busiest if len(busiest.queue) >= TAKE_OVER_CHUNKS else None

    def _use(self, index: int, state: _RunState) -> tuple[int, _RunState]:
        self.idle.remove(index)
        self.last_run[index] = state.run_id
        return index, state


def _drive(
    ray: Any,
    pool: _WorkerPool,
    store: Any,
    plans: list[RunPlan],
    owner: str,
    lease_seconds: float,
    poll_seconds: float,
    callbacks: _Callbacks,
) -> tuple[int, list[RunFailure]]:
    """Claim every free episode of every run, hand chunks to the workers, store results as they arrive, retry a
    failed chunk in halves (a failed single episode is the run's failure), and wait on episodes other processes hold,
    until every run is stored or failed; returns the episodes this driver stored and the failed runs."""
    import time

    from cdfsl.engine.context import chunks

    states = [_RunState(plan, plan.config.to_dict()) for plan in plans]
    submitted: dict[Any, tuple[int, _RunState, list[int]]] = {}
    open_runs = list(states)
    finished_failed: list[RunFailure] = []
    stored = 0
    while open_runs or submitted:
        for state in open_runs:
            if state.position < state.plan.total and not state.failed:
                claimed, state.position = store.claim_episodes(
                    state.run_id, state.plan.total, state.plan.total, owner, lease_seconds, state.position
                )
                state.queue.extend(chunks(claimed, state.plan.config.episode_batch))
        while (taken := pool.take(open_runs)) is not None:
            index, state = taken
            chunk = state.queue.pop(0)
            submitted[pool.handles[index].train.remote(state.fields, chunk)] = (index, state, chunk)
            state.in_flight += 1
        if submitted:
            done, _ = ray.wait(list(submitted), num_returns=1, timeout=poll_seconds)
            for ref in done:
                index, state, chunk = submitted.pop(ref)
                pool.idle.append(index)
                state.in_flight -= 1
                try:
                    results = ray.get(ref)
                except Exception as error:  # the worker's error, or its death after Ray's own retries
                    _failed(state, chunk, _error_text(error), callbacks)
                    continue
                added = store.add_episodes(
                    state.run_id, results, owner=owner, config=state.fields, identity=state.plan.identity
                )
                stored += added
                if callbacks.stored is not None:
                    callbacks.stored(state.plan, added)
        still_open, next_expiry = [], float("inf")
        for state in open_runs:
            if state.in_flight or state.queue:
                still_open.append(state)
                continue
            if state.failed:
                store.release_claims(state.run_id, owner)  # only the failed episodes' claims are left
                finished_failed.append(RunFailure(state.plan, tuple(sorted(state.failed)), state.error))
                continue
            pending = store.pending(state.run_id, state.plan.total)
            if pending.stored >= state.plan.total:
                continue
            still_open.append(state)
            if pending.stored + pending.claimed < state.plan.total:
                state.position = 0  # an episode came free behind the sweep: claim it next round
                continue
            holding = tuple((h.owner, h.count, h.first, h.last) for h in pending.holders)
            if holding != state.waited_on and callbacks.wait is not None:
                callbacks.wait(state.plan, pending.holders)
            state.waited_on = holding
            next_expiry = min(next_expiry, pending.next_expiry or next_expiry)
        open_runs = still_open
        if open_runs and not submitted and all(s.position >= s.plan.total and not s.queue for s in open_runs):
            time.sleep(min(poll_seconds, max(next_expiry - time.time(), 0.0) + 0.01))
    order = {plan.run_id: i for i, plan in enumerate(plans)}
    return stored, sorted(finished_failed, key=lambda failure: order[failure.plan.run_id])


def _failed(state: _RunState, chunk: list[int], error: str, callbacks: _Callbacks) -> None:
    """A chunk failed: retry it as two halves, first in the run's queue; a single episode is the run's failure."""
    state.error = error
    if len(chunk) == 1:
        state.failed.append(chunk[0])
        return
    half = len(chunk) // 2
    state.queue[:0] = [chunk[:half], chunk[half:]]
    if callbacks.retry is not None:
        callbacks.retry(state.plan, chunk, error)


def _error_text(error: BaseException) -> str:
    """`Type: first line of the message` of a worker's error (a Ray task error's cause when it has one)."""
    cause = getattr(error, "cause", None)
    error = cause if isinstance(cause, BaseException) else error
    message = str(error).strip().split("\n", 1)[0]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class SweepWorker:
    """A Ray sweep's long-lived worker (a Ray actor, one per GPU with `--gpus-per-task 1`): it keeps its `LoadCache`
    (backbones, image caches) for its whole life, and the context and built method of the run it last trained, so
    every chunk after a run's first one only trains."""

    def __init__(self) -> None:
        from cdfsl.engine.context import LoadCache

        self.loads = LoadCache()
        self.key: str | None = None
        self.run: tuple[Any, Any] | None = None

    def train(self, config_fields: dict[str, Any], episodes: list[int]) -> list[Any]:
        """Fit and predict `episodes` of the run `config_fields` describes; their results (not stored). A batch
        out of device memory is split here first (`runner.train_episodes`); any error frees the device's memory
        and reaches the driver, which retries the chunk in halves."""
        import json

        from cdfsl.engine import runner
        from cdfsl.engine.context import build_context
        from cdfsl.methods import build_method

        marker = os.environ.get(FAIL_ONCE_ENV)
        if marker and not os.path.exists(marker):
            Path(marker).write_text("killed once\n")
            os._exit(17)  # the worker dies in the middle of its task: Ray restarts it and retries the task
        key = json.dumps(config_fields, sort_keys=True, default=str)
        try:
            if self.key != key or self.run is None:
                self.key, self.run = None, None
                context = build_context(RunConfig.from_dict(config_fields, source="a sweep task"), self.loads)
                method = build_method(context.spec, context.backbone, context.autocast_dtype)
                context.load()
                self.key, self.run = key, (context, method)
            context, method = self.run
            return runner.train_episodes(context, method, episodes)
        except Exception:
            runner.free_device_memory(self.run[0].device if self.run is not None else _default_device())
            raise

    def pid(self) -> int:
        """This worker's process id."""
        return os.getpid()


def _default_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
