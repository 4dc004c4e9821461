"""Shard checks: the hashes `m3c convert` writes into every shard, verified when the shards are read.

Shards written with `SHARD_HASH` are verified on first read: Streaming checks a compressed shard
when it decompresses it (`validate_hash`, switched on per stream by `enable_hash_checks`), and
`ShardVerifier` the decompressed file once per process (it may have sat in the cache since an
earlier run). Streams written without hashes are read as before, unverified.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from streaming import StreamingDataset

from m3composer.data.index import SHARD_HASH, StreamEntry

log = logging.getLogger(__name__)


def enable_hash_checks(sd: StreamingDataset, streams: list[StreamEntry], where: str) -> None:
    """Have Streaming check each compressed shard of the streams whose shards all carry `SHARD_HASH`."""
    unhashed = []
    for stream_id, (entry, stream) in enumerate(zip(streams, sd.streams)):
        pairs = [pair for shard, sid in zip(sd.shards, sd.stream_per_shard) if sid == stream_id
                 for pair in shard.file_pairs]
        if all(SHARD_HASH in info.hashes for pair in pairs for info in pair if info is not None):
            stream.validate_hash = SHARD_HASH
        else:
            unhashed.append(entry.name)
    if unhashed:
        log.info("%s: streams %s were converted without shard hashes and are read unverified; convert again "
                 "to verify them", where, unhashed)


class ShardVerifier:
    """Hashes each read shard's decompressed files once per process (`check` after each read)."""

    def __init__(self, sd: StreamingDataset):
        self.sd = sd
        self._verified: set[int] = set()   # shards whose files this process has hashed

    def check(self, shard: int) -> None:
        if shard in self._verified:
            return
        try:
            verify_shard(self.sd, shard)
            self._verified.add(shard)
        except FileNotFoundError:   # evicted since the read (data.cache_limit): checked at its next read
            pass


def shard_files(sd: StreamingDataset, shard_id: int) -> list[tuple[str, Any]]:
    """(local path, FileInfo) of the decompressed files of one shard."""
    stream = sd.streams[sd.stream_per_shard[shard_id]]
    return [(os.path.join(stream.local, stream.split or "", raw.basename), raw)
            for raw, _ in sd.shards[shard_id].file_pairs]


def shard_name(sd: StreamingDataset, shard_id: int) -> str:
    """The shard's file name as its MDS index lists it (the compressed one when there is one)."""
    raw, packed = sd.shards[shard_id].file_pairs[0]
    return (packed or raw).basename


def verify_shard(sd: StreamingDataset, shard_id: int) -> None:
    """Hash the decompressed files of a shard of a verified stream; a mismatch names the file."""
    from streaming.base.hashing import get_hash

    if not sd.streams[sd.stream_per_shard[shard_id]].validate_hash:
        return
    for path, info in shard_files(sd, shard_id):
        with open(path, "rb") as f:
            digest = get_hash(SHARD_HASH, f.read())
        if digest != info.hashes[SHARD_HASH]:
            raise ValueError(f"{path}: corrupt shard ({SHARD_HASH} {digest}, its MDS index says "
                             f"{info.hashes[SHARD_HASH]}); delete it from the cache to download it again")
