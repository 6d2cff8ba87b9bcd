"""Benchmark entries and the reader registry: every `--dataset` names a registered reader and today's fixed-way
protocol values, a third-party reader and benchmark register with one call each, and indexing imports neither torch
nor the configuration."""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cdfsl.data.readers as readers_package
from cdfsl.config import RunConfig
from cdfsl.data.benchmarks import DATASETS, FIXED_WAY, Benchmark, load_index, register_benchmark
from cdfsl.data.clip_suite import SUITE_ORDER
from cdfsl.data.decode import open_rgb
from cdfsl.data.index import ImageIndex
from cdfsl.data.meta_dataset import MD_SOURCES
from cdfsl.data.readers import READERS, Reader, create_reader, register_reader
from cdfsl.data.readers.builder import IndexBuilder
from cdfsl.errors import DatasetError
from layouts import image_array, make_imagefolder

SOURCE = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def registries() -> Iterator[None]:
    """Leave `DATASETS` and `READERS` as they were, whatever a test registers."""
    datasets, readers = dict(DATASETS), dict(READERS)
    yield
    DATASETS.clear()
    DATASETS.update(datasets)
    READERS.clear()
    READERS.update(readers)


def test_every_dataset_has_a_registered_reader_and_its_root_rule() -> None:
    builtin = ["eurosat", "isic2018", "cropdiseases", "chestx", "imagefolder", "digits"]
    assert list(DATASETS) == [*builtin, *SUITE_ORDER, *(f"md-{source}" for source in MD_SOURCES)]
    assert [name for name, benchmark in DATASETS.items() if benchmark.suite == "clip-fewshot"] == list(SUITE_ORDER)
    for name, benchmark in DATASETS.items():
        assert benchmark.name == name
        assert READERS[benchmark.reader].needs_root == benchmark.needs_root
        assert benchmark.class_names
    assert [name for name, benchmark in DATASETS.items() if not benchmark.needs_root] == ["digits"]


@pytest.mark.parametrize("dataset", ["eurosat", "isic2018", "cropdiseases", "chestx", "imagefolder", "digits"])
def test_protocol_values_are_the_ones_runs_use_today(dataset: str) -> None:
    benchmark = DATASETS[dataset]
    defaults = RunConfig(dataset=dataset, data_root=None if dataset == "digits" else "/data")
    assert benchmark.protocol == FIXED_WAY == "fixed-way"
    assert (benchmark.ways, benchmark.shots, benchmark.queries) == (defaults.ways, defaults.shots, defaults.queries)
    assert (benchmark.ways, benchmark.shots, benchmark.queries) == (5, 1, 15)
    assert benchmark.template == defaults.train.template == "a photo of a {}."
    for shots, episodes in ((1, 800), (5, 400), (10, 400)):
        assert benchmark.episodes_for(shots) == episodes
        assert RunConfig(dataset="digits", shots=shots).resolved_episodes() == episodes


def test_load_index_names_an_unknown_dataset_and_a_missing_root() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'; known datasets: eurosat, isic2018"):
        load_index("nope", None)
    with pytest.raises(DatasetError, match=r"^eurosat: a data root is needed \(--data-root\)"):
        load_index("eurosat", None)
    with pytest.raises(DatasetError, match=r"unknown reader 'nope'; known readers: chestx, cropdiseases, "):
        create_reader("nope", None)


def test_create_reader_reads_the_layout(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "tree")
    index = create_reader("imagefolder", root)
    assert index.name == "imagefolder"
    assert index.fingerprint() == load_index("imagefolder", root).fingerprint()
    assert len(index.items) == 100


def test_benchmark_on_a_shared_reader_is_its_own_dataset(tmp_path: Path, registries: None) -> None:
    root = make_imagefolder(tmp_path / "pets", classes=("cat", "dog"))
    register_benchmark(Benchmark("pets", reader="imagefolder", class_names="the folder rule"))
    pets, plain = load_index("pets", root), load_index("imagefolder", root)
    assert pets.name == "pets"
    assert (pets.items, pets.labels, pets.class_names) == (plain.items, plain.labels, plain.class_names)
    assert pets.fingerprint() != plain.fingerprint()  # the name is hashed: another dataset, another run id
    assert DATASETS["pets"].needs_root


def flat_open(root: Path, key: str, data: bytes | None = None) -> Image.Image:
    return open_rgb(root, key, data).rotate(90)


def read_flat(root: Path) -> ImageIndex:
    """A toy layout: `<class>-<n>.png` files side by side in the root."""
    classes = sorted({path.name.split("-")[0] for path in root.glob("*.png")})
    builder = IndexBuilder("flat", root, classes, classes, opener=flat_open)
    for label, name in enumerate(classes):
        builder.add_files(label, sorted(path.name for path in root.glob(f"{name}-*.png")))
    return builder.build()


def test_a_third_party_reader_and_benchmark_register_with_one_call_each(tmp_path: Path, registries: None) -> None:
    for label, name in enumerate(("ant", "bee", "cow")):
        for number in range(4):
            Image.fromarray(image_array("flat", label, number)).save(tmp_path / f"{name}-{number}.png")
    (tmp_path / "ant-9.png").write_bytes(b"not an image")
    register_reader(Reader("flat", read_flat))
    register_benchmark(Benchmark("flat", reader="flat", class_names="the file name's prefix", shots=5))
    with pytest.warns(Warning, match=r"flat: skipped 1 unreadable image file\(s\): 'ant-9.png'"):
        index = load_index("flat", tmp_path)
    assert index.class_names == ("ant", "bee", "cow")
    assert index.labels == (0,) * 4 + (1,) * 4 + (2,) * 4
    assert index.items[:2] == ("ant-0.png", "ant-1.png")
    assert index.skipped == ("ant-9.png",)
    assert np.array_equal(np.asarray(index.open(5)), np.rot90(image_array("flat", 1, 1)))  # bee-1, by flat_open
    assert DATASETS["flat"].shots == 5 and DATASETS["flat"].episodes_for(5) == 400
    with pytest.raises(DatasetError, match=r"^flat: a data root is needed"):
        load_index("flat", None)


def test_registration_refuses_taken_names_unknown_readers_and_bad_templates(registries: None) -> None:
    with pytest.raises(ValueError, match="a reader named 'eurosat' is already registered"):
        register_reader(Reader("eurosat", read_flat))
    with pytest.raises(ValueError, match="a benchmark named 'chestx' is already registered"):
        register_benchmark(Benchmark("chestx", reader="chestx", class_names="as written"))
    with pytest.raises(ValueError, match=r"reader 'nowhere', which is not registered; registered readers: ch"):
        register_benchmark(Benchmark("x", reader="nowhere", class_names="-"))
    for template in ("a photo.", "a {} of a {}."):
        with pytest.raises(ValueError, match="needs exactly one"):
            register_benchmark(Benchmark("x", reader="eurosat", class_names="-", template=template))
    assert "x" not in DATASETS


def test_old_import_paths_still_work() -> None:
    from cdfsl.data import benchmarks, decode, file_checks

    assert readers_package.DATASETS is benchmarks.DATASETS
    assert readers_package.load_index is benchmarks.load_index
    assert readers_package.open_rgb is decode.open_rgb
    assert readers_package.deep_check is file_checks.deep_check
    for name in readers_package.__all__:
        assert getattr(readers_package, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        readers_package.nothing  # noqa: B018


def _imports(path: Path) -> set[str]:
    """Modules `path` imports, at any level of the file (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _module_file(module: str) -> Path | None:
    base = SOURCE.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_indexing_imports_no_torch_and_nothing_above_the_data_package() -> None:
    """From the benchmarks table down, every cdfsl module reached stays in `cdfsl.data` (or is `cdfsl.errors`), and
    none imports torch: reading a dataset is light, and the data package has no arrow up to the config."""
    pending, seen = ["cdfsl.data.benchmarks"], set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            continue  # a name imported from a module, not a module
        parent = module.rpartition(".")[0]
        if parent.startswith("cdfsl.data"):
            pending.append(parent)  # importing a module runs its package's __init__
        for imported in _imports(path):
            assert imported.split(".")[0] != "torch", f"{module} imports {imported}"
            if imported.startswith("cdfsl"):
                assert imported.startswith(("cdfsl.data", "cdfsl.errors")), f"{module} imports {imported}"
                pending.append(imported)
    assert {"cdfsl.data.readers.eurosat", "cdfsl.data.file_checks", "cdfsl.data.decode"} <= seen


def test_loading_digits_through_its_benchmark_matches_its_reader() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = load_index("digits", "/ignored")
    assert index.fingerprint() == READERS["digits"].read().fingerprint()
    assert index.root is None and len(index.items) == 1797
