"""Every use of Streaming's private attributes, in one place: check this module when Streaming is upgraded.

Written against Streaming 0.13.0 (the version pyproject.toml pins). Streaming has no public call for
what these do: give a dropped `StreamingDataset`'s shared memory back, age a shard in its LRU
eviction order, or reset a shard left 'preparing' by a failed download. Each function says what it
relies on and does nothing where the attribute is missing, so another version degrades to
Streaming's own behaviour instead of failing.
"""
from __future__ import annotations

import atexit
import fcntl
import os
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch.distributed
from streaming import StreamingDataset


def release_shared_memory_when_dropped(sd: StreamingDataset) -> None:
    """Give back `sd`'s shared-memory blocks when it is garbage-collected, instead of at process exit.

    Streaming registers every block it creates with `atexit`, so a dropped StreamingDataset keeps its
    file descriptors and /dev/shm blocks until the process ends (measured: 6 datasets opened and
    dropped in turn, 19 → 259 descriptors; with this, 19 at each). Called through
    `open_releasing_shared_memory`, with the prefix search's own attachments closed there
    (docs/recipe.md §Streaming's shared memory).
    """
    blocks = [sd._locals_shm, sd._shared_barrier._arr.shm, sd._next_epoch.arr.shm, sd._cache_usage.arr.shm,
              sd._shard_states.shm, sd._shard_access_times.shm]   # all it makes when read by index
    weakref.finalize(sd, _release_shared_memory, blocks)


_PREFIX_SEARCH = threading.Lock()
PREFIX_LOCK_FILE = "m3composer-streaming-prefix.lock"   # in the node's temp dir, where Streaming keeps its locks


def _prefix_lock_path() -> str:
    return os.path.join(tempfile.gettempdir(), PREFIX_LOCK_FILE)


_held_here = threading.Event()     # this process holds the node's prefix lock (one holder: _PREFIX_SEARCH)
RELEASE_LOCK_WAIT_S = 10.0         # how long a release waits for another job's dataset to open


def _several_ranks() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


@contextmanager
def node_prefix_lock() -> Iterator[None]:
    """Hold the node's shared-memory prefix lock while this job's ranks build their datasets.

    Streaming 0.13.0's `get_shm_prefix` has every rank walk /dev/shm on its own for the first free
    prefix, then the node's local leader registers it and the other ranks look it up. Nothing stops
    another job on the same node from registering that prefix in between: its ranks then disagree
    ("shared memory registered does not match local leader", seen with a second training job started
    at the same moment). Here each node's local leader (LOCAL_RANK 0, or a plain process) takes an
    exclusive `flock` first, and every rank passes a barrier before building and another after, so the
    walks, the registration and the look-ups of one job never interleave with another's that does the
    same. A StreamingDataset is built by all ranks together already (its own barriers), so the two
    barriers add no new collective. docs/recipe.md §Streaming's shared memory.
    """
    handle = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        handle = open(_prefix_lock_path(), "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        _held_here.set()
    try:
        if _several_ranks():
            torch.distributed.barrier()
        yield
        if _several_ranks():
            torch.distributed.barrier()
    finally:
        if handle is not None:
            _held_here.clear()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def open_without_prefix_search_leaks(open_dataset: Callable[[], StreamingDataset]) -> StreamingDataset:
    """`open_dataset()`, with the blocks it attached to while choosing its shared-memory prefix closed
    again, instead of keeping their descriptors open until the process exits.

    Streaming 0.13.0's `get_shm_prefix` (streaming/base/shared/prefix.py) walks every prefix that
    exists on the machine and, for each of its six block names, attaches to that prefix's block; each
    attachment registers its cleanup with `atexit`, so its descriptor stays open until exit. Every
    dataset opened while a prefix exists, live or stale (left by a killed process), then costs six
    descriptors for good: a suite or a notebook that opens hundreds of datasets runs out of them. The
    walk only reads the blocks; the one attachment kept is a non-leader rank's to its own prefix's
    `locals` block (the dataset's `_locals_shm`). So this records the walk's attachments (prefix.py's
    `SharedMemory` swapped for a recording subclass while the dataset is built) and closes the
    others. Nothing is unlinked: every process sees the same blocks as before (docs/recipe.md
    §Streaming's shared memory).
    """
    from streaming.base.shared import prefix as prefix_module

    original = getattr(prefix_module, "SharedMemory", None)
    if original is None:                 # another Streaming version: its own behaviour stays
        with node_prefix_lock():
            return open_dataset()
    attached: list = []

    class Recorded(original):
        def __init__(self, name=None, create=None, size=0, auto_cleanup=True):
            super().__init__(name, create, size, auto_cleanup)
            if create is False:
                attached.append(self)

    sd = None
    with _PREFIX_SEARCH, node_prefix_lock():
        prefix_module.SharedMemory = Recorded
        try:
            sd = open_dataset()
        finally:                         # a dataset that failed to open leaves no attachment behind either
            prefix_module.SharedMemory = original
            own = getattr(sd, "_locals_shm", None)
            for block in attached:
                if block is not own:
                    atexit.unregister(block.cleanup)
                    block.cleanup()
    return sd


def open_releasing_shared_memory(open_dataset: Callable[[], StreamingDataset]) -> StreamingDataset:
    """`open_dataset()` without the prefix search's leaked descriptors, its own blocks given back when it
    is collected: how every StreamingDataset in this project (and its tests and benchmarks) is opened."""
    sd = open_without_prefix_search_leaks(open_dataset)
    release_shared_memory_when_dropped(sd)
    return sd


def _release_shared_memory(blocks: list) -> None:
    """Close the blocks (unlinking those this process created), unless several ranks are running: the
    ranks of a node pick a common prefix by which blocks exist, and a release at each rank's own GC
    time could make them pick different ones; there Streaming's release at exit stays."""
    if _several_ranks():
        return
    # Unlinking while another job on the node walks the prefixes could make its ranks disagree, so it
    # happens under the node's prefix lock. This process may hold it already (a garbage collection
    # inside an open: waiting would deadlock), or another job may hold it past the wait: then the
    # blocks are left to exit, as Streaming does.
    if _held_here.is_set():
        return
    with open(_prefix_lock_path(), "a") as handle:
        deadline = time.monotonic() + RELEASE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline or _held_here.is_set():
                    return
                time.sleep(0.05)
        try:
            for block in blocks:
                atexit.unregister(block.cleanup)
                try:
                    block.cleanup()
                except BufferError:  # a numpy view of it is still alive: leave it to exit, as Streaming does
                    atexit.register(block.cleanup)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def release_shards(sd: StreamingDataset, shard_ids) -> None:
    """Make shards the coldest in the cache, so that eviction takes them first; nothing is deleted.

    Streaming 0.13.0 picks the shard with the oldest access time in its shared-memory array
    (`_evict_coldest_shard`) and has no public call to age one, so this writes that array: 1 ns
    after the epoch, older than any real access (0.13.0's `NEVER`, for evicted shards, is far in
    the future). A released shard still needed by another reader is, at worst, downloaded again.
    """
    times = getattr(sd, "_shard_access_times", None)
    if times is None:       # another Streaming version: eviction stays plain LRU
        return
    for shard_id in shard_ids:
        times[int(shard_id)] = 1


def unstick_shard(sd: StreamingDataset, shard_id: int) -> None:
    """After a failed `prepare_shard`: put the shard back to 'remote' so that the next read tries again.

    Streaming 0.13.0 leaves a shard whose download or decompression raised in its 'preparing'
    state, and every later `prepare_shard` of it waits for that to end, forever (its own iterator
    stops the epoch instead). There is no public reset (`evict_shard` would also delete the files,
    the data itself when it is read in place), so this sets the shared state under Streaming's lock.
    """
    from streaming.base.dataset import _ShardState

    lock, states = getattr(sd, "_cache_filelock", None), getattr(sd, "_shard_states", None)
    if lock is None or states is None:
        return
    with lock:
        if states[shard_id] == _ShardState.PREPARING:
            states[shard_id] = _ShardState.REMOTE
