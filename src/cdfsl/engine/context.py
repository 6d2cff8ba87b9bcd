"""The run context: what a `RunConfig` builds before anything trains, built in one place (`build_context`).

From a config (or a `RunSpec`) it builds, in this order: the run spec (the config validated, a bad one being a
`ConfigError` before anything is loaded, and resolved, every recipe value filled in: once, `cdfsl.spec.RunSpec.of`);
the compute device; the precision label and the methods' autocast dtype; the dataset's image index and episode sampler
(warning about classes too small for an episode); and, on first use, the frozen backbone and the image cache.
Backbones and image caches are kept across contexts in a `LoadCache`. The sampler comes from the dataset's episode
protocol (`cdfsl.data.protocols`); `batches` splits each chunk of episodes by shape, so a protocol whose episodes differ
in ways, shots or queries gives every method uniform batches. Under a protocol whose queries are streamed (`all-way`:
the whole test split), `support_batch` holds the support views alone and `query_batches` decodes the queries
`eval_batch` images at a time, so memory is bounded whatever the test split's size.

Who builds one: the episode runner (`engine.runner.Runner.run`, whose `Runner` keeps one `LoadCache` for all its runs),
the diagnostic probes (`analysis.probe_setup.prepare`), the training-cost count (`analysis.cost.training_cost`) and
`--episode-batch auto`'s trial fits (`engine.autobatch`; the last two without a dataset, `load_data=False`). So a probe
or a trial sees the same device, precision, episodes and images as `cdfsl run` does for the same config.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.factory import load_backbone, resolve_pretrained, weights_identity
from cdfsl.backbone.tokenizers import tokenizer_identity
from cdfsl.config import RunConfig
from cdfsl.data.benchmarks import load_index
from cdfsl.data.episodes import EpisodeBatch, build_batch, group_by_shape
from cdfsl.data.images import ImageCache
from cdfsl.data.index import Episode, ImageIndex
from cdfsl.data.protocols import (
    ALL_WAY,
    FIXED_WAY,
    EpisodeSettings,
    Sampler,
    build_sampler,
    get_protocol,
    index_fingerprint,
    run_index,
)
from cdfsl.engine.prefetch import BatchFeed, fed
from cdfsl.errors import ConfigError, DatasetWarning
from cdfsl.spec import RunSpec


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; `cuda`, `cuda:N` and `mps` must exist here, else a `ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
        device = torch.device(name)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 … cuda:{count - 1}")
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but Apple's Metal backend is not available; use --device cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(label, autocast dtype): `auto` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return precision, (torch.bfloat16 if precision == "bf16" else None)


def chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    """`items` in consecutive lists of `size` (the last one shorter)."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class LoadCache:
    """Backbones and image caches loaded for earlier contexts, kept for later ones in the same process.

    A backbone is keyed by (name, pretrained, the weights' identity, activation, the tokenizer folder's identity,
    device), so a checkpoint or tokenizer rebuilt at the same path is loaded afresh; an image cache by (index
    fingerprint, image size, cache folder, pre-resize).
    """

    def __init__(self) -> None:
        self._backbones: dict[tuple[str, str, str, str, str | None, str], ClipAdapter] = {}
        self._caches: dict[tuple[str, int, str | None, int], ImageCache] = {}

    def backbone(self, config: RunConfig, device: torch.device) -> ClipAdapter:
        """The frozen backbone of `config` (name, pretrained weights, activation) on `device`."""
        weights, tokenizer = weights_identity(config.pretrained), tokenizer_identity(config.tokenizer)
        key = (config.backbone, config.pretrained, weights, config.activation, tokenizer, str(device))
        if key not in self._backbones:
            self._backbones[key] = load_backbone(
                config.backbone, config.pretrained, device, config.activation, config.tokenizer
            )
        return self._backbones[key]

    def image_cache(self, index: ImageIndex, size: int, cache_dir: str | None, pre_resize: int = 0) -> ImageCache:
        """The images of `index` decoded at `size`² pixels (after a `pre_resize`² pre-resize when > 0), on disk under
        `cache_dir` too when given."""
        key = (index.fingerprint(), size, cache_dir, pre_resize)
        if key not in self._caches:
            self._caches[key] = ImageCache(index, size, cache_dir, pre_resize=pre_resize)
        return self._caches[key]


@dataclass
class RunContext:
    """What a run of `config` builds before it trains (see the module docstring); made by `build_context`.

    Attributes:
        spec: the run's frozen spec (`cdfsl.spec.RunSpec`): its config validated and resolved once, its method
            parsed once; `config` is `spec.config` (every recipe value filled in), what methods are given.
        device: the compute device; `precision` its label (`fp32` or `bf16`), `autocast_dtype` the methods' autocast
            dtype (None in fp32).
        index, sampler: the dataset's image index and its episode sampler (built by the dataset's protocol); None in
            a context built without its dataset (`load_data=False`).
        protocol: the name of the run's episode protocol (`fixed-way` for every built-in dataset; `all-way` when the
            config asks for it).
        loads: where `backbone` and `cache` are loaded from and kept.
        eval_batch: query images decoded and predicted at once under a streamed protocol (`query_batches`).
        on_queries: called with (query images predicted, in all) after each streamed batch (a progress bar).

    `backbone` (the frozen adapter) and `cache` (the dataset's images at the backbone's input size) are loaded on
    first use, so a run whose episodes are all stored already never loads its backbone.
    """

    spec: RunSpec
    device: torch.device
    precision: str
    autocast_dtype: torch.dtype | None
    index: ImageIndex | None
    sampler: Sampler | None
    loads: LoadCache = field(repr=False)
    protocol: str = FIXED_WAY
    eval_batch: int = 256
    on_queries: Callable[[int, int], None] | None = field(default=None, repr=False)

    @property
    def config(self) -> RunConfig:
        """The run config, validated and resolved (`spec.config`); not to be changed."""
        return self.spec.config

    @cached_property
    def backbone(self) -> ClipAdapter:
        """The frozen backbone on `device`."""
        return self.loads.backbone(self.config, self.device)

    @cached_property
    def cache(self) -> ImageCache:
        """The dataset's image cache at the backbone's input size (loads the backbone first). Under a streamed
        protocol it is the run's own: its index is narrowed to one draw (all-way), which no later run shares, so
        keeping it in `loads` would only hold its images for the rest of the process."""
        index, _ = self.data()
        config = self.config
        size, pre_resize = self.backbone.image_size, config.pre_resize or 0
        if self.streamed:
            return ImageCache(index, size, config.cache_dir, pre_resize=pre_resize)
        return self.loads.image_cache(index, size, config.cache_dir, pre_resize)

    def data(self) -> tuple[ImageIndex, Sampler]:
        """(index, sampler); a `RuntimeError` in a context built without its dataset."""
        if self.index is None or self.sampler is None:
            raise RuntimeError("this run context was built without its dataset (load_data=False)")
        return self.index, self.sampler

    def load(self) -> None:
        """Load the backbone and, with a dataset, the image cache now (in that order) rather than on first use."""
        _ = self.backbone
        if self.index is not None:
            _ = self.cache

    def batch(self, episodes: Sequence[int], with_views: bool = True) -> EpisodeBatch:
        """The episodes with these indices (in the config's episode sequence) as one batch of E = len(episodes).

        Support views `[E, S·V, 3, H, W]` (`with_views=False`: the plain image only, V = 1), query images
        `[E, Q, 3, H, W]`, both normalized for the backbone, and labels `[E, S·V]`, `[E, Q]`, on `device`. The
        episodes must share one shape (a `ValueError` otherwise); `shaped_batches` splits any set of them.
        """
        _, sampler = self.data()
        return self._build(sampler.episodes(episodes), with_views)

    def shaped_batches(self, episodes: Sequence[int], with_views: bool = True) -> list[EpisodeBatch]:
        """The episodes with these indices as one batch per episode shape (`data.episodes.group_by_shape`): a single
        batch when they share one. Each episode's tensors are those it has alone (its streams are per index)."""
        _, sampler = self.data()
        return [self._build(group, with_views) for group in group_by_shape(sampler.episodes(episodes))]

    def _build(self, episodes: list[Episode], with_views: bool) -> EpisodeBatch:
        index, _ = self.data()
        config = self.config
        return build_batch(
            episodes,
            index,
            self.cache,
            config.augment,
            self.backbone.normalize,
            config.seed,
            self.device,
            with_views=with_views,
        )

    @property
    def episode_count(self) -> int:
        """The episodes of the run: the protocol's fixed count (all-way: 1), else the config's."""
        fixed = get_protocol(self.protocol).episodes
        return fixed if fixed is not None else self.config.resolved_episodes()

    @property
    def streamed(self) -> bool:
        """Whether the run's queries are predicted in batches of `eval_batch` (`query_batches`)."""
        return get_protocol(self.protocol).streamed

    def fingerprint(self) -> str:
        """The dataset's fingerprint in the run identity (`data.protocols.index_fingerprint`)."""
        index, sampler = self.data()
        return index_fingerprint(sampler, index)

    def support_batch(self, episodes: Sequence[int], with_views: bool = True) -> EpisodeBatch:
        """As `batch`, with the support views only: the query tensors are empty (`[E, 0, 3, H, W]`, `[E, 0]`);
        `query_batches` gives the queries. The episodes must share one shape."""
        _, sampler = self.data()
        chosen = sampler.episodes(episodes)
        bare = [dataclasses.replace(e, query=tuple(() for _ in e.classes)) for e in chosen]
        batch = self._build(bare, with_views)
        batch.episodes = chosen
        return batch

    def query_batches(self, batch: EpisodeBatch) -> Iterator[EpisodeBatch]:
        """`batch` with its episodes' queries `eval_batch` at a time (query positions `[start, start + b)` of each
        episode, in `Episode.query_items` order): each a copy of `batch` whose `query` is `[E, b, 3, H, W]` and
        `query_labels` `[E, b]`. The images are decoded through a cache of their own, dropped after each batch (and
        read from the disk cache when the run has one), so memory holds one batch of queries."""
        index, _ = self.data()
        config = self.config
        items = [episode.query_items() for episode in batch.episodes]
        total = len(items[0]) if items else 0
        for start in range(0, total, self.eval_batch):
            cache = ImageCache(index, self.backbone.image_size, config.cache_dir, pre_resize=config.pre_resize or 0)
            images, labels = [], []
            for episode_items in items:
                chunk = episode_items[start : start + self.eval_batch]
                decoded = cache.get([item for item, _ in chunk]).to(self.device).float() / 255.0
                images.append(self.backbone.normalize(decoded))
                labels.append(torch.tensor([label for _, label in chunk], device=self.device))
            yield dataclasses.replace(batch, query=torch.stack(images), query_labels=torch.stack(labels))

    def batches(self, episodes: Sequence[int], with_views: bool = True) -> Iterator[EpisodeBatch]:
        """`shaped_batches` over `episodes` in consecutive chunks of `config.episode_batch` episodes, each batch
        built in a background thread while the caller works on the one before (`engine.prefetch`)."""
        _, sampler = self.data()
        groups = [
            [episode.index for episode in group]
            for chunk in chunks(episodes, self.config.episode_batch)
            for group in group_by_shape(sampler.episodes(chunk))
        ]
        with BatchFeed(self.batch) as feed:
            yield from fed(feed, groups, with_views)


def build_context(
    config: RunConfig | RunSpec, loads: LoadCache | None = None, *, load_data: bool = True, eval_batch: int = 256
) -> RunContext:
    """Build the run context of `config`; the backbone and image cache come from `loads`.

    A config is validated and resolved here, once (`RunSpec.of`; a bad one is a `ConfigError` before anything is
    loaded); a `RunSpec` was already, and is used as it is. With `load_data`, the dataset's index and episode
    sampler (its protocol's, `data.protocols.protocol_of`) are loaded, and classes with fewer than shots + queries
    images are named in a `DatasetWarning`; without it, the context has no dataset (for fits on synthetic images).
    `loads=None` keeps what is loaded in this context only. The protocol is the config's when it asks for `all-way`
    (`RunConfig.episode_protocol`), whose sampler narrows the index to the items the run reads (`run_index`); a
    dataset without train and test splits is then a `DatasetError` here, before anything is stored. `eval_batch`:
    query images per streamed batch (`query_batches`).
    """
    spec = RunSpec.of(config)
    # One name for one set of weights, so the run identity, stored rows and model.json agree (tiny: `shipped`).
    pretrained = resolve_pretrained(spec.config.backbone, spec.config.pretrained)
    if pretrained != spec.config.pretrained:
        spec = spec.replaced(pretrained=pretrained)
    config = spec.config
    device = resolve_device(config.device)
    precision, autocast_dtype = resolve_precision(config.train.precision, device)
    index, sampler = None, None
    protocol = config.episode_protocol
    if eval_batch < 1:
        raise ConfigError(f"the evaluation batch must be at least 1 image, got {eval_batch}")
    if load_data:
        index = load_index(config.dataset, config.data_root, all_splits=protocol == ALL_WAY)
        settings = EpisodeSettings(config.ways, config.shots, config.queries)
        sampler = build_sampler(protocol, index, settings, config.seed)
        index = run_index(sampler, index)
        _warn_excluded(config, sampler)
    loads = LoadCache() if loads is None else loads
    return RunContext(spec, device, precision, autocast_dtype, index, sampler, loads, protocol, eval_batch)


def _warn_excluded(config: RunConfig, sampler: Sampler) -> None:
    if sampler.excluded_classes:
        needed = getattr(sampler, "min_images", None)  # a sampler's own minimum (Meta-Dataset's: 2)
        rule = needed if needed is not None else f"shots + queries = {config.shots + config.queries}"
        warnings.warn(
            f"{config.dataset}: classes with fewer than {rule} images "
            f"cannot appear in episodes: {', '.join(sampler.excluded_classes)}",
            DatasetWarning,
            stacklevel=4,  # the caller of `Runner.run` or of a probe's `prepare`
        )
