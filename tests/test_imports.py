"""The import graph of `src/cdfsl`: no cycle among modules at import time, and no arrow pointing up the layers.

Each module is parsed with `ast` (nothing is imported). An edge `a -> b` is an import of `cdfsl.b` written in `a`:
`import cdfsl.b`, `from cdfsl.b import name`, or `from cdfsl.x import b` where `cdfsl.x.b` is a module. Imports under
`if TYPE_CHECKING:` are left out (they never run). Edges are of two kinds:

- **module level**: run when `a` is imported (its body, class bodies and module-level `try`/`if` blocks included);
- **deferred**: inside a function, run when it is called (the way heavy modules are kept off `cdfsl --help`).

(a) The module-level edges have no cycle. A package's `__init__` that its submodules' imports also run is not
counted as an edge: Python runs it first, so it cannot close a cycle on its own.

(b) No edge of either kind points upward in `LAYERS`, bottom first. A module's layer is that of its top-level
package (`cdfsl.methods.lora.method` is in `methods`); modules of one package may import each other freely (cycles
aside). The order follows what each part needs:

1. `errors`, `version`, `files`, `seeding`, `stats`, `rules`: leaves every part may use (messages, the version, safe
   file writes, random streams, statistics, the shared range rules of settings).
2. `registry` and each part's torch-free declaration (`methods/<part>/settings.py`, the loop's
   `methods/training_settings.py`): the names of bases and plug-ins, their settings, rules and records.
3. `data`: dataset readers, episode protocols, images; it knows no config and no model.
4. `recipes`, `spec`, `config`: the run config reads the registry's names and sections, the recipes' values and
   the datasets' specs.
5. `backbone`: open_clip models and their adapter, configured by the config's sections (LoRA).
6. `labels`: the names reports and listings show for configs and backbone tags.
7. `methods`: bases and plug-ins (their torch code), on a backbone, an episode and a config.
8. `engine`: run context, runner, store, executors; it builds methods.
9. `analysis`, `classifier`, `pretrain`: what is built on runs (reports, probes, cost), the classifier API, and the
   tiny model's pretraining.
10. the package root (`cdfsl`: the public API, which imports the runner and the classifier on first use), `cli` and
   `__main__`: the top; nothing below imports them.

An entry of `LAYERS` is a top-level package or module (`data`, `config`), or a dotted pattern of modules
(`methods.*.settings`) that places those modules apart from their package; a pattern wins over a package name.

`KNOWN_UPWARD` lists the upward edges tolerated for now, each with why; it may only shrink (a test fails when one of
them is gone, so that it is removed from the list).
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cdfsl"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "version", "files", "seeding", "stats", "rules"),
    ("registry", "methods.*.settings", "methods.training_settings"),
    ("data",),
    ("recipes", "spec", "config"),
    ("backbone",),
    ("labels",),
    ("methods",),
    ("engine",),
    ("analysis", "classifier", "pretrain"),
    ("", "cli", "__main__"),  # "" is the package root, `cdfsl/__init__.py`
)

# (importer, imported): why it is tolerated for now.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
"""None left: `data/episodes.py -> config`, the last one, went with the episode protocols."""


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its `__init__.py`)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, deferred: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """The import statements below `node`, each with whether it is deferred (inside a function)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from (item for other in child.orelse for item in _imports_of(other, deferred))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, deferred
        yield from _imports(child, deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))


def _imports_of(node: ast.AST, deferred: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, deferred
    yield from _imports(node, deferred)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of the package that `node`, written in `module`, imports."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    if node.level:  # a relative import, resolved against the importing module's package
        package = module.split(".")
        package = package[: len(package) - node.level + (1 if MODULES[module].name == "__init__.py" else 0)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base not in MODULES:
        return []
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    named = [alias for alias in node.names if f"{base}.{alias.name}" not in MODULES]
    return submodules + ([base] if named or not submodules else [])


def import_edges() -> list[tuple[str, str, bool, int]]:
    """Every edge of the package's import graph: (importer, imported, deferred, line)."""
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, deferred in _imports(tree, False):
            for target in _targets(module, node):
                if target != module:
                    edges.append((module, target, deferred, node.lineno))
    return edges


EDGES = import_edges()


def layer_of(module: str) -> int:
    """The layer of `module`: that of a dotted pattern it matches (`methods.*.settings`), else its package's."""
    name = module.removeprefix("cdfsl").removeprefix(".")
    for level, entries in enumerate(LAYERS):
        if any("." in entry and fnmatch.fnmatchcase(name, entry) for entry in entries):
            return level
    part = name.split(".")[0]
    for level, entries in enumerate(LAYERS):
        if part in entries:
            return level
    raise AssertionError(f"{module}: its package {part!r} has no layer in LAYERS; add it where it belongs")


def upward_edges() -> dict[tuple[str, str], int]:
    """Edges from a lower layer to a higher one: (importer, imported) -> line."""
    return {(a, b): line for a, b, _, line in EDGES if layer_of(b) > layer_of(a)}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph `edges` as a path whose first and last module are the same; None if none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_is_read() -> None:
    """The parser finds the edges it must: module level, deferred, `from package import submodule`, type-only."""
    found = {(a, b): deferred for a, b, deferred, _ in EDGES}
    assert found[("cdfsl.config", "cdfsl.registry")] is False
    assert found[("cdfsl.cli.run", "cdfsl.engine.runner")] is True  # `run_command` imports the runner when called
    assert found[("cdfsl.cli", "cdfsl.cli.run")] is False  # `from cdfsl.cli import run`: a submodule
    assert ("cdfsl.recipes", "cdfsl.config") not in found  # under `if TYPE_CHECKING:` only
    assert len(MODULES) > 50 and all(layer_of(m) >= 0 for m in MODULES)


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}}) is None


def test_no_cycle_at_module_level() -> None:
    graph: dict[str, set[str]] = {}
    for a, b, deferred, _ in EDGES:
        if not deferred:
            graph.setdefault(a, set()).add(b)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle at module level: {' -> '.join(cycle or [])}"


def test_no_arrow_points_up_the_layers() -> None:
    upward = upward_edges()
    new = {edge: line for edge, line in upward.items() if edge not in KNOWN_UPWARD}
    listing = "; ".join(f"{a} -> {b} (line {line})" for (a, b), line in sorted(new.items()))
    assert not new, f"upward imports (a lower layer importing a higher one, see LAYERS): {listing}"


def test_every_tolerated_upward_arrow_still_exists() -> None:
    """A tolerated arrow that is gone leaves the list (so that it can only shrink)."""
    upward = upward_edges()
    gone = [f"{a} -> {b}" for a, b in sorted(KNOWN_UPWARD) if (a, b) not in upward]
    assert not gone, f"no longer exist, remove from KNOWN_UPWARD: {', '.join(gone)}"


def test_nothing_imports_the_package_root_for_its_version() -> None:
    """The version has its own module: a part reading it does not import the package root (the public API)."""
    into_root = sorted((a, line) for a, b, _, line in EDGES if b == "cdfsl")
    assert not into_root, f"modules importing the package root: {into_root}"


@pytest.mark.parametrize("command", [["--help"], ["methods"], ["recipes", "--format", "json"]])
def test_listings_import_neither_torch_nor_open_clip(command: list[str]) -> None:
    """`cdfsl --help` and the listings that need no model stay quick: torch and open_clip are imported on use."""
    script = (
        "import sys\nfrom cdfsl.cli import app\n"
        f"try:\n    app({command!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the command printed nothing"
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr
