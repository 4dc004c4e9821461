"""Opening the training data: the converted streams of `m3_index.json` as one `StreamingDataset`.

`M3TrainDataset` reads rows by global index from one StreamingDataset over all streams
(docs/architecture.md §Training data: our own epoch plan over random access). Opening it checks
what a reader can check before the first step: every stream's MDS row count against the index (a
half-uploaded stream would otherwise give a short epoch) and the shard hashes' presence
(`shard_checks.py`). A store that cannot be read raises `DataReadError` naming the dataset and the
stream.
"""
from __future__ import annotations

import logging
import os

from streaming import Stream, StreamingDataset

from m3composer.data.index import StreamEntry, is_remote, read_streams
from m3composer.data.shard_checks import enable_hash_checks
from m3composer.data.streaming_internals import open_releasing_shared_memory

log = logging.getLogger(__name__)


class DataReadError(RuntimeError):
    """The training data cannot be read: a failing store or a corrupt shard. The message names the
    dataset and the stream (and, mid-epoch, the shard, epoch and step); the library error is its cause."""


def streams_with_rows(train_data: str, local_cache: str | None, where: str) -> list[StreamEntry]:
    """The index's streams that have rows (empty ones are logged and skipped)."""
    if is_remote(train_data) and local_cache is None:
        raise ValueError(f"{train_data} is remote: pass `local_cache`, a cache dir for its shards")
    _, entries = read_streams(train_data, local_cache)
    for e in entries:
        if e.rows <= 0:
            log.warning("%s: stream %s has no rows; skipped", where, e.name)
    streams = [e for e in entries if e.rows > 0]
    if not streams:
        raise ValueError(f"{where}: no stream with rows")
    return streams


def open_streaming_dataset(train_data: str, local_cache: str | None, streams: list[StreamEntry], where: str, *,
                           download_retry: int, download_timeout: float,
                           cache_limit: int | None) -> StreamingDataset:
    """One StreamingDataset over all streams, read by global index; its row counts must match the index,
    and the streams whose shards carry hashes are verified when read (`shard_checks.py`)."""
    root = train_data.rstrip("/")
    remote = is_remote(train_data) or local_cache
    locals_ = [os.path.join(local_cache, s.path) if local_cache else os.path.join(root, s.path) for s in streams]
    try:
        sd = open_releasing_shared_memory(lambda: StreamingDataset(
            streams=[Stream(remote=f"{root}/{s.path}" if remote else None, local=local)
                     for s, local in zip(streams, locals_)],
            batch_size=1, shuffle=False, download_retry=download_retry, download_timeout=download_timeout,
            cache_limit=cache_limit))
    except ValueError as err:
        if cache_limit and "cache limit" in str(err).lower():
            raise                   # a limit too low for the data: M3TrainDataset names data.cache_limit
        raise DataReadError(f"{train_data}: cannot open its streams: {type(err).__name__}: {one_line(err)}") from err
    except Exception as err:  # Streaming reads every stream's MDS index.json here, in stream order
        failed = next((s for s, local in zip(streams, locals_)
                       if not os.path.exists(os.path.join(local, "index.json"))), None)
        which = f"stream {failed.name} ({root}/{failed.path}/index.json)" if failed else "its streams"
        raise DataReadError(f"{train_data}: cannot open {which} (download_retry={download_retry}, "
                            f"download_timeout={download_timeout}s): {type(err).__name__}: {one_line(err)}") from err
    for s, n in zip(streams, sd.samples_per_stream):
        if int(n) != s.rows:
            raise ValueError(f"{where}: stream {s.name} lists {s.rows} rows but its MDS index has {int(n)}")
    enable_hash_checks(sd, streams, where)
    return sd


def one_line(err: BaseException) -> str:
    """An exception's message on one line (library messages span several)."""
    return " ".join(str(err).split())
