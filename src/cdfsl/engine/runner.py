"""The episode runner: samples episodes, runs them E at a time, stores each finished episode, resumes.

A run is identified by a hash of everything that determines its per-episode results (`RunConfig.identity`), so
re-running the same command finds its stored episodes and trains only the missing ones; the episode batch size, the
number of episodes and the result file are not part of it. A batch of episodes is stored in one transaction after it
finishes, so an interrupted run loses at most the batch in flight and never stores a partial one. The run's row is
written in the same transaction as its first stored episodes: a run that fails before any episode (a bad checkpoint,
an unknown backbone) leaves nothing in the store.

Concurrency: several processes may run the same command on the same store (on one machine, or on a filesystem
whose locking SQLite can trust) and share its episodes. Each `Runner` has a unique `owner` id (`host:pid:token`,
`store.new_owner_id`). It claims the next `episode_batch` episodes that are neither stored nor claimed by a live
lease, in ascending order, in one transaction (`ResultStore.claim_episodes`); trains them; stores the rows and deletes
its claims in one transaction; and repeats. A lease is short (`lease_seconds`, default 60 s) and a heartbeat thread
renews it every quarter lease while the process lives (`ResultStore.keep_claims_alive`), so a batch may train for
any length of time. The claims of a killed process (SIGKILL, out of memory) are taken over: at once when it ran on
this host (its pid is gone), within one lease otherwise. When nothing is left to claim, the runner polls the store
every `poll_seconds` (or sooner, when the next lease expires) until every episode is stored, telling `on_wait` which
episodes it waits on and until when, and then returns the full result. Should a lease lapse while its owner still
trains (a store locked for longer than a lease), another process may train the same episodes as well; the rows are
the same (episodes are deterministic by index and the method starts afresh per batch) and the first stored row is
kept, so only the work is doubled. An interrupted or failed runner hands back its claims (`try/finally`) and stores
nothing of the batch in flight; an interrupt reaches the caller as `RunInterrupted`, with what is stored.
`trained_episodes` counts the episodes this process trained; progress counts every stored episode, whoever trained it.
A batch that runs out of device memory is split in halves and retried, down to one episode (`OutOfMemoryWarning`).

An all-way run (`--protocol all-way`, `cdfsl.data.allway`) is a run of one big episode: every class, K supports each,
the whole test split as queries. It goes through the same claims and store; only its queries are predicted in
streamed batches (`train_streamed`, `RunContext.query_batches`), and its one stored row carries the per-class accuracy
as the record `class_accuracy`. A seed is one run, so a finished seed is never retrained and a killed one stores
nothing.

While a batch trains, the batch of the episodes after it (what the next claim returns unless another process took
them) is decoded, augmented and copied in a background thread (`engine.prefetch.BatchFeed`); each stored episode
records the model of the device that trained it (`engine.reproducibility.device_model`).
"""

from __future__ import annotations

import gc
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.factory import resolve_activation, weights_identity
from cdfsl.backbone.tokenizers import tokenizer_identity
from cdfsl.config import RunConfig, run_id_of
from cdfsl.data.episodes import EpisodeBatch, group_by_shape
from cdfsl.data.images import ImageCache, image_rule
from cdfsl.data.index import Episode, ImageIndex
from cdfsl.data.protocols import ALL_WAY, FIXED_WAY, get_protocol
from cdfsl.engine.context import LoadCache, RunContext, build_context, resolve_precision
from cdfsl.engine.prefetch import BatchFeed
from cdfsl.engine.reproducibility import deterministic_mode, device_model
from cdfsl.engine.store import EpisodeQueries, EpisodeResult, Holder, ResultStore, new_owner_id, record_names
from cdfsl.errors import OutOfMemoryWarning, StoreError
from cdfsl.methods import Method, build_method
from cdfsl.spec import RunSpec
from cdfsl.stats import mean_ci95


def run_identity(context: RunContext, device: str | None = None) -> tuple[str, dict[str, Any]]:
    """(run id, identity) of a run context built with its dataset: what its id hashes (`RunConfig.identity`).

    `device` (`cpu`, `cuda`, …): the identity of the run on that device instead of the context's, which need not
    exist here (a sweep planned, or driven, from a machine without the workers' GPUs). A run under an episode protocol
    other than `fixed-way` has the protocol's name in its identity; fixed-way runs keep the identity they had."""
    identity = context.spec.identity(*_identity_arguments(context, device))
    if context.protocol != FIXED_WAY:
        identity["protocol"] = context.protocol
        for unread in get_protocol(context.protocol).unread:  # all-way: ways and queries
            identity.pop(unread, None)
    return run_id_of(identity), identity


def legacy_run_id(context: RunContext, device: str | None = None) -> str:
    """The id the run had under the identity of earlier versions (`RunConfig.legacy_identity`)."""
    return run_id_of(context.spec.legacy_identity(*_identity_arguments(context, device)))


def adopt_legacy_run(store: ResultStore, context: RunContext, run_id: str, identity: dict[str, Any]) -> int:
    """Serve a run stored under its legacy id: when `run_id` has no row, move the legacy run's rows to it
    (`ResultStore.adopt_run`). Returns the number of episodes adopted. Only fixed-way runs have legacy ids: the
    earlier identity did not name a protocol, so another protocol's run must never take a fixed-way run's rows."""
    if context.protocol != FIXED_WAY:
        return 0
    old_id = legacy_run_id(context)
    return 0 if old_id == run_id else store.adopt_run(old_id, run_id, identity)


def stored_run_id(store: ResultStore, context: RunContext, run_id: str, device: str | None = None) -> str:
    """The id under which `store` holds the run: `run_id`, or its legacy id when only that one has stored episodes
    (a store written before identities held only the fields a method reads, not yet adopted by a run: a read-only
    look such as `sweep plan` must still count its episodes)."""
    if context.protocol != FIXED_WAY or store.run_identity(run_id):
        return run_id
    old_id = legacy_run_id(context, device)
    return old_id if store.run_identity(old_id) else run_id


def _identity_arguments(context: RunContext, device: str | None) -> tuple[Any, ...]:
    """The values besides the config that both identities hash: precision, index fingerprint, activation, device
    type, image rule, weights and tokenizer digests."""
    config = context.config
    precision, target = context.precision, context.device
    if device is not None:
        target = torch.device(device)
        precision, _ = resolve_precision(config.train.precision, target)
    activation = resolve_activation(config.backbone, config.pretrained, config.activation)
    return (
        precision,
        context.fingerprint(),
        activation,
        target.type,
        image_rule(config.dataset, config.pre_resize or 0),
        weights_identity(config.pretrained),
        tokenizer_identity(config.tokenizer),
    )


def train_episodes(
    context: RunContext,
    method: Method,
    episodes: list[int],
    feed: BatchFeed[EpisodeBatch] | None = None,
    upcoming: Sequence[int] = (),
) -> list[EpisodeResult]:
    """Fit and predict episodes `episodes` of the context's run, one batch per episode shape (a single batch under
    `fixed-way`); their results (not stored), in the order of `episodes`.

    With a `feed` (`engine.prefetch.BatchFeed` over `context.batch`), each batch is taken from it and the next one
    (the next shape's, after the last one the first shape's of `upcoming`: the episodes the caller expects to train
    next) is built in the background while this one trains; the results are the same."""
    sampler = context.data()[1]
    groups = [[episode.index for episode in chunk] for chunk in group_by_shape(sampler.episodes(episodes))]
    if upcoming:
        groups.append([episode.index for episode in group_by_shape(sampler.episodes(upcoming))[0]])
    by_episode: dict[int, EpisodeResult] = {}
    for position, group in enumerate(groups[: len(groups) - bool(upcoming)]):
        following = groups[position + 1] if position + 1 < len(groups) else None
        if context.streamed:
            results = train_streamed(context, method, group)
        else:
            results = _train_splitting(context, method, group, feed, following)
        for result in results:
            by_episode[result.episode] = result
    return [by_episode[i] for i in episodes]


def _train_splitting(
    context: RunContext,
    method: Method,
    episodes: list[int],
    feed: BatchFeed[EpisodeBatch] | None = None,
    following: list[int] | None = None,
) -> list[EpisodeResult]:
    """`_train_batch`, with a batch that runs out of device memory split in two halves, each trained the same way
    (down to one episode, whose out-of-memory error is raised). Episodes are independent and a fit starts afresh per
    batch, so the results are those of the whole batch; an `OutOfMemoryWarning` says what was split. The halves are
    built on the spot (the feed had prepared the whole batch)."""
    try:
        return _train_batch(context, method, episodes, feed, following)
    except torch.OutOfMemoryError as error:
        if len(episodes) == 1:
            raise
        reason = str(error).split("\n", 1)[0] or "out of memory"
    # Retried outside the handler: the error's traceback, and the activations its frames hold, are gone by now.
    free_device_memory(context.device)
    half = len(episodes) // 2
    warnings.warn(
        f"a batch of {len(episodes)} episodes (from episode {episodes[0]}) ran out of memory on {context.device} "
        f"({reason}); retrying it as {half} + {len(episodes) - half} episodes (a smaller --episode-batch avoids this)",
        OutOfMemoryWarning,
        stacklevel=2,
    )
    return _train_splitting(context, method, episodes[:half]) + _train_splitting(context, method, episodes[half:])


def free_device_memory(device: torch.device) -> None:
    """Return the memory of dead tensors to the device: collect reference cycles, then (CUDA) empty the allocator's
    cache, so a retry or a measurement starts from what live tensors hold."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_streamed(context: RunContext, method: Method, episodes: list[int]) -> list[EpisodeResult]:
    """Fit episodes of one shape as one batch, then predict their queries `context.eval_batch` at a time (the
    protocol's `streamed`: all-way's whole test split), never holding more than one batch of query images;
    `context.on_queries` hears of each batch.

    The class features are computed once per fit (`Method.fitted_class_features`), so each batch costs its vision pass
    only. The predictions are those of `Method.predict` on all the queries at once. Each episode's records gain
    `class_accuracy`: per class name, the share of its queries predicted right (classes without a query left out)."""
    batch_start = time.perf_counter()
    support = context.support_batch(episodes, with_views=context.spec.trains)
    with deterministic_mode(context.config.deterministic):
        method.fit(support)
    total = sum(len(items) for items in support.episodes[0].query)
    predicted: list[list[int]] = [[] for _ in episodes]
    truth: list[list[int]] = [[] for _ in episodes]
    done = 0
    for part in context.query_batches(support):
        with deterministic_mode(context.config.deterministic):
            guesses = method.predict(part).argmax(dim=-1).tolist()  # [E][b]
        for e, (guess, label) in enumerate(zip(guesses, part.query_labels.tolist(), strict=True)):
            predicted[e] += guess
            truth[e] += label
        done += part.query_labels.shape[1]
        if context.on_queries is not None:
            context.on_queries(done, total)
    seconds = (time.perf_counter() - batch_start) / len(episodes)
    records = method.episode_records() or [{} for _ in episodes]
    results = []
    for e, (i, record) in enumerate(zip(episodes, records, strict=True)):
        names = tuple(support.class_names[e])
        queries = EpisodeQueries(names, tuple(truth[e]), tuple(predicted[e]))
        kept = {name: value for name, value in record.items() if name != "curves"}
        kept["class_accuracy"] = class_accuracy(names, truth[e], predicted[e])
        results.append(EpisodeResult(i, queries.correct, len(truth[e]), seconds, queries, record.get("curves"), kept))
    return results


def class_accuracy(class_names: tuple[str, ...], truth: list[int], predicted: list[int]) -> dict[str, float]:
    """Per class name (episode label order), the share of its queries predicted right; classes without a query are
    left out."""
    right = [0] * len(class_names)
    seen = [0] * len(class_names)
    for label, guess in zip(truth, predicted, strict=True):
        seen[label] += 1
        right[label] += int(label == guess)
    return {name: right[c] / seen[c] for c, name in enumerate(class_names) if seen[c]}


def _train_batch(
    context: RunContext,
    method: Method,
    episodes: list[int],
    feed: BatchFeed[EpisodeBatch] | None = None,
    following: list[int] | None = None,
) -> list[EpisodeResult]:
    """Fit and predict episodes of one shape as one batch (taken from `feed`, which then starts on `following`)."""
    batch_start = time.perf_counter()
    trains = context.spec.trains
    if feed is None:
        batch = context.batch(episodes, with_views=trains)
    else:
        batch = feed.take(episodes, trains)
        if following is not None:
            feed.prepare(following, trains)
    with deterministic_mode(context.config.deterministic):
        method.fit(batch)
        predicted = method.predict(batch).argmax(dim=-1).tolist()  # [E][Q]
    truth = batch.query_labels.tolist()
    seconds = (time.perf_counter() - batch_start) / len(episodes)
    records = method.episode_records() or [{} for _ in episodes]
    results = []
    for e, (i, record) in enumerate(zip(episodes, records, strict=True)):
        queries = EpisodeQueries(tuple(batch.class_names[e]), tuple(truth[e]), tuple(predicted[e]))
        curves = record.get("curves")
        records = {name: value for name, value in record.items() if name != "curves"}
        results.append(EpisodeResult(i, queries.correct, len(truth[e]), seconds, queries, curves, records))
    return results


@dataclass(frozen=True)
class Progress:
    """A progress report after each batch of episodes.

    Attributes: `done` of `total` episodes finished (including `resumed` ones found in the store), the running mean
    accuracy and 95% half-width in percent over finished episodes, and seconds spent in this process so far.
    """

    done: int
    total: int
    resumed: int
    mean: float
    ci95: float
    seconds: float


@dataclass
class RunResult:
    """The outcome of a run: accuracies in percent, per episode sorted by episode index."""

    run_id: str
    config: RunConfig
    mean_acc: float
    ci95: float
    per_episode: list[tuple[int, float]]
    trained_episodes: int
    excluded_classes: tuple[str, ...] = ()
    seconds: float = 0.0
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    classes: int | None = None
    test_images: int | None = None
    shapes: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Per episode its shape as drawn (`episode_shape`): `ways`, `shots` and `queries` per class, class names."""

    def to_json(self) -> dict[str, Any]:
        """The `--json` summary: run, episode shape, mean and 95% half-width, per-episode accuracy and records, and
        the resolved config.

        `records` (episode index → name → value) is what the method recorded per episode beyond accuracy (VtT's
        `dlc_off_step`, MaPLe's epoch losses). When any episode of the run has a record, every `per_episode` entry
        gets `records` with every name the run recorded (null where that episode has none).

        `protocol` is the config's (`episodic` or `all-way`); an all-way run also gives `classes`, `test_images` (the
        test split's size, all evaluated) and `accuracy` (its one episode's, in percent), and no `ways` or
        `queries` (it reads neither)."""
        cfg = self.config
        names = record_names(self.records.values())
        summary = {
            "run_id": self.run_id,
            "dataset": cfg.dataset,
            "method": cfg.method,
            "backbone": cfg.backbone,
            "ways": cfg.ways,
            "shots": cfg.shots,
            "queries": cfg.queries,
            "episodes": len(self.per_episode),
            "seed": cfg.seed,
            "mean_acc": round(self.mean_acc, 4),
            "ci95": round(self.ci95, 4),
            "recipe": cfg.recipe,
            "per_episode": [self._episode_json(i, a, names) for i, a in self.per_episode],
            "config": cfg.to_dict(),
        }
        all_way = self._all_way_json(summary)
        return {"protocol": cfg.protocol, **summary, **all_way}

    def _all_way_json(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The all-way keys (and the episodic keys an all-way run drops from `summary`)."""
        if self.config.protocol != ALL_WAY:
            return {}
        for unread in ("ways", "queries"):
            summary.pop(unread)
        return {"classes": self.classes, "test_images": self.test_images, "accuracy": round(self.mean_acc, 4)}

    def _episode_json(self, episode: int, accuracy: float, names: list[str]) -> dict[str, Any]:
        entry: dict[str, Any] = {"episode": episode, "acc": round(accuracy, 4), **self.shapes.get(episode, {})}
        if names:
            records = self.records.get(episode, {})
            entry["records"] = {name: records.get(name) for name in names}
        return entry


class _Tally:
    """Running count, mean and spread of a run's stored episodes below `total` (whoever stored them), updated from
    the rows added since the last look, so each update costs time in the new rows only (Chan et al.'s merge)."""

    def __init__(self, store: ResultStore, run_id: str, total: int) -> None:
        self._store, self._run_id, self._total = store, run_id, total
        self._marker = 0
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0
        self.refresh()

    def refresh(self) -> bool:
        """Add the rows stored since the last refresh; True when there were any."""
        accuracies, self._marker = self._store.accuracies_since(self._run_id, self._total, self._marker)
        if not accuracies:
            return False
        values = torch.tensor(accuracies, dtype=torch.float64) * 100.0
        n, mean = values.numel(), float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        count = self.count + n
        delta = mean - self._mean
        self._mean += delta * n / count
        self._m2 += m2 + delta * delta * self.count * n / count
        self.count = count
        return True

    def mean_ci95(self) -> tuple[float, float]:
        """As `mean_ci95` over the stored accuracies, in percent."""
        if self.count == 0:
            return float("nan"), float("nan")
        return self._mean, 1.96 * math.sqrt(max(self._m2, 0.0) / self.count) / math.sqrt(self.count)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT) after its store was opened: `stored` of its `total` episodes are in `db`,
    whoever trained them. Its claims were handed back; the same command resumes it."""

    def __init__(self, stored: int, total: int, db: Path) -> None:
        super().__init__(f"interrupted: {stored} of {total} episodes stored in {db}")
        self.stored, self.total, self.db = stored, total, db


class Runner:
    """Runs configs, keeping loaded backbones and image caches for later runs in the same process.

    Args:
        progress: called after every finished batch of episodes (this process's or, while it waits, others').
        on_stored: called with (run name or id, results) after each batch this process trained is stored (e.g.
            `engine.tensorboard.TensorBoardSink`).
        lease_seconds: how long a claim holds without renewal before other processes may take it over; a heartbeat
            renews this runner's claims every quarter lease while it lives, so it need not exceed a batch's time.
        poll_seconds: how often to look at the store while other processes finish the last episodes.
        on_wait: called with the other owners' live claims (`store.Holder`: episodes, owner, lease end) each time
            the runner starts waiting on a different set of them.
        eval_batch: query images predicted at once in a streamed run (all-way: the test split, `train_streamed`).
        on_queries: called with (query images predicted, in all) after each streamed batch of queries.

    `owner` is this runner's unique id in the store's claims and in `episodes.trained_by`; `loads` keeps the loaded
    backbones and image caches (`engine.context.LoadCache`), which each run's context (`build_context`) draws on.
    """

    def __init__(
        self,
        progress: Callable[[Progress], None] | None = None,
        lease_seconds: float = 60.0,
        poll_seconds: float = 5.0,
        on_stored: Callable[[str, list[EpisodeResult]], None] | None = None,
        on_wait: Callable[[tuple[Holder, ...]], None] | None = None,
        eval_batch: int = 256,
        on_queries: Callable[[int, int], None] | None = None,
    ) -> None:
        if lease_seconds <= 0 or poll_seconds <= 0:
            raise ValueError(f"lease_seconds and poll_seconds must be positive, not {lease_seconds}, {poll_seconds}")
        self.progress = progress
        self.on_stored = on_stored
        self.on_wait = on_wait
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.owner = new_owner_id()
        self.loads = LoadCache()
        self.eval_batch = eval_batch
        self.on_queries = on_queries

    def backbone(self, config: RunConfig, device: torch.device) -> ClipAdapter:
        """`config`'s frozen backbone on `device`, loaded once per weights (see `LoadCache`)."""
        return self.loads.backbone(config, device)

    def image_cache(self, index: ImageIndex, size: int, cache_dir: str | None, pre_resize: int = 0) -> ImageCache:
        """The images of `index` at `size`² pixels, loaded once per (index, size, cache folder, pre-resize)."""
        return self.loads.image_cache(index, size, cache_dir, pre_resize)

    def run(self, config: RunConfig | RunSpec) -> RunResult:
        """Run (or resume) `config`; return its results over episodes `0 … episodes−1`.

        The config is validated and resolved first, once (its recipe fills every unset field; a `RunSpec` is taken
        as it is); the result carries the resolved config.
        Other processes may work on the same run in the same store at the same time: episodes are shared through
        claims (see the module docstring), and this call returns once every episode is stored, whoever trained it.
        """
        context = build_context(config, self.loads, eval_batch=self.eval_batch)
        context.on_queries = self.on_queries
        config = context.config
        _, sampler = context.data()
        total = context.episode_count
        run_id, identity = run_identity(context)
        with ResultStore(Path(config.db)) as store:
            adopt_legacy_run(store, context, run_id, identity)
            started = time.perf_counter()
            tally = _Tally(store, run_id, total)
            resumed = tally.count
            trained = 0
            if resumed < total:
                feed = BatchFeed(context.batch)

                def train(chunk: list[int]) -> list[EpisodeResult]:
                    # Guess the next claim (the episodes after this chunk; right unless others hold or stored some)
                    # so its images are prepared while this chunk trains; a wrong guess only costs that work.
                    upcoming = range(chunk[-1] + 1, min(chunk[-1] + 1 + config.episode_batch, total))
                    return train_episodes(context, method, chunk, feed, upcoming)

                def report() -> None:
                    if self.progress is not None:
                        mean, ci = tally.mean_ci95()
                        self.progress(Progress(tally.count, total, resumed, mean, ci, time.perf_counter() - started))

                try:
                    method = build_method(context.spec, context.backbone, context.autocast_dtype)
                    context.load()  # the image cache, before the first claim
                    with store.keep_claims_alive(self.owner, self.lease_seconds):
                        trained = self._share(
                            store, run_id, total, config, identity, tally, train, report, device_model(context.device)
                        )
                    feed.close()
                except BaseException as error:
                    feed.close()
                    # Interrupted or failed: hand back the claims of the batch in flight (nothing of it is stored).
                    with suppress(StoreError):
                        store.release_claims(run_id, self.owner)
                    if isinstance(error, KeyboardInterrupt) and not isinstance(error, RunInterrupted):
                        count = tally.count
                        with suppress(StoreError):
                            count = store.pending(run_id, total).stored
                        raise RunInterrupted(count, total, store.path) from None
                    raise
            store.register_run(run_id, config.to_dict(), identity)  # only updates a given run name by now
            stored = store.episode_accuracies(run_id, below=total)
            records = store.episode_records(run_id, below=total)
            if len(stored) < total:
                raise StoreError(
                    f"result store {store.path} lost episodes of run {run_id} while it ran ({len(stored)} of {total} "
                    "left); were rows deleted? run the command again to train them"
                )
        per_episode = [(i, stored[i] * 100.0) for i in range(total)]
        mean, ci = mean_ci95([a / 100.0 for _, a in per_episode])
        return RunResult(
            run_id=run_id,
            config=config,
            mean_acc=mean,
            ci95=ci,
            per_episode=per_episode,
            trained_episodes=trained,
            excluded_classes=sampler.excluded_classes,
            seconds=time.perf_counter() - started,
            records={i: records.get(i, {}) for i in range(total)},
            shapes={
                episode.index: episode_shape(episode, context.data()[0]) for episode in sampler.episodes(range(total))
            },
            **_episode_sizes(context),
        )

    def _share(
        self,
        store: ResultStore,
        run_id: str,
        total: int,
        config: RunConfig,
        identity: dict[str, Any],
        tally: _Tally,
        train: Callable[[list[int]], list[EpisodeResult]],
        report: Callable[[], None],
        device: str | None = None,
    ) -> int:
        """Claim, train and store batches until every episode below `total` is stored; return how many this
        process trained. `device`: the device model stored with each episode (`ResultStore.add_episodes`).

        One ascending sweep claims every free episode; then, while other owners hold live claims, poll: when an
        episode is neither stored nor held by a live claim (its owner was killed or interrupted), sweep again.
        """
        trained = 0
        position = 0
        waited_on: tuple[tuple[str, int, int, int], ...] = ()
        while True:
            chunk, position = store.claim_episodes(
                run_id, total, config.episode_batch, self.owner, self.lease_seconds, position
            )
            if chunk:
                results = train(chunk)
                store.add_episodes(
                    run_id, results, owner=self.owner, config=config.to_dict(), identity=identity, device=device
                )
                if self.on_stored is not None:
                    self.on_stored(config.run_name or run_id, results)
                trained += len(chunk)
                tally.refresh()
                report()
                continue
            pending = store.pending(run_id, total)
            if pending.stored >= total:
                if tally.refresh():
                    report()
                return trained
            if pending.stored + pending.claimed < total:
                position = 0  # an episode came free behind the sweep
                continue
            if tally.refresh():
                report()
            holding = tuple((h.owner, h.count, h.first, h.last) for h in pending.holders)
            if holding != waited_on and self.on_wait is not None:
                self.on_wait(pending.holders)
            waited_on = holding
            until_expiry = (pending.next_expiry or 0.0) - time.time()
            time.sleep(min(self.poll_seconds, max(until_expiry, 0.0) + 0.01))


def episode_total(config: RunConfig) -> int:
    """The number of episodes of `config`'s run: its protocol's fixed count (all-way: 1), else the config's."""
    fixed = get_protocol(config.episode_protocol).episodes
    return fixed if fixed is not None else config.resolved_episodes()


def episode_shape(episode: Episode, index: ImageIndex) -> dict[str, Any]:
    """What `--json` says of an episode's shape: its `ways`, `shots` and `queries` per class (episode-label order)
    and its `classes` (prompt names)."""
    return {
        "ways": episode.ways,
        "shots": [len(items) for items in episode.support],
        "queries": [len(items) for items in episode.query],
        "classes": [index.class_names[label] for label in episode.classes],
    }


def _episode_sizes(context: RunContext) -> dict[str, int]:
    """An all-way run's number of classes and of test images (its one episode's ways and queries); nothing for
    an episodic run."""
    if context.config.protocol != ALL_WAY:
        return {}
    episode = context.data()[1].episode(0)
    return {"classes": episode.ways, "test_images": sum(len(items) for items in episode.query)}


class StderrProgress:
    """A one-line progress display on standard error (`cdfsl.run`'s default when it is a terminal): episodes done,
    running mean accuracy ± 95% half-width and seconds, rewritten in place and ended with a newline when done."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, report: Progress) -> None:
        done = f"{report.done}/{report.total} episodes"
        line = f"\r{done}  {report.mean:.2f} ± {report.ci95:.2f}%  {report.seconds:.0f} s"
        self.stream.write(line + ("\n" if report.done >= report.total else ""))
        self.stream.flush()


def run(config: RunConfig | RunSpec, progress: Callable[[Progress], None] | bool | None = None) -> RunResult:
    """Run one config (the Python API: `cdfsl.run(cdfsl.RunConfig(...))`, or its spec: `cdfsl.run(config.resolve())`,
    validated already); results go to the store `config.db`.

    `progress`: a callable given a `Progress` after every batch of episodes; `True`: a one-line display on standard
    error (`StderrProgress`); `False`: nothing; `None` (default): the display when standard error is a terminal,
    nothing otherwise (a log file, a notebook, a pipe).
    """
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()
    if isinstance(progress, bool):
        progress = StderrProgress() if progress else None
    return Runner(progress).run(config)
