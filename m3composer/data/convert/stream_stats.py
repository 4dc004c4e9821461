"""The streams of a conversion: where each task x bucket's rows go, and what m3_index.json says about them.

Teacher scores are optional per row: a task x bucket with both kinds of row becomes two streams,
`<task>/<bucket>` and `<task>/<bucket>.scored`, so no valid row is dropped and no batch mixes them
(docs/recipe.md §Data format). `StreamStats` is filled while rows are written, added up over
partitions (`absorb`), and becomes the index's `StreamEntry` (`data/index.py`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from m3composer.data.buckets import Bucket, parse_bucket
from m3composer.data.index import StreamEntry, TokenStats

SCORED = "scored"          # the stream of a task x bucket's rows with teacher scores, when it has both kinds


def stream_path(task: str, bucket: Bucket, scored: bool) -> str:
    """Where the rows of (task, bucket) with (`scored`) or without teacher scores are written.

    A pure function of the three, so that partitions written apart land in the same stream; a
    sibling of the unscored stream, not inside it (an MDS writer wants an empty folder). When a
    task x bucket has only scored rows, `convert` renames `<task>/<bucket>.scored` to
    `<task>/<bucket>` (it owns its staging folder); `merge_partitions` leaves it in place.
    """
    return f"{task}/{bucket.name}.{SCORED}" if scored else f"{task}/{bucket.name}"


@dataclass
class StreamStats:
    """What m3_index.json says about one stream; filled while rows are written."""
    task: str
    bucket: Bucket
    is_parallel: bool
    bucket_from: str                 # "file_name" or "measured"
    scored: bool                     # every row has teacher scores (streams never mix)
    rows: int = 0
    min_neg: int | None = None
    max_neg: int = 0
    tokens: TokenStats = field(default_factory=TokenStats)   # sums and maxima; means filled in to_entry
    rows_outside_bucket: int = 0     # named bucket, but the measured length falls outside it
    sources: set = field(default_factory=set)
    name: str = ""                   # set by finalize_streams
    path: str = ""

    @property
    def key(self) -> tuple[str, Bucket, bool]:
        return (self.task, self.bucket, self.scored)

    def absorb(self, other: "StreamStats", where: str) -> None:
        """Add the rows of the same stream written by a later partition (sums, minima, maxima)."""
        if (other.is_parallel, other.bucket_from) != (self.is_parallel, self.bucket_from):
            raise ValueError(f"{where}: stream {stream_path(*self.key)} mixes parallel and non-parallel files")
        self.rows += other.rows
        if other.min_neg is not None:
            self.min_neg = other.min_neg if self.min_neg is None else min(self.min_neg, other.min_neg)
        self.max_neg = max(self.max_neg, other.max_neg)
        for f in ("query_tokens", "passage_tokens", "passages"):
            setattr(self.tokens, f, getattr(self.tokens, f) + getattr(other.tokens, f))
        for f in ("query_len_max", "passage_len_max", "row_len_max"):
            setattr(self.tokens, f, max(getattr(self.tokens, f), getattr(other.tokens, f)))
        self.rows_outside_bucket += other.rows_outside_bucket
        self.sources |= other.sources

    def to_json(self) -> dict:
        obj = dataclasses.asdict(self)
        obj.update(bucket=self.bucket.name, sources=sorted(self.sources))
        del obj["name"], obj["path"]
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> "StreamStats":
        return cls(**{**obj, "bucket": parse_bucket(obj["bucket"]), "tokens": TokenStats(**obj["tokens"]),
                      "sources": set(obj["sources"])})

    def to_entry(self) -> StreamEntry:
        return StreamEntry(
            name=self.name, path=self.path, task=self.task, bucket=self.bucket.name, rows=self.rows,
            is_parallel=self.is_parallel, has_teacher_scores=self.scored and self.rows > 0,
            bucket_lo=self.bucket.lo, bucket_hi=self.bucket.hi, bucket_from=self.bucket_from,
            min_neg=self.min_neg or 0, max_neg=self.max_neg, rows_outside_bucket=self.rows_outside_bucket,
            tokens=dataclasses.replace(
                self.tokens, query_len_mean=round(self.tokens.query_tokens / max(self.rows, 1), 2),
                passage_len_mean=round(self.tokens.passage_tokens / max(self.tokens.passages, 1), 2)),
            sources=sorted(self.sources))


def finalize_streams(stats: list[StreamStats], rename_root: Path | None) -> tuple[list[StreamEntry], list[str]]:
    """Name the streams; (index entries, what was done with files mixing scored and unscored rows).

    A task x bucket with one kind of row is one stream named `<task>/<bucket>`, as always. One
    with both kinds becomes two streams, `<task>/<bucket>` (no scores) and `<task>/<bucket>.scored`,
    so that no valid row is dropped and no batch mixes them (docs/recipe.md §Data format).
    With `rename_root`, a scored-only stream is moved to `<task>/<bucket>` there.
    """
    kinds: dict[tuple[str, Bucket], dict[bool, StreamStats]] = {}
    for s in stats:
        kinds.setdefault((s.task, s.bucket), {})[s.scored] = s
    notes = []
    for (task, bucket), by_kind in kinds.items():
        plain_name = f"{task}/{bucket.name}"
        for scored, s in by_kind.items():
            s.path = stream_path(task, bucket, scored)
            s.name = s.path if len(by_kind) == 2 else plain_name
        if len(by_kind) == 2:
            notes.append(f"{plain_name}: {by_kind[True].rows} row(s) with teacher scores and {by_kind[False].rows} "
                         f"without, kept as two streams, {plain_name}.{SCORED} and {plain_name} (a batch never "
                         f"mixes them)")
        elif True in by_kind and rename_root is not None:
            s = by_kind[True]
            os.replace(rename_root / s.path, rename_root / plain_name)
            s.path = plain_name
    return [s.to_entry() for s in stats], notes
