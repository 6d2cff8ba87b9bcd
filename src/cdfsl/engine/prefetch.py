"""A fed pipeline: the next batch of episodes decoded, augmented and copied while the current one trains.

`BatchFeed` builds batches of a run context (`RunContext.batch`) in one background thread. A caller announces the
episodes it will want next (`prepare`) and later takes them (`take`): a batch announced earlier is waited for, one
never announced is built at once in the calling thread. Decoding releases the GIL in Pillow, and on CUDA the
augmentation runs on the device and the copies come from pinned memory without blocking (`data.episodes.to_device`),
so the training thread keeps the device busy meanwhile: with a slow loader a run takes about max(load, train) per
batch instead of their sum (`benchmarks/pipeline_overlap.py`).

Results do not change: a batch depends only on its episodes' indices (each episode's views come from its own seeded
stream, `seeding.torch_stream`), never on the thread that built it or on when. An announcement is a guess that may
be wrong (the runner guesses the episodes it will claim next; another process may claim them first): a batch
announced and never taken is dropped, and an error while building it (a file that fails to decode, an interrupt)
reaches the caller only when that batch is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

Key = tuple[tuple[int, ...], bool]
T = TypeVar("T")


class BatchFeed(Generic[T]):
    """Batches built by `build(episodes, with_views)`, each one announced ahead built in a background thread.

    One thread only, so batches are built in the order they are announced and at most one builds beside the
    training thread (memory: one batch ahead). Use as a context manager, or `close` it: the thread ends after the
    batch it builds, if any.
    """

    def __init__(self, build: Callable[[list[int], bool], T]) -> None:
        self._build = build
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[Key, Future[T]] = {}

    def prepare(self, episodes: Sequence[int], with_views: bool = True) -> None:
        """Start building the batch of `episodes` in the background (nothing when it is announced already)."""
        key = (tuple(episodes), with_views)
        if not episodes or key in self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cdfsl-feed")
        self._pending[key] = self._pool.submit(self._build, list(episodes), with_views)

    def take(self, episodes: Sequence[int], with_views: bool = True) -> T:
        """The batch of `episodes`: the one built ahead (waited for; its build error raised here), else built now.

        Batches announced before this one and not taken are dropped: the caller has moved past them."""
        key = (tuple(episodes), with_views)
        future = self._pending.pop(key, None)
        self._drop_all()
        if future is None:
            return self._build(list(episodes), with_views)
        return future.result()

    def _drop_all(self) -> None:
        for future in self._pending.values():
            future.cancel()  # one already building finishes in the background and is forgotten
        self._pending.clear()

    def close(self) -> None:
        """Drop what is announced and end the thread without waiting for a batch in progress."""
        self._drop_all()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> BatchFeed[T]:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def fed(feed: BatchFeed[T], groups: Iterable[Sequence[int]], with_views: bool = True) -> Iterator[T]:
    """The batch of each group of episodes in turn, the next group's built while the caller works on this one."""
    groups = [list(group) for group in groups]
    for position, group in enumerate(groups):
        batch = feed.take(group, with_views)
        if position + 1 < len(groups):
            feed.prepare(groups[position + 1], with_views)
        yield batch
