"""Episode sampler: hand-checkable episode shape, class exclusion, and the determinism contract."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cdfsl.data.index import Episode, ImageIndex
from cdfsl.data.readers import load_index
from cdfsl.data.sampler import EpisodeSampler
from cdfsl.errors import ConfigError, DatasetError

DIGITS = load_index("digits", None)


def synthetic_index(counts: Sequence[int]) -> ImageIndex:
    """An index with `counts[c]` items in class `c` (keys only; the loader is never called)."""
    pairs = sorted((label, f"c{label}/{n:04d}.png") for label, count in enumerate(counts) for n in range(count))
    return ImageIndex(
        name="synthetic",
        class_keys=tuple(f"c{c}" for c in range(len(counts))),
        class_names=tuple(f"class {c}" for c in range(len(counts))),
        items=tuple(key for _, key in pairs),
        labels=tuple(label for label, _ in pairs),
        loader=lambda key: Image.new("RGB", (1, 1)),
    )


def check_episode(episode: Episode, index: ImageIndex, ways: int, shots: int, queries: int) -> None:
    """Sizes, distinct classes, distinct images, disjoint support/query, items of the right class."""
    assert episode.ways == ways and len(set(episode.classes)) == ways
    assert len(episode.support) == len(episode.query) == ways
    everything: list[int] = []
    for label, support, query in zip(episode.classes, episode.support, episode.query, strict=True):
        assert len(support) == shots and len(query) == queries
        assert not set(support) & set(query)
        assert all(index.labels[p] == label for p in (*support, *query))
        everything += [*support, *query]
    assert len(set(everything)) == len(everything) == ways * (shots + queries)
    assert all(type(x) is int for x in (episode.index, *episode.classes, *everything))


@pytest.mark.parametrize(("shots", "queries"), [(1, 15), (5, 15), (3, 1)])
def test_digits_episodes_are_well_formed(shots: int, queries: int) -> None:
    sampler = EpisodeSampler(DIGITS, ways=5, shots=shots, queries=queries, seed=1)
    assert sampler.excluded_classes == ()
    for episode in sampler.episodes(range(20)):
        check_episode(episode, DIGITS, 5, shots, queries)
    assert [e.index for e in sampler.episodes([7, 3])] == [7, 3]


def test_all_ways_and_whole_class() -> None:
    index = synthetic_index([4, 4, 4])
    episode = EpisodeSampler(index, ways=3, shots=1, queries=3, seed=0).episode(0)
    check_episode(episode, index, 3, 1, 3)
    assert sorted(episode.classes) == [0, 1, 2]
    for label, support, query in zip(episode.classes, episode.support, episode.query, strict=True):
        assert sorted((*support, *query)) == index.items_by_class()[label]


def test_classes_with_too_few_images_are_excluded() -> None:
    index = synthetic_index([3, 20, 19, 20, 25, 20, 20])
    sampler = EpisodeSampler(index, ways=5, shots=5, queries=15, seed=0)
    assert sampler.excluded_classes == ("c0", "c2")
    assert sampler.eligible_classes == (1, 3, 4, 5, 6)
    seen = {c for e in sampler.episodes(range(30)) for c in e.classes}
    assert seen == {1, 3, 4, 5, 6}


def test_fewer_eligible_classes_than_ways() -> None:
    index = synthetic_index([3, 20, 19, 20, 20, 20])
    with pytest.raises(DatasetError) as error:
        EpisodeSampler(index, ways=5, shots=5, queries=15, seed=0)
    message = str(error.value)
    assert "only 4 of 6 classes" in message
    assert "c0 (3), c2 (19)" in message
    assert "at least 20 images" in message and "fewer ways, shots or queries" in message
    assert EpisodeSampler(index, ways=5, shots=1, queries=15, seed=0).excluded_classes == ("c0",)


@pytest.mark.parametrize(
    "kwargs",
    [{"ways": 0}, {"shots": 0}, {"queries": 0}, {"seed": -1}, {"ways": 2.0}, {"shots": True}],
)
def test_bad_shape_is_a_config_error(kwargs: dict[str, object]) -> None:
    arguments = {"ways": 2, "shots": 1, "queries": 1, "seed": 0} | kwargs
    with pytest.raises(ConfigError):
        EpisodeSampler(synthetic_index([5, 5]), **arguments)  # type: ignore[arg-type]


def test_negative_episode_index() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        EpisodeSampler(DIGITS, ways=5, shots=1, queries=1, seed=0).episode(-1)


def test_pinned_episode() -> None:
    """Changing the sampling algorithm changes every stored result; this pins it."""
    episode = EpisodeSampler(synthetic_index([6] * 8), ways=3, shots=1, queries=2, seed=0).episode(0)
    assert episode == PINNED


PINNED = Episode(index=0, classes=(2, 1, 5), support=((17,), (10,), (32,)), query=((13, 16), (8, 7), (30, 34)))


@settings(max_examples=20, deadline=None)
@given(
    order=st.permutations(list(range(12))),
    seed=st.integers(0, 2**31),
    shots=st.sampled_from([1, 5]),
)
def test_episode_does_not_depend_on_request_order(order: list[int], seed: int, shots: int) -> None:
    forward = EpisodeSampler(DIGITS, ways=5, shots=shots, queries=15, seed=seed)
    other = EpisodeSampler(DIGITS, ways=5, shots=shots, queries=15, seed=seed)
    in_order = forward.episodes(range(12))
    shuffled = {e.index: e for e in other.episodes(order)}
    assert in_order == [shuffled[i] for i in range(12)]
    assert [forward.episode(i) for i in reversed(range(12))] == in_order[::-1]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), other=st.integers(0, 2**31), i=st.integers(0, 10_000))
def test_episode_depends_on_seed_and_index(seed: int, other: int, i: int) -> None:
    index = synthetic_index([30] * 12)
    first = EpisodeSampler(index, ways=5, shots=5, queries=15, seed=seed)
    assert first.episode(i) == EpisodeSampler(index, ways=5, shots=5, queries=15, seed=seed).episode(i)
    assert first.episode(i) != first.episode(i + 1)
    if other != seed:
        assert first.episode(i) != EpisodeSampler(index, ways=5, shots=5, queries=15, seed=other).episode(i)


def test_episode_depends_on_index_content_not_loader() -> None:
    """Two indexes with equal content (a reloaded dataset) give equal episodes."""
    first = EpisodeSampler(DIGITS, ways=5, shots=1, queries=15, seed=3).episodes(range(5))
    again = EpisodeSampler(load_index("digits", None), ways=5, shots=1, queries=15, seed=3).episodes(range(5))
    assert first == again
