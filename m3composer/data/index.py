"""`m3_index.json`: the table of contents of a converted dataset, written by `m3c convert` last.

Its presence means the conversion finished; `docs/architecture.md` §MDS stream layout shows the
file. One `StreamEntry` per Streaming stream (task × length bucket) is both what the converter
writes (`StreamEntry.to_json`) and what the dataset reads back (`StreamEntry.from_json`), so the
two sides cannot drift apart. Local folders and object stores (`s3://...`) are read alike.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from m3composer.fsutil import write_json_atomic

INDEX_FILE = "m3_index.json"
INDEX_VERSION = 2
# The hash `m3c convert` records for every shard file (raw and compressed) in each stream's MDS
# index.json, and the dataset verifies on first read. Datasets converted before it have none and
# are read unverified; the MDS index says which, so m3_index.json needs no new field.
SHARD_HASH = "xxh64"
# Version 1 (before 2026-12) named two stream fields differently; it is still read.
V1_NAMES = {"has_scores": "has_teacher_scores", "parallel": "is_parallel"}


# botocore error codes of an absent object (Streaming's and Composer's S3 clients use the same list).
NOT_FOUND_CODES = ("403", "404", "NoSuchKey")


def is_remote(location: str | os.PathLike) -> bool:
    """True for object-store URLs such as s3://bucket/prefix (not for local paths)."""
    return len(urllib.parse.urlparse(str(location)).scheme) > 1


@dataclass
class TokenStats:
    """Token counts of a stream (ids include <s> and </s>, no instruction)."""
    query_tokens: int = 0
    passage_tokens: int = 0
    passages: int = 0
    query_len_max: int = 0
    query_len_mean: float = 0.0
    passage_len_max: int = 0
    passage_len_mean: float = 0.0
    row_len_max: int = 0


@dataclass
class StreamEntry:
    """One stream of the index: where it is, what its rows hold, how long they are."""
    name: str                         # "<task>/<bucket>"
    path: str                         # relative to the dataset root
    task: str
    bucket: str                       # e.g. "len-0-500"
    rows: int
    is_parallel: bool                 # a parallel_ task (bidirectional loss)
    has_teacher_scores: bool                  # every row carries teacher scores
    bucket_lo: int = 0
    bucket_hi: Optional[int] = None   # None: open-ended last bucket
    bucket_from: str = "file_name"    # "file_name" or "measured"
    min_neg: Optional[int] = None
    max_neg: int = 0
    rows_outside_bucket: int = 0      # named bucket, but the measured length falls outside it
    tokens: TokenStats = field(default_factory=TokenStats)
    sources: list[str] = field(default_factory=list)

    @property
    def max_group_size_without_repeats(self) -> int:
        """G with every row filling its G-1 negatives without repeating one."""
        return 1 + (self.min_neg or 0)

    @property
    def query_len_max(self) -> Optional[int]:
        return self.tokens.query_len_max or None

    @property
    def passage_len_max(self) -> Optional[int]:
        return self.tokens.passage_len_max or None

    def to_json(self) -> dict:
        entry = dataclasses.asdict(self)
        entry["min_neg"] = self.min_neg or 0
        entry["max_group_size_without_repeats"] = self.max_group_size_without_repeats
        return entry

    @classmethod
    def from_json(cls, entry: dict, where: str = INDEX_FILE) -> "StreamEntry":
        """Parse one entry of `where`; a missing required key names the stream and the key."""
        entry = {V1_NAMES.get(k, k): v for k, v in entry.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {k: v for k, v in entry.items() if k in known}
            values["tokens"] = TokenStats(**{k: v for k, v in (entry.get("tokens") or {}).items()
                                             if k in {f.name for f in dataclasses.fields(TokenStats)}})
            stream = cls(**values)
            for key in ("name", "path", "task", "bucket", "rows", "is_parallel", "has_teacher_scores"):
                if key not in entry:
                    raise KeyError(key)
        except (KeyError, TypeError) as missing:
            raise ValueError(f"{where}: stream entry {entry.get('name', entry)!r} lacks {missing}") from None
        stream.rows, stream.is_parallel = int(stream.rows), bool(stream.is_parallel)
        stream.has_teacher_scores = bool(stream.has_teacher_scores)
        return stream


def write_index(folder: str | os.PathLike, facts: dict, streams: list[StreamEntry]) -> dict:
    """Write `folder/m3_index.json` atomically: `facts` (tokenizer, bucket edges...), the total row
    count and the streams sorted by name. Returns what was written."""
    streams = sorted(streams, key=lambda s: s.name)
    index = {"version": INDEX_VERSION, **facts, "rows": sum(s.rows for s in streams),
             "streams": [s.to_json() for s in streams]}
    write_json_atomic(Path(folder) / INDEX_FILE, index)
    return index


def read_index(root: str | os.PathLike, local_cache: str | os.PathLike | None = None) -> dict:
    """The m3_index.json of a converted dataset, local or remote (downloaded into `local_cache`)."""
    root_str = str(root).rstrip("/")
    if is_remote(root_str):
        from streaming.base.storage.download import CloudDownloader

        if local_cache:
            Path(local_cache).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="m3c-index-", dir=local_cache))
        try:
            local = folder / INDEX_FILE
            try:
                CloudDownloader.direct_download(f"{root_str}/{INDEX_FILE}", str(local))
            except Exception as exc:  # the downloaders raise provider-specific errors
                detail = " ".join(str(exc).split())
                if not _is_not_found(exc):
                    raise OSError(f"{root_str}/{INDEX_FILE}: the object store failed while reading the index "
                                  f"({type(exc).__name__}: {detail})") from exc
                raise FileNotFoundError(f"{root_str}/{INDEX_FILE}: no index ({detail}); not a converted dataset, "
                                        f"or an interrupted or never-finished conversion") from exc
            return json.loads(local.read_text(encoding="utf-8"))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    path = Path(root_str) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index; not a converted dataset, or the conversion did not finish")
    return json.loads(path.read_text(encoding="utf-8"))


def _is_not_found(exc: BaseException) -> bool:
    """The store answered that the object is absent (not that it failed)."""
    if isinstance(exc, FileNotFoundError):
        return True
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in NOT_FOUND_CODES


def read_streams(root: str | os.PathLike, local_cache: str | os.PathLike | None = None) -> tuple[dict, list[StreamEntry]]:
    """`(index, its streams as StreamEntry)`."""
    index = read_index(root, local_cache)
    where = f"{str(root).rstrip('/')}/{INDEX_FILE}"
    if index.get("version") not in (1, INDEX_VERSION) or not isinstance(index.get("streams"), list):
        raise ValueError(f"{where}: expected version 1 or {INDEX_VERSION} with a 'streams' list")
    return index, [StreamEntry.from_json(e, where) for e in index["streams"]]
