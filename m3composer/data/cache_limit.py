"""The bounded shard cache (`data.cache_limit`): a node's shards stay under the limit while the plan is read.

Streaming evicts the least recently used shards before each download when it has a `cache_limit`.
Three things keep a run inside the limit (docs/architecture.md §Prefetch and the bounded cache):
(1) at each epoch's plan, the shards one step reads on the node must fit (`check_plan`); (2) each
reader's prefetch window stops growing at its share of the cache; (3) the shards whose last use in
the epoch (any rank of the node) was a step are released after it (`reader_window`). Streaming
counts a shard only once it is downloaded, so it is given the limit less one largest shard per
other download thread of the node: the bytes on disk then stay under `cache_limit`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from streaming import StreamingDataset

from m3composer.data.plan import EpochPlan

ShardsOfRows = Callable[[int, np.ndarray], np.ndarray]   # (group, group-local rows) -> distinct shard ids


class CacheBound:
    """`cache_limit` bytes for this node's shard cache, applied to `sd` (see the module docstring).

    Args:
        sd: the StreamingDataset the rows are read from; its `cache_limit` is set here.
        cache_limit: the node's limit in bytes.
        shard_bytes: each shard's size on disk (Streaming's `get_max_size`: zip + raw).
        rank, local_world_size: this rank, and the ranks of its node (they share the cache).
        threads_per_rank: download threads of one rank (its reader and its prefetch threads).
        train_data, where: the dataset and its index, for messages.
    """

    def __init__(self, sd: StreamingDataset, cache_limit: int, shard_bytes: np.ndarray, *, rank: int,
                 local_world_size: int, threads_per_rank: int, train_data: str, where: str):
        self.sd, self.cache_limit, self.shard_bytes = sd, cache_limit, shard_bytes
        self.rank, self.local_world_size = rank, local_world_size
        self.train_data = train_data
        sd.cache_limit = self._streaming_cache_limit(local_world_size * threads_per_rank, where)

    def _streaming_cache_limit(self, threads: int, where: str) -> int:
        """The limit Streaming evicts against: `cache_limit` less one largest shard per other download
        that can be in flight on the node (Streaming counts a shard only once it is downloaded, so
        each concurrent download sees the same free space). Then the disk stays under `cache_limit`."""
        biggest = int(self.shard_bytes.max())
        limit = self.cache_limit - (threads - 1) * biggest
        if limit < 4 * biggest:     # Streaming's own minimum, for the limit it is given
            raise ValueError(f"{where}: data.cache_limit={self.cache_limit} is too low: {threads} download threads "
                             f"on this node and shards of up to {biggest} bytes (zip + raw) need at least "
                             f"{(threads + 3) * biggest} bytes")
        return limit

    def room(self) -> int:
        """Bytes of shards that fit beside the streams' MDS indexes (which stay in the cache)."""
        return self.sd.cache_limit - sum(stream.get_index_size() for stream in self.sd.streams)

    def node_rows(self, step) -> np.ndarray:
        """Rows of a step that this node's ranks read (they share the node's shard cache)."""
        first = self.rank - self.rank % self.local_world_size
        return step.rows[first * step.per_rank:(first + self.local_world_size) * step.per_rank]

    def check_plan(self, plan: EpochPlan, shards_of_rows: ShardsOfRows, group_names: Sequence[str]) -> None:
        """Every step's shards on this node must fit in the cache at once, or the run could not go on."""
        room = self.room()
        for i, step in enumerate(plan.steps):
            shards = shards_of_rows(step.group, self.node_rows(step))
            need = int(self.shard_bytes[shards].sum())
            if need > room:
                raise ValueError(
                    f"{self.train_data}: data.cache_limit={self.cache_limit} bytes cannot hold one step: epoch "
                    f"{plan.epoch} step {i} (group {group_names[step.group]}) reads {len(shards)} shards of "
                    f"{need} bytes (zip + raw) on this node, {room} bytes fit beside the stream indexes; raise "
                    "cache_limit, write smaller shards, or use data.plan=shard_blocks")

    def reader_window(self, plan: EpochPlan, steps: range, num_workers: int,
                      shards_of_rows: ShardsOfRows) -> tuple[int, dict[int, list[int]]]:
        """A reader's prefetch budget (its share of the cache: every reader of the node has a window), and
        position in `steps` -> the shards whose last use on the node is that step (released after it)."""
        budget = self.room() // (self.local_world_size * max(1, num_workers))
        last_use = np.full(len(self.shard_bytes), -1, dtype=np.int64)
        for i, step in enumerate(plan.steps):
            last_use[shards_of_rows(step.group, self.node_rows(step))] = i
        position = {s: p for p, s in enumerate(steps)}
        release: dict[int, list[int]] = {}
        for shard, s in enumerate(last_use):
            if int(s) in position:
                release.setdefault(position[int(s)], []).append(shard)
        return budget, release
