"""Length buckets and per-bucket batch sizes (docs/recipe.md §Length buckets, §Batch sizes).

A bucket is a half-open token-length range `[lo, hi)`; `hi=None` is the open last bucket
(`len-7000-inf`). A file's bucket comes from `len-<lo>-<hi|inf>` in its name (a regex, not
FlagEmbedding's substring test), or is measured: the longest of query, positives and negatives
in tokens of the real tokenizer, special tokens included, no truncation.

Batch sizes: FlagEmbedding's tables for group size 1 and 8 (tuned for 80 GB GPUs at query 512 /
passage 8192), `default_batch_size` otherwise, or a token budget per device batch.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

BUCKET_RE = re.compile(r"len-(\d+)-(\d+|inf)")

# FlagEmbedding's split_data_by_length.py edges: [0,500) [500,1000) [1000,2000) ... [6000,7000) [7000,inf)
DEFAULT_EDGES: tuple[int, ...] = (0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000)

# bucket name -> {group size -> per-device batch size} (FlagEmbedding's; recipe.md §Batch sizes)
DEFAULT_BATCH_TABLE: dict[str, dict[int, int]] = {
    "len-0-500": {8: 48, 1: 700},
    "len-500-1000": {8: 32, 1: 570},
    "len-1000-2000": {8: 20, 1: 388},
    "len-2000-3000": {8: 18, 1: 288},
    "len-3000-4000": {8: 14, 1: 224},
    "len-4000-5000": {8: 14, 1: 180},
    "len-5000-6000": {8: 12, 1: 157},
    "len-6000-7000": {8: 10, 1: 128},
    "len-7000-inf": {8: 8, 1: 104},
}


@dataclass(frozen=True, order=True)
class Bucket:
    lo: int
    hi: int | None  # None = open-ended

    @property
    def name(self) -> str:
        return f"len-{self.lo}-{'inf' if self.hi is None else self.hi}"

    def contains(self, length: int) -> bool:
        return length >= self.lo and (self.hi is None or length < self.hi)


def parse_bucket(text: str) -> Bucket | None:
    """The bucket named in a file name or path (`x_len-500-1000.jsonl` -> [500, 1000)), or None."""
    matches = BUCKET_RE.findall(text)
    if not matches:
        return None
    lo, hi = matches[-1]
    bucket = Bucket(int(lo), None if hi == "inf" else int(hi))
    if bucket.hi is not None and bucket.hi <= bucket.lo:
        raise ValueError(f"empty length bucket {bucket.name!r} in {text!r}")
    return bucket


def bucket_for_length(length: int, edges: tuple[int, ...] = DEFAULT_EDGES) -> Bucket:
    """The bucket of a measured token length under sorted `edges` (the last bucket is open)."""
    if length < edges[0]:
        raise ValueError(f"length {length} below the first bucket edge {edges[0]}")
    i = bisect.bisect_right(edges, length) - 1
    return Bucket(edges[i], edges[i + 1] if i + 1 < len(edges) else None)


def table_batch_size(bucket_name: str, train_group_size: int, default_batch_size: int,
                     table: dict[str, dict[int, int]] | None) -> int:
    """FlagEmbedding's lookup: the table value for (bucket, G) if there is one, else the default; `table`
    None is FlagEmbedding's own tables (`DEFAULT_BATCH_TABLE`)."""
    table = DEFAULT_BATCH_TABLE if table is None else table
    return int(table.get(bucket_name, {}).get(train_group_size, default_batch_size))


def token_budget_batch_size(max_tokens_per_device_batch: int, query_len: int, passage_len: int,
                            train_group_size: int) -> int:
    """Largest B with B * (query_len + G * passage_len) <= budget (at least 1).

    `query_len`/`passage_len` are the padded lengths a batch of this bucket can reach: the
    bucket's upper edge (or the longest row) capped by query_max_len / passage_max_len.
    """
    per_query = query_len + train_group_size * passage_len
    return max(1, max_tokens_per_device_batch // per_query)
