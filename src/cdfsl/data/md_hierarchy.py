"""The class structure Meta-Dataset's episode sampler needs: ILSVRC's WordNet hierarchy and Omniglot's alphabets.

Torch-free. `md_structure(source, index, root)` gives, for an index read by one of the `md-*` readers:

- `md-ilsvrc_2012`: a `ClassHierarchy`, the WordNet DAG of the index's classes (its leaves) and their ancestors, built
  as Meta-Dataset builds each split's sampling graph (`meta_dataset/data/imagenet_specification.py`): the leaves'
  ancestors from `wordnet.is_a.txt` under the data root, links to anything outside that set dropped, and every node
  with exactly one child collapsed (its child attached to its parents), repeatedly. For the test classes the graph
  is restricted to the test root `n03183080` ('device') and its descendants, as the published split does.
- `md-omniglot`: an `Alphabets`, alphabet name -> the labels of its characters (class key `alphabet/character`).
- any other source: None.

The shapes the sampler codes against:

    ClassHierarchy
        root: str                              # the wnid no other node points to (the split's root)
        children: Mapping[str, tuple[str, ...]]  # every node (internal and leaf) -> its child wnids, sorted;
                                               # a leaf maps to ()
        leaf_labels: Mapping[str, int]         # leaf wnid -> its label in the index (class_keys[label] == wnid)
        words: Mapping[str, str]               # wnid -> its words from words.txt ("" when absent)
        leaves_under(node) -> tuple[int, ...]  # the labels of the leaves reachable from node, sorted
                                               # (a leaf gives its own label)
        span_nodes(low=5, high=392) -> tuple[str, ...]
                                               # the nodes whose leaves_under has low..high labels, sorted by wnid
                                               # (Meta-Dataset's MIN/MAX spanning leaves for an ILSVRC episode)

    Alphabets
        labels_of: Mapping[str, tuple[int, ...]]  # alphabet -> labels of its characters, sorted; alphabets sorted
        names -> tuple[str, ...]                  # the alphabets, sorted
        alphabet_of(label) -> str

Both are frozen and built once per index (cheap: a few thousand nodes). The class splits themselves
(`MD_CLASS_SPLITS`, `read_md_split`) are in `cdfsl.data.meta_dataset`.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cdfsl.errors import DatasetError

if TYPE_CHECKING:
    from cdfsl.data.index import ImageIndex

WORDNET_IS_A = "wordnet.is_a.txt"
WORDNET_WORDS = "words.txt"
ILSVRC_VALID_ROOT = "n02075296"  # 'carnivore', Meta-Dataset's validation subgraph root
ILSVRC_TEST_ROOT = "n03183080"  # 'device', Meta-Dataset's test subgraph root
MIN_SPANNING_LEAVES = 5
MAX_SPANNING_LEAVES = 392


@dataclass(frozen=True)
class ClassHierarchy:
    """A DAG over class labels (see the module docstring for the shape)."""

    root: str
    children: Mapping[str, tuple[str, ...]]
    leaf_labels: Mapping[str, int]
    words: Mapping[str, str] = field(default_factory=dict)

    def leaves_under(self, node: str) -> tuple[int, ...]:
        """Labels of the leaves reachable from `node` (itself when a leaf), sorted.

        Raises:
            KeyError: `node` is not in the hierarchy.
        """
        return self._leaves[node]

    def span_nodes(self, low: int = MIN_SPANNING_LEAVES, high: int = MAX_SPANNING_LEAVES) -> tuple[str, ...]:
        """The nodes spanning between `low` and `high` leaves (inclusive), sorted by wnid."""
        return tuple(sorted(node for node, leaves in self._leaves.items() if low <= len(leaves) <= high))

    @functools.cached_property
    def _leaves(self) -> dict[str, tuple[int, ...]]:
        spans: dict[str, frozenset[int]] = {}
        for node in _children_first(self.children):
            kids = self.children[node]
            spans[node] = frozenset().union(*(spans[c] for c in kids)) if kids else frozenset({self.leaf_labels[node]})
        return {node: tuple(sorted(labels)) for node, labels in spans.items()}


def _children_first(children: Mapping[str, tuple[str, ...]]) -> list[str]:
    """The nodes of a DAG, each after all of its children (iterative post-order)."""
    order: list[str] = []
    done: set[str] = set()
    for start in sorted(children):
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in done:
                continue
            if expanded:
                done.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((child, False) for child in children[node] if child not in done)
    return order


@dataclass(frozen=True)
class Alphabets:
    """Omniglot's alphabets over class labels (see the module docstring)."""

    labels_of: Mapping[str, tuple[int, ...]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.labels_of))

    def alphabet_of(self, label: int) -> str:
        """The alphabet of class `label`.

        Raises:
            KeyError: no alphabet holds `label`.
        """
        for name, labels in self.labels_of.items():
            if label in labels:
                return name
        raise KeyError(label)


MdStructure = ClassHierarchy | Alphabets | None


def md_structure(source: str, index: ImageIndex, root: str | Path | None) -> MdStructure:
    """The class structure of `index` (read by the `md-<source>` reader under `root`); see the module docstring.

    `source` may be given with or without the `md-` prefix. For ILSVRC the subgraph root is the test root when every
    class of the index is a published test class, the validation root when every one is a validation class, and
    WordNet's own root otherwise.

    Raises:
        DatasetError: ILSVRC's WordNet files are missing or do not cover the index's classes.
    """
    name = source.removeprefix("md-")
    if name == "omniglot":
        return alphabets_of(index.class_keys)
    if name != "ilsvrc_2012":
        return None
    if root is None:
        raise DatasetError("md-ilsvrc_2012: the WordNet hierarchy needs the data root (--data-root)")
    from cdfsl.data.readers.meta_dataset.splits import MD_CLASS_SPLITS  # data, no cycle at import time

    splits = MD_CLASS_SPLITS["ilsvrc_2012"]
    keys = set(index.class_keys)
    subgraph_root = (
        ILSVRC_TEST_ROOT if keys <= set(splits["test"]) else ILSVRC_VALID_ROOT if keys <= set(splits["valid"]) else None
    )
    return ilsvrc_hierarchy(index.class_keys, Path(root), subgraph_root)


def alphabets_of(class_keys: Iterable[str]) -> Alphabets:
    """Alphabets from class keys `alphabet/character` (label = position in `class_keys`)."""
    labels: dict[str, list[int]] = defaultdict(list)
    for label, key in enumerate(class_keys):
        labels[key.split("/", 1)[0]].append(label)
    return Alphabets({name: tuple(labels[name]) for name in sorted(labels)})


def wordnet_files(root: Path) -> tuple[Path, Path]:
    """`wordnet.is_a.txt` and `words.txt` under `root` (or under `root/train/`).

    Raises:
        DatasetError: either is missing (the message names both places looked in).
    """
    for folder in (root, root / "train"):
        if (folder / WORDNET_IS_A).is_file() and (folder / WORDNET_WORDS).is_file():
            return folder / WORDNET_IS_A, folder / WORDNET_WORDS
    missing = [name for name in (WORDNET_IS_A, WORDNET_WORDS) if not (root / name).is_file()]
    raise DatasetError(
        f"md-ilsvrc_2012: missing under {root}: {', '.join(missing)} (ImageNet's WordNet files: "
        "https://www.image-net.org/data/wordnet.is_a.txt and words.txt)"
    )


def read_words(path: Path) -> dict[str, str]:
    """`words.txt`: wnid -> its words (`wnid<TAB>words` per line).

    Raises:
        DatasetError: the file cannot be read.
    """
    words: dict[str, str] = {}
    for line in _lines(path):
        wnid, _, text = line.partition("\t")
        words[wnid.strip()] = text.strip()
    return words


def read_is_a(path: Path) -> list[tuple[str, str]]:
    """`wordnet.is_a.txt`: (parent, child) wnid pairs, one `parent child` per line.

    Raises:
        DatasetError: the file cannot be read, or a line is not two wnids.
    """
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(_lines(path), start=1):
        parts = line.split()
        if len(parts) != 2:
            raise DatasetError(f"md-ilsvrc_2012: {path} line {number} is not 'parent child': {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"md-ilsvrc_2012: cannot read {path}: {error}") from None


def ilsvrc_hierarchy(
    class_keys: Iterable[str], root: Path, subgraph_root: str | None = ILSVRC_TEST_ROOT
) -> ClassHierarchy:
    """The WordNet sampling graph of the classes `class_keys` (wnids; label = position), see the module docstring.

    `subgraph_root`: keep only ancestors that are it or below it (Meta-Dataset's valid/test subgraphs); None keeps
    every ancestor. A root that is not above every class is ignored (the whole ancestry is kept).

    Raises:
        DatasetError: the WordNet files are missing, a class is not in `wordnet.is_a.txt`, or the classes have no
            single common root.
    """
    is_a_path, words_path = wordnet_files(root)
    leaves = {wnid: label for label, wnid in enumerate(class_keys)}
    parents: dict[str, set[str]] = defaultdict(set)
    below: dict[str, set[str]] = defaultdict(set)
    for parent, child in read_is_a(is_a_path):
        parents[child].add(parent)
        below[parent].add(child)
    unknown = sorted(wnid for wnid in leaves if wnid not in parents)
    if unknown:
        raise DatasetError(f"md-ilsvrc_2012: class(es) not in {is_a_path.name}: {', '.join(unknown[:10])}")
    nodes = _reach(leaves, parents)
    if subgraph_root is not None:
        keep = _reach([subgraph_root], below)
        if set(leaves) <= keep:
            nodes &= keep
    nodes |= set(leaves)
    children = {node: {c for c in below.get(node, ()) if c in nodes} for node in nodes}
    ups = {node: {p for p in parents.get(node, ()) if p in nodes} for node in nodes}
    _collapse(children, ups)
    tops = sorted(node for node in children if not ups[node])
    if len(tops) != 1:
        raise DatasetError(f"md-ilsvrc_2012: the classes have {len(tops)} roots in WordNet ({', '.join(tops[:5])})")
    words = read_words(words_path)
    return ClassHierarchy(
        root=tops[0],
        children={node: tuple(sorted(children[node])) for node in sorted(children)},
        leaf_labels=dict(leaves),
        words={node: words.get(node, "") for node in sorted(children)},
    )


def _reach(starts: Iterable[str], links: Mapping[str, set[str]]) -> set[str]:
    """`starts` and every node reachable from them along `links`."""
    seen = set(starts)
    pending = list(seen)
    while pending:
        for nxt in links.get(pending.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                pending.append(nxt)
    return seen


def _collapse(children: dict[str, set[str]], parents: dict[str, set[str]]) -> None:
    """Remove, until none is left, every node with exactly one child, attaching the child to its parents (in place).

    Meta-Dataset's `collapse`: an episode cannot be drawn from a node with one child."""
    changed = True
    while changed:
        changed = False
        for node in sorted(children):
            if len(children[node]) != 1:
                continue
            (child,) = children[node]
            parents[child].discard(node)
            for parent in parents[node]:
                children[parent].discard(node)
                children[parent].add(child)
                parents[child].add(parent)
            del children[node], parents[node]
            changed = True
