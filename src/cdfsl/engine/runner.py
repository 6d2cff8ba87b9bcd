"""The episode runner: samples episodes, runs them E at a time, stores each finished episode, resumes.

A run is identified by a hash of everything that determines its per-episode results (`RunConfig.identity`), so
re-running the same command finds its stored episodes and trains only the missing ones; the episode batch size, the
number of episodes and the result file are not part of it. A batch of episodes is stored in one transaction after it
finishes, so an interrupted run loses at most the batch in flight and never stores a partial one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdfsl.analysis.stats import mean_ci95
from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.factory import load_backbone, resolve_activation
from cdfsl.config import RunConfig, run_id_of
from cdfsl.data.episodes import build_batch
from cdfsl.data.images import PREPROCESSING, ImageCache
from cdfsl.data.index import ImageIndex
from cdfsl.data.readers import load_index
from cdfsl.data.sampler import EpisodeSampler
from cdfsl.engine.store import EpisodeResult, ResultStore
from cdfsl.errors import ConfigError, DatasetWarning
from cdfsl.methods import build_method


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
    dlc_off_steps: dict[int, int | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The `--json` summary: run, episode shape, mean and 95% half-width, per-episode accuracy (and, for VtT,
        the step at which DGSO switched `L_VtT` off, null if never), and the resolved config."""
        cfg = self.config
        return {
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
            "per_episode": [self._episode_json(i, a) for i, a in self.per_episode],
            "config": cfg.to_dict(),
        }

    def _episode_json(self, episode: int, accuracy: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"episode": episode, "acc": round(accuracy, 4)}
        if self.config.uses_vtt:
            entry["dlc_off_step"] = self.dlc_off_steps.get(episode)
        return entry


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; `cuda` without a GPU is a `ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(label, autocast dtype): `auto` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return precision, (torch.bfloat16 if precision == "bf16" else None)


def chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class Runner:
    """Runs configs, keeping loaded backbones and image caches for later runs in the same process.

    Args:
        progress: called after every finished batch of episodes.
    """

    def __init__(self, progress: Callable[[Progress], None] | None = None) -> None:
        self.progress = progress
        self._backbones: dict[tuple[str, str, str, str], ClipAdapter] = {}
        self._caches: dict[tuple[str, int, str | None], ImageCache] = {}

    def backbone(self, config: RunConfig, device: torch.device) -> ClipAdapter:
        key = (config.backbone, config.pretrained, config.activation, str(device))
        if key not in self._backbones:
            self._backbones[key] = load_backbone(config.backbone, config.pretrained, device, config.activation)
        return self._backbones[key]

    def image_cache(self, index: ImageIndex, size: int, cache_dir: str | None) -> ImageCache:
        key = (index.fingerprint(), size, cache_dir)
        if key not in self._caches:
            self._caches[key] = ImageCache(index, size, cache_dir)
        return self._caches[key]

    def run(self, config: RunConfig) -> RunResult:
        """Run (or resume) `config`; return its results over episodes `0 … episodes−1`.

        The config is resolved first (its recipe fills every unset field); the result carries the resolved config.
        """
        config = config.validate().resolved()
        device = resolve_device(config.device)
        precision, autocast_dtype = resolve_precision(config.train.precision, device)
        index = load_index(config.dataset, config.data_root)
        sampler = EpisodeSampler(index, config.ways, config.shots, config.queries, config.seed)
        if sampler.excluded_classes:
            warnings.warn(
                f"{config.dataset}: classes with fewer than shots + queries = {config.shots + config.queries} images "
                f"cannot appear in episodes: {', '.join(sampler.excluded_classes)}",
                DatasetWarning,
                stacklevel=2,
            )
        total = config.resolved_episodes()
        activation = resolve_activation(config.backbone, config.pretrained, config.activation)
        identity = config.identity(precision, index.fingerprint(), activation, device.type, PREPROCESSING)
        run_id = run_id_of(identity)
        with ResultStore(Path(config.db)) as store:
            store.register_run(run_id, config.to_dict(), identity)
            finished = store.finished_episodes(run_id)
            todo = [i for i in range(total) if i not in finished]
            resumed = total - len(todo)
            started = time.perf_counter()
            if todo:
                backbone = self.backbone(config, device)
                method = build_method(config, backbone, autocast_dtype)
                cache = self.image_cache(index, backbone.image_size, config.cache_dir)
                accuracies = [a for i, a in store.episode_accuracies(run_id).items() if i < total]
                for chunk in chunks(todo, config.episode_batch):
                    batch_start = time.perf_counter()
                    batch = build_batch(
                        sampler.episodes(chunk),
                        index,
                        cache,
                        config.augment,
                        backbone.normalize,
                        config.seed,
                        device,
                        with_views=config.trains,
                    )
                    method.fit(batch)
                    logits = method.predict(batch)
                    correct = (logits.argmax(dim=-1) == batch.query_labels).sum(dim=1).tolist()
                    seconds = (time.perf_counter() - batch_start) / len(chunk)
                    total_queries = batch.query_labels.shape[1]
                    records = method.episode_records() or [{} for _ in chunk]
                    results = [
                        EpisodeResult(i, c, total_queries, seconds, record.get("dlc_off_step"))
                        for i, c, record in zip(chunk, correct, records, strict=True)
                    ]
                    store.add_episodes(run_id, results)
                    accuracies += [r.accuracy for r in results]
                    if self.progress is not None:
                        mean, ci = mean_ci95(accuracies)
                        done = len(accuracies)
                        elapsed = time.perf_counter() - started
                        self.progress(Progress(done, total, resumed, mean, ci, elapsed))
            stored = store.episode_accuracies(run_id)
            dlc_off_steps = store.episode_dlc_off_steps(run_id) if config.uses_vtt else {}
        per_episode = [(i, stored[i] * 100.0) for i in range(total)]
        mean, ci = mean_ci95([a / 100.0 for _, a in per_episode])
        return RunResult(
            run_id=run_id,
            config=config,
            mean_acc=mean,
            ci95=ci,
            per_episode=per_episode,
            trained_episodes=len(todo),
            excluded_classes=sampler.excluded_classes,
            seconds=time.perf_counter() - started,
            dlc_off_steps={i: dlc_off_steps.get(i) for i in range(total)} if config.uses_vtt else {},
        )


def run(config: RunConfig, progress: Callable[[Progress], None] | None = None) -> RunResult:
    """Run one config (the Python API: `cdfsl.run(cdfsl.RunConfig(...))`)."""
    return Runner(progress).run(config)
