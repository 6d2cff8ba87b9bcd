"""Benchmarks by name: what `--dataset` accepts. A `Benchmark` entry names its reader (the source layout, one module
under `cdfsl.data.readers`), its protocol (the episode sampler or split protocol it is evaluated with, by name, with
the ways, shots, queries and episode counts that protocol uses by default), its prompt template and its class-name
rule, the suite it belongs to, and, for a source that publishes splits, which split its episodes are drawn from
(`episodic_split`; `read_splits` gives the whole index with every item's split). `DATASETS` is the one table the
config, the CLI's choices and the tests read; a third-party benchmark is one
`register_benchmark(Benchmark(...))` call (`docs/extending.md`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cdfsl.data.clip_suite import CLIP_FEWSHOT
from cdfsl.data.index import ImageIndex
from cdfsl.data.meta_dataset import MD_BENCHMARK_FIELDS
from cdfsl.data.readers.registry import READERS, create_reader
from cdfsl.errors import ConfigError, DatasetError

FIXED_WAY = "fixed-way"
"""Today's protocol: N-way K-shot episodes with Q queries per class, drawn by the seeded episode sampler."""

PHOTO_TEMPLATE = "a photo of a {}."

COOP_TEMPLATE = "coop"
"""`train.template=coop`: the dataset's template in CoOp's zero-shot trainer (`Benchmark.coop_template`), resolved when
the config is (`resolve_template`), so the template itself is what enters the run identity."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark.

    Attributes:
        name: what `--dataset` takes; also the index's name (in its fingerprint and the image cache's folder).
        reader: the registered reader of its source layout (`cdfsl.data.readers.READERS`).
        class_names: the class-name rule, in words (how the reader names classes in prompts).
        protocol: the episode protocol's name, resolved by the protocol registry.
        ways: classes per episode by default.
        shots: support images per class by default.
        queries: query images per class by default.
        episodes: episodes per run by default, unless `episodes_by_shots` names the shots (`episodes_for`).
        episodes_by_shots: (shots, episodes) pairs where the default episode count depends on the shots.
        template: the prompt template, one `{}` for the class name.
        suite: the benchmark suite it belongs to (`meta-dataset`, ...), "" for none.
        episodic_split: the split episodes are drawn from (`test` for the CLIP few-shot suite), or None for a source
            without splits (every item).
        coop_template: its template in CoOp's zero-shot trainer (`CUSTOM_TEMPLATES`), what `train.template=coop`
            resolves to; None where CoOp has none.
    """

    name: str
    reader: str
    class_names: str
    protocol: str = FIXED_WAY
    ways: int = 5
    shots: int = 1
    queries: int = 15
    episodes: int = 400
    episodes_by_shots: tuple[tuple[int, int], ...] = ((1, 800),)
    template: str = PHOTO_TEMPLATE
    suite: str = ""
    episodic_split: str | None = None
    coop_template: str | None = None

    @property
    def needs_root(self) -> bool:
        """Whether the benchmark is read from a data root (its reader's)."""
        return READERS[self.reader].needs_root

    def episodes_for(self, shots: int) -> int:
        """The default episode count of a run with `shots` support images per class (800 for 1-shot, else 400)."""
        return dict(self.episodes_by_shots).get(shots, self.episodes)

    def read(self, data_root: str | Path | None) -> ImageIndex:
        """The index episodes are drawn from: the `episodic_split` of `read_splits`, or all of it when None.

        Raises:
            DatasetError: a missing root, or a missing/malformed layout, or no `episodic_split` in it.
        """
        index = self.read_splits(data_root)
        return index if self.episodic_split is None else index.split(self.episodic_split)

    def read_splits(self, data_root: str | Path | None) -> ImageIndex:
        """The benchmark's whole index, read by its reader under `data_root` (ignored when it needs none), with each
        item's split (`ImageIndex.splits`, `split(name)`) where the source publishes splits.

        Raises:
            DatasetError: a missing root, or a missing/malformed layout.
        """
        index = create_reader(self.reader, data_root, dataset=self.name)
        # a benchmark on a shared layout (say `imagefolder`) is its own dataset: its name enters the fingerprint
        return index if index.name == self.name else dataclasses.replace(index, name=self.name)


DATASETS: dict[str, Benchmark] = {}
"""Every benchmark `--dataset` accepts, by name: the one table the config, the CLI and the tests read."""


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Add `benchmark` to `DATASETS` (returned, so a module can keep it).

    Raises:
        ValueError: the name is taken, the reader is not registered, or the template lacks its one `{}`.
    """
    if benchmark.name in DATASETS:
        raise ValueError(f"a benchmark named {benchmark.name!r} is already registered")
    if benchmark.reader not in READERS:
        raise ValueError(
            f"benchmark {benchmark.name!r} names reader {benchmark.reader!r}, which is not registered; "
            f"registered readers: {', '.join(READERS)}"
        )
    for template in (benchmark.template, benchmark.coop_template):
        if template is not None and template.count("{}") != 1:
            raise ValueError(f"benchmark {benchmark.name!r}: template {template!r} needs exactly one {{}}")
    DATASETS[benchmark.name] = benchmark
    return benchmark


def resolve_template(template: str, dataset: str) -> str:
    """`template`, or the dataset's CoOp template when it is `coop` (`COOP_TEMPLATE`).

    Raises:
        ConfigError: `coop` for a dataset CoOp gives no template.
    """
    if template != COOP_TEMPLATE:
        return template
    benchmark = DATASETS.get(dataset)
    if benchmark is None or benchmark.coop_template is None:
        having = [name for name, entry in DATASETS.items() if entry.coop_template is not None]
        raise ConfigError(
            f"train.template=coop: dataset {dataset!r} has no CoOp template (CoOp's zero-shot templates cover "
            f"{', '.join(having) or 'no registered dataset'}); give the template itself, e.g. "
            f"--set train.template='{PHOTO_TEMPLATE}'"
        )
    return benchmark.coop_template


def load_index(dataset: str, data_root: str | Path | None, *, all_splits: bool = False) -> ImageIndex:
    """Index `dataset` found under `data_root` (ignored for datasets that need no root, such as `digits`): the items
    episodes are drawn from (`Benchmark.read`), or with `all_splits` every split (`read_splits`: the all-way protocol
    draws from `train` and tests on `test`).

    Raises:
        DatasetError: unknown dataset name, or a missing/malformed dataset; the message says what was expected
            and what was found.
    """
    benchmark = DATASETS.get(dataset)
    if benchmark is None:
        raise DatasetError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    return benchmark.read_splits(data_root) if all_splits else benchmark.read(data_root)


for _benchmark in (
    Benchmark(
        "eurosat",
        reader="eurosat",
        class_names="EuroSAT's names for its class folders (EUROSAT_CLASSES)",
        suite="cdfsl",
    ),
    Benchmark(
        "isic2018", reader="isic2018", class_names="the diagnosis of each label column (ISIC_CLASSES)", suite="cdfsl"
    ),
    Benchmark("cropdiseases", reader="cropdiseases", class_names="the folder rule (folder_prompt)", suite="cdfsl"),
    Benchmark("chestx", reader="chestx", class_names="the finding labels as written", suite="cdfsl"),
    Benchmark(
        "imagefolder",
        reader="imagefolder",
        class_names="classnames.json where it names a folder, else the folder rule (folder_prompt)",
    ),
    Benchmark("digits", reader="digits", class_names="the digit as a word (DIGIT_NAMES)"),
):
    register_benchmark(_benchmark)
for _fields in CLIP_FEWSHOT:  # the CLIP few-shot suite's eleven
    register_benchmark(Benchmark(**_fields))
for _fields in MD_BENCHMARK_FIELDS:  # Meta-Dataset's ten sources
    register_benchmark(Benchmark(**_fields))
