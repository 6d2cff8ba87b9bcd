"""Meta-Dataset's sampler (`cdfsl.data.md_sampler`): its bounds over generated class sizes, hierarchy and alphabet
episodes, determinism, and the distribution of 10,000 episodes' ways and support sizes against the published rules."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
from scipy import stats

from cdfsl.data.index import ImageIndex
from cdfsl.data.md_sampler import (
    META_DATASET,
    ClassGroups,
    EpisodeLimits,
    MetaDatasetSampler,
    register_class_groups,
)
from cdfsl.data.protocols import PROTOCOLS, EpisodeSettings, EpisodeShape, build_sampler
from cdfsl.errors import DatasetError


def toy_index(sizes: list[int], name: str = "toy-md") -> ImageIndex:
    """An index whose class `c` (key `k{c:03d}`) has `sizes[c]` items."""
    items, labels = [], []
    for label, size in enumerate(sizes):
        items += [f"k{label:03d}/{j:04d}" for j in range(size)]
        labels += [label] * size
    keys = tuple(f"k{c:03d}" for c in range(len(sizes)))
    return ImageIndex(name, keys, tuple(f"class {c}" for c in range(len(sizes))), tuple(items), tuple(labels), str)


def check_episode(sampler: MetaDatasetSampler, i: int, sizes: list[int], limits: EpisodeLimits) -> None:
    """Every published bound on episode `i`, and that its images are its classes', distinct."""
    episode = sampler.episode(i)
    chosen = [sizes[c] for c in episode.classes]
    assert limits.min_ways <= episode.ways <= min(limits.max_ways, len(sizes))
    assert len(set(episode.classes)) == episode.ways
    queries = {len(q) for q in episode.query}
    assert len(queries) == 1  # balanced
    (q,) = queries
    assert q == min(limits.max_queries, min(n // 2 for n in chosen))
    shots = [len(s) for s in episode.support]
    assert all(1 <= k <= n - q for k, n in zip(shots, chosen, strict=True))
    assert episode.ways <= sum(shots) <= limits.max_support
    for label, support, query in zip(episode.classes, episode.support, episode.query, strict=True):
        picked = support + query
        assert len(set(picked)) == len(picked)
        assert {sampler.index.labels[p] for p in picked} == {label}
    description = sampler.describe(i)
    assert (description.classes, description.shots, description.queries) == (episode.classes, tuple(shots), q)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_over_generated_class_sizes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [int(n) for n in rng.integers(2, 700, size=int(rng.integers(5, 80)))]
    sizes[0] = 2  # a class of two: at most one query, one shot
    sampler = MetaDatasetSampler(toy_index(sizes), seed)
    for i in range(60):
        check_episode(sampler, i, sizes, sampler.limits)


def test_large_classes_reach_the_caps() -> None:
    """Sixty classes of 600 images: some episodes are 50-way, the support total never passes 500 and queries are 10."""
    sizes = [600] * 60
    sampler = MetaDatasetSampler(toy_index(sizes), 3)
    descriptions = [sampler.describe(i) for i in range(400)]
    assert max(len(d.classes) for d in descriptions) == 50
    assert {d.queries for d in descriptions} == {10}
    assert max(sum(d.shots) for d in descriptions) <= 500
    assert any(sum(d.shots) > 400 for d in descriptions)
    assert PROTOCOLS[META_DATASET].largest(EpisodeSettings(5, 1, 15)) == EpisodeShape(50, 500, 500)


def test_classes_too_small_are_excluded_and_too_few_refused() -> None:
    sampler = MetaDatasetSampler(toy_index([1, 5, 5, 5, 5, 5]), 0)
    assert sampler.excluded_classes == ("k000",)
    assert all(0 not in sampler.episode(i).classes for i in range(20))
    with pytest.raises(DatasetError, match="at least 5 classes"):
        MetaDatasetSampler(toy_index([1, 5, 5, 5, 5]), 0)


def test_deterministic_per_seed_and_episode() -> None:
    index = toy_index([30, 8, 15, 40, 22, 9, 60])
    first, again = MetaDatasetSampler(index, 7), MetaDatasetSampler(index, 7)
    assert [first.episode(i) for i in (5, 0, 3)] == [again.episode(i) for i in (5, 0, 3)]
    assert first.episodes([0, 1]) == [again.episode(0), again.episode(1)]
    assert MetaDatasetSampler(index, 8).episode(0) != first.episode(0)


def test_hierarchy_episodes_are_one_nodes_leaves() -> None:
    """A toy hierarchy: node `small` spans 3 leaves (too few), `mid` 8, `wide` 70 (sub-sampled to 50), `huge` 400
    (too many leaves: never chosen)."""
    sizes = [12] * 400
    keys = [f"k{c:03d}" for c in range(400)]
    spans = {"small": keys[:3], "mid": keys[3:11], "wide": keys[11:81], "huge": keys}
    sampler = MetaDatasetSampler(toy_index(sizes), 0, ClassGroups(spans=spans))
    mid, wide = set(range(3, 11)), set(range(11, 81))
    seen = set()
    for i in range(80):
        classes = set(sampler.episode(i).classes)
        if classes == mid:
            seen.add("mid")
            assert list(sampler.episode(i).classes) == sorted(mid)  # leaves in key order, as Meta-Dataset
        else:
            assert classes <= wide and len(classes) == 50
            seen.add("wide")
    assert seen == {"mid", "wide"}
    with pytest.raises(DatasetError, match="no node"):
        MetaDatasetSampler(toy_index(sizes), 0, ClassGroups(spans={"small": keys[:3]}))


def test_alphabet_episodes_stay_inside_one_alphabet() -> None:
    sizes = [20] * 40
    keys = [f"k{c:03d}" for c in range(40)]
    alphabets = {"greek": keys[:6], "latin": keys[6:30], "runic": keys[30:]}
    sampler = MetaDatasetSampler(toy_index(sizes), 1, ClassGroups(alphabets=alphabets))
    members = [set(range(0, 6)), set(range(6, 30)), set(range(30, 40))]
    used = set()
    for i in range(90):
        classes = set(sampler.episode(i).classes)
        (home,) = [j for j, group in enumerate(members) if classes <= group]
        used.add(home)
        assert 5 <= len(classes) <= len(members[home])
    assert used == {0, 1, 2}
    with pytest.raises(DatasetError, match="alphabet 'tiny'"):
        MetaDatasetSampler(toy_index(sizes), 1, ClassGroups(alphabets={"tiny": keys[:4]}))


def test_registered_groups_reach_the_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    from cdfsl.data import md_sampler

    monkeypatch.setattr(md_sampler, "CLASS_GROUPS", {})
    index = toy_index([10] * 12, name="toy-alphabets")
    register_class_groups("toy-alphabets", lambda ix: ClassGroups(alphabets={"a": ix.class_keys[:6]}))
    sampler = build_sampler(META_DATASET, index, EpisodeSettings(5, 1, 15), 0)
    assert all(set(sampler.episode(i).classes) <= set(range(6)) for i in range(10))


def published_support_sizes(
    sizes: np.ndarray, count: int, rng: np.random.Generator, limits: EpisodeLimits
) -> np.ndarray:
    """Monte-Carlo of the published rules over `sizes` (one row per draw, vectorised): N uniform in
    [5, min(50, classes)], N classes without replacement, q = min(10, min ⌊n/2⌋),
    S = min(500, Σ ⌊β · min(100, n − q) + 1⌋) with β ~ U(0, 1), w = n · exp(U(log 0.5, log 2)),
    k = min(⌊w / Σw · (S − N)⌋ + 1, n − q); returns Σ k of each draw."""
    classes = len(sizes)
    ways = rng.integers(limits.min_ways, min(limits.max_ways, classes) + 1, size=count)
    chosen = rng.random((count, classes)).argsort(axis=1).argsort(axis=1) < ways[:, None]  # a random N-subset
    n = np.broadcast_to(sizes, (count, classes))
    q = np.minimum(limits.max_queries, np.where(chosen, n // 2, np.iinfo(np.int64).max).min(axis=1))[:, None]
    contributions = np.where(chosen, np.minimum(limits.max_support_per_class, n - q), 0)
    beta = rng.random(count)[:, None]
    total = np.minimum(np.where(chosen, np.floor(beta * contributions + 1), 0).sum(axis=1), limits.max_support)
    weights = np.where(chosen, n * np.exp(rng.uniform(limits.min_log_weight, limits.max_log_weight, n.shape)), 0)
    shots = np.floor(weights / weights.sum(axis=1, keepdims=True) * (total - ways)[:, None]) + 1
    return np.where(chosen, np.minimum(shots, n - q), 0).sum(axis=1)


def test_ten_thousand_episodes_follow_the_published_distribution() -> None:
    """10,000 episodes over 12 classes: ways against the uniform law on [5, 12] (chi-square), and the support size
    against a Monte-Carlo of the published rules (chi-square on the Monte-Carlo's decile bins)."""
    limits = EpisodeLimits()
    sizes = [40, 250, 60, 13, 300, 90, 24, 150, 31, 75, 400, 19]
    sampler = MetaDatasetSampler(toy_index(sizes), 11)
    descriptions = [sampler.describe(i) for i in range(10_000)]

    ways = np.asarray([len(d.classes) for d in descriptions])
    observed = np.bincount(ways, minlength=13)[5:13]
    assert stats.chisquare(observed).pvalue > 1e-3  # uniform on 5..12

    support = np.asarray([sum(d.shots) for d in descriptions])
    simulated = published_support_sizes(np.asarray(sizes), 100_000, np.random.default_rng(0), limits)
    edges = np.unique(np.quantile(simulated, np.linspace(0, 1, 11)))
    edges[0], edges[-1] = -math.inf, math.inf
    expected = np.histogram(simulated, edges)[0] / len(simulated) * len(support)
    assert stats.chisquare(np.histogram(support, edges)[0], expected).pvalue > 1e-3
    assert (support >= ways).all() and support.max() <= 500


def test_shots_follow_the_imbalance_weights() -> None:
    """Two classes of 100 and 400 images: the larger one's expected share of the S − N free shots is its share of
    n · exp(U(log 0.5, log 2)), 0.8 in expectation of the ratio's mean over many episodes (Monte-Carlo of the rule)."""
    limits = EpisodeLimits(min_ways=2)
    sampler = MetaDatasetSampler(toy_index([100, 400]), 5, limits=limits)
    shares = []
    for i in range(3000):
        d = sampler.describe(i)
        big = d.shots[d.classes.index(1)]
        free = sum(d.shots) - 2
        if free > 100:
            shares.append((big - 1) / free)
    rng = np.random.default_rng(1)
    u = np.exp(rng.uniform(limits.min_log_weight, limits.max_log_weight, size=(200_000, 2)))
    expected = float(np.mean(400 * u[:, 1] / (100 * u[:, 0] + 400 * u[:, 1])))
    assert abs(float(np.mean(shares)) - expected) < 0.015


def test_class_groups_from_a_sources_structure() -> None:
    """`ClassGroups.of` reads the readers' structures (labels of the index's classes): a hierarchy's nodes above two
    or more leaves, and alphabets."""

    class Hierarchy:  # the shape of `cdfsl.data.md_hierarchy.ClassHierarchy`
        spans: ClassVar[dict[str, tuple[int, ...]]] = {"n1": (0, 1, 2, 3, 4, 5), "n2": (2, 3), "leaf": (4,)}

        def span_nodes(self, low: int, high: int) -> tuple[str, ...]:
            return tuple(sorted(n for n, leaves in self.spans.items() if low <= len(leaves) <= high))

        def leaves_under(self, node: str) -> tuple[int, ...]:
            return self.spans[node]

    class Alphabets:  # the shape of `cdfsl.data.md_hierarchy.Alphabets`
        labels_of: ClassVar[dict[str, tuple[int, ...]]] = {"greek": (0, 1), "latin": (2, 3, 4, 5)}

    keys = tuple(f"k{c:03d}" for c in range(6))
    assert ClassGroups.of(Hierarchy(), keys) == ClassGroups(spans={"n1": keys, "n2": ("k002", "k003")})
    assert ClassGroups.of(Alphabets(), keys) == ClassGroups(alphabets={"greek": keys[:2], "latin": keys[2:]})
    assert ClassGroups.of(None, keys) is None
