"""Shard prefetch for the training dataset: download what the next steps of the epoch plan need.

The epoch plan (`plan.py`) says ahead which rows every step reads, so the shards behind them are
known before the step is built. `ShardPrefetcher` runs `StreamingDataset.prepare_shard` for the
shards of a reader's next `lookahead` steps in a small thread pool while the current step trains;
the rows are still read by `StreamingDataset.__getitem__` in plan order, so batches are exactly
the same with prefetch on or off (docs/architecture.md §Prefetch and the bounded cache).

With a `cache_limit` it also keeps the window inside the cache: the window stops growing at
`budget_bytes` of shards, and shards the plan has finished with are released (made the coldest),
so Streaming's LRU eviction takes them first. (Streaming counts a shard only once it is
downloaded, so parallel downloads could each see the same free space: the dataset gives
Streaming a limit lowered by one largest shard per download thread, see cache_limit.py.) A failed
background download is only logged: the step's own read downloads again in the training thread
and raises there, with the step in the message, as without prefetch. Releasing a shard and the
reset after a failed download write Streaming's private state (streaming_internals.py).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np
from streaming import StreamingDataset

from m3composer.data.streaming_internals import release_shards, unstick_shard

log = logging.getLogger(__name__)


def shard_is_local(sd: StreamingDataset, shard_id: int) -> bool:
    """Whether the shard's decompressed files are in the local cache (read without a download)."""
    shard = sd.shards[shard_id]
    stream = sd.streams[sd.stream_per_shard[shard_id]]
    return all(os.path.isfile(os.path.join(stream.local, stream.split or "", raw.basename))
               for raw, _ in shard.file_pairs)


class ShardPrefetcher:
    """Background downloads of the shards of a reader's coming steps; see the module docstring.

    Args:
        sd: the StreamingDataset the rows are read from.
        step_shards: shard ids each step of `steps` reads (this reader's rows), in serving order.
        lookahead: how many steps after the current one to download ahead.
        workers: download threads.
        budget_bytes: when set, the window's shards (Streaming's `get_max_size`: zip + raw) stay
            within it; the current step is always prefetched.
        release_after: position -> shard ids the plan has finished with once that step is built.
    """

    def __init__(self, sd: StreamingDataset, step_shards: Sequence[np.ndarray], *, lookahead: int, workers: int,
                 budget_bytes: int | None = None, release_after: Mapping[int, np.ndarray] | None = None):
        if lookahead < 0 or workers < 1:
            raise ValueError(f"lookahead must be >= 0 and workers >= 1, got {lookahead}, {workers}")
        self.sd = sd
        self.step_shards = [np.unique(np.asarray(s, dtype=np.int64)) for s in step_shards]
        self.lookahead = lookahead
        self.budget_bytes = budget_bytes
        self.release_after = release_after or {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m3c-prefetch")
        self._futures: dict[int, Future] = {}
        self._count = threading.Lock()
        self._next = 0                  # first position not yet submitted
        self._closed = False
        self.wait_s = 0.0               # time the reader waited for its step's downloads
        self.downloads = 0              # shards this prefetcher downloaded (not already local)
        self.failures = 0

    # ---- the reader's side ---------------------------------------------------------------------
    def before_step(self, position: int) -> None:
        """Submit the window from `position` on, then wait for `position`'s own shards."""
        self._submit_window(position)
        start = time.perf_counter()
        for shard_id in self.step_shards[position]:
            future = self._futures.get(int(shard_id))
            if future is not None:
                future.exception()      # a failure is retried by the read itself
        self.wait_s += time.perf_counter() - start

    def after_step(self, position: int) -> None:
        """The step is built: release what the plan has finished with, forget its finished futures."""
        finished = self.release_after.get(position)
        if finished is not None and len(finished):
            release_shards(self.sd, finished)
        for shard_id in self.step_shards[position]:
            future = self._futures.get(int(shard_id))
            if future is not None and future.done():
                del self._futures[int(shard_id)]

    def close(self) -> None:
        """Cancel what has not started and wait for the downloads in flight (bounded by the download
        timeout): a download cut off at exit would leave the shard 'preparing' in Streaming's shared
        state, and the next reader of that shard would wait for it forever."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the window ----------------------------------------------------------------------------
    def _submit_window(self, position: int) -> None:
        self._next = max(self._next, position)
        last = min(position + self.lookahead, len(self.step_shards) - 1)
        if self._next > last:
            return
        window = {int(s) for p in range(position, self._next) for s in self.step_shards[p]}
        size = sum(self.sd.shards[s].get_max_size() for s in window)
        while self._next <= last:
            new = [int(s) for s in self.step_shards[self._next] if int(s) not in window]
            extra = sum(self.sd.shards[s].get_max_size() for s in new)
            if self._next > position and self.budget_bytes is not None and size + extra > self.budget_bytes:
                break                   # the rest waits until the window moves on
            for shard_id in new:
                window.add(shard_id)
                if shard_id not in self._futures:
                    self._futures[shard_id] = self._pool.submit(self._prepare, shard_id)
            size += extra
            self._next += 1

    def _prepare(self, shard_id: int) -> None:
        try:
            if not shard_is_local(self.sd, shard_id):
                with self._count:
                    self.downloads += 1
            self.sd.prepare_shard(shard_id)      # downloads, or touches a local shard (LRU)
        except Exception as err:
            with self._count:
                self.failures += 1
            log.warning("prefetch of shard %d failed (the step's read retries it): %s: %s", shard_id,
                        type(err).__name__, err)
            unstick_shard(self.sd, shard_id)
            raise
