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

Both are frozen and built once per index (cheap: a few thousand nodes).
"""

from __future__ import annotations

import functools
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

        def span(node: str) -> frozenset[int]:
            if node not in spans:
                kids = self.children[node]
                spans[node] = (
                    frozenset({self.leaf_labels[node]}) if not kids else frozenset().union(*(span(c) for c in kids))
                )
            return spans[node]

        for node in self.children:
            _visit_iteratively(node, self.children, spans, span)
        return {node: tuple(sorted(labels)) for node, labels in spans.items()}


def _visit_iteratively(node, children, spans, span) -> None:  # noqa: ANN001 - placeholder, replaced below
    span(node)


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

    `source` may be given with or without the `md-` prefix.
    """
    raise NotImplementedError


def alphabets_of(class_keys: Iterable[str]) -> Alphabets:
    """Alphabets from class keys `alphabet/character`."""
    raise NotImplementedError


def ilsvrc_hierarchy(index: ImageIndex, root: Path, subgraph_root: str | None = ILSVRC_TEST_ROOT) -> ClassHierarchy:
    """The WordNet sampling graph of the index's classes (see the module docstring).

    Raises:
        DatasetError: `wordnet.is_a.txt` or `words.txt` is missing, or a class's wnid is not in it.
    """
    raise DatasetError("not implemented yet")
