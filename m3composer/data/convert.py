"""`m3c convert`: FlagEmbedding JSONL -> tokenised MDS streams (one per task x length bucket).

Input: JSONL files or directories of them (searched recursively), plain or `.gz`. Each file is
one *task*; its name is the file stem without the `len-A-B` tag (or the directory name when the
file is just `len-A-B.jsonl`), made unique and filesystem-safe. `len-A-B` in the file name gives
the length bucket; a file without it is bucketed row by row by its measured token length (the
longest of query, positives and negatives, special tokens included) under `bucket_edges`, so
FlagEmbedding's separate split script is not needed (docs/recipe.md §Length buckets).
`parallel_` anywhere in the path marks parallel data.

Output: `OUT/<task>/<bucket>/` MDS streams and `OUT/m3_index.json` (the contract is in
docs/architecture.md; the dataset reads exactly that). Text is tokenised here, once, with the
fast tokenizer in batches (identical strings in a batch are tokenised once), untruncated, with
`<s>`/`</s>`. Query/passage instructions are **not** applied here: the collator inserts the
instruction's token ids at training time, so one converted dataset serves any instruction.

Atomicity: a local OUT is built under `OUT.tmp-<pid>` and renamed into place at the end; an
object-store OUT (`s3://...`, or any scheme Streaming can upload to) is staged locally and
uploaded with Streaming's uploader, `m3_index.json` last, so a reader that finds the index finds
a complete dataset. With `on_error="fail"` (default) the first bad line stops all writing, the
rest of the input is still validated, and the error lists the defects; nothing is left behind.
With `on_error="skip"` bad lines go to `OUT/rejects.jsonl` and every line is accounted for.

Teacher scores are optional per row: a task x bucket with both kinds of row becomes two streams,
`<task>/<bucket>` and `<task>/<bucket>.scored`, so no valid row is dropped and no batch mixes them.

Beyond one process: `workers=N` converts files and row ranges of plain files in N processes into
`<stream>/part-NNNNN/` folders and merges them (Streaming's `merge_index`) into the dataset one
worker writes, shard files aside. Beyond one machine: `write_partition` is the same per-piece
writer as a plain function for any engine (Spark's `mapPartitionsWithIndex`), `merge_partitions`
(`m3c convert --merge`) the merge; README §Converting on a cluster.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from m3composer.fsutil import atomic_file, publish_dir, write_json_atomic
from m3composer.data.buckets import DEFAULT_EDGES, Bucket, bucket_for_length, parse_bucket
from m3composer.data.index import INDEX_FILE, SHARD_HASH, StreamEntry, TokenStats, is_remote, write_index
from m3composer.data.rows import DEFAULT_MAX_LINE_BYTES, Row, RowError, iter_lines, parse_line

log = logging.getLogger(__name__)

REJECTS_FILE = "rejects.jsonl"
PARTS_DIR = ".parts"       # write_partition's records, one JSON per partition
SCORED = "scored"          # the stream of a task x bucket's rows with teacher scores, when it has both kinds
INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
MAX_ERRORS_SHOWN = 20

# The MDS columns of every row (docs/architecture.md). No pickle anywhere. Streaming cannot
# encode an empty ndarray, so positives and negatives share one never-empty array (a row may
# have no negatives) and a row without teacher scores stores NaN scores.
COLUMNS: dict[str, str] = {
    "query": "ndarray:int32",
    "passages": "ndarray:int32",         # positives' ids then negatives' ids, concatenated
    "passage_offsets": "ndarray:int32",  # num_pos + num_neg + 1 offsets into `passages`
    "num_pos": "int32",
    "scores": "ndarray:float32",         # teacher score per passage, same order; NaN when none
    "row_id": "int64",
    "source": "str",
}

_BUCKET_TAG = re.compile(r"[_.-]?len-\d+-(?:\d+|inf)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ConvertError(ValueError):
    """Bad input under `on_error="fail"`: carries every defect found (the message shows the first)."""

    def __init__(self, errors: list[RowError], lines: int):
        self.errors = errors
        by_reason: dict[str, int] = {}
        for err in errors:
            by_reason[err.reason] = by_reason.get(err.reason, 0) + 1
        shown = "\n".join(f"  {err}" for err in errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items()))
        super().__init__(f"{len(errors)} bad line(s) of {lines} ({counts}); nothing was written "
                         f"(use --on-error=skip to keep the valid lines):\n{shown}{more}")


# ----------------------------------------------------------------------------------------- inputs

class UploadError(RuntimeError):
    """An object of an `s3://…` conversion could not be uploaded; the message names it."""


@dataclass(frozen=True)
class InputFile:
    """One JSONL file: where it is, how it is named in `source`, and what it feeds."""
    path: Path
    source_name: str          # relative name used in `source` and error messages
    file_index: int           # position in sorted input order (high bits of row_id)
    task: str
    bucket: Bucket | None     # None: bucketed row by row by measured length
    is_parallel: bool


def _strip_suffix(name: str) -> str:
    for suffix in sorted(INPUT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "task"


def discover_inputs(inputs: list[str | os.PathLike]) -> list[InputFile]:
    """Expand files and directories into the sorted list of input files with task names."""
    found: dict[Path, tuple[Path, str]] = {}  # resolved path -> (path as given, source name)
    for given in inputs:
        root = Path(given)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(INPUT_SUFFIXES))
            if not files:
                raise FileNotFoundError(f"{root}: no {'/'.join(INPUT_SUFFIXES)} files in this directory")
            for p in files:
                found.setdefault(p.resolve(), (p, str(Path(root.name) / p.relative_to(root))))
        elif root.is_file():
            found.setdefault(root.resolve(), (root, root.name))
        else:
            raise FileNotFoundError(f"{root}: no such file or directory")

    ordered = sorted(found.items(), key=lambda item: str(item[0]))
    # A task is (directory, name without the bucket tag): the buckets of one task become
    # streams of that task. Different directories with the same name get distinct task names.
    identities: list[tuple[Path, str]] = []
    for resolved, _ in ordered:
        base = _BUCKET_TAG.sub("", _strip_suffix(resolved.name))
        identities.append((resolved.parent, _safe(base or resolved.parent.name)))
    names = _unique_task_names(identities)

    result = []
    for index, ((resolved, (given, source_name)), identity) in enumerate(zip(ordered, identities)):
        bucket = parse_bucket(resolved.name)
        result.append(InputFile(path=given, source_name=source_name, file_index=index,
                                task=names[identity], bucket=bucket,
                                is_parallel="parallel_" in str(given)))
    return result


def _unique_task_names(identities: list[tuple[Path, str]]) -> dict[tuple[Path, str], str]:
    distinct = list(dict.fromkeys(identities))
    by_name: dict[str, list[tuple[Path, str]]] = {}
    for ident in distinct:
        by_name.setdefault(ident[1], []).append(ident)
    names: dict[tuple[Path, str], str] = {}
    taken: set[str] = set()
    for name, group in by_name.items():
        for ident in group:
            # prefix the parent directory only when the bare name is ambiguous
            candidate = name if len(group) == 1 else f"{_safe(ident[0].name)}__{name}"
            unique, n = candidate, 2
            while unique in taken:
                unique, n = f"{candidate}-{n}", n + 1
            taken.add(unique)
            names[ident] = unique
    return names


# ---------------------------------------------------------------------------------------- streams

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
    name: str = ""                   # set by _finalize_streams
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


def _finalize_streams(stats: list[StreamStats], rename_root: Path | None) -> tuple[list[StreamEntry], list[str]]:
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


@dataclass
class ConvertSummary:
    """What a conversion did; `lines == rows_kept + rows_rejected` always holds."""
    out: str
    files: int
    lines: int
    rows_kept: int
    rows_rejected: int
    rejected_by_reason: dict[str, int]
    streams: list[dict]
    tokens: int
    seconds: float
    rejects_path: str | None
    empty_files: list[str]
    warnings: list[str]
    notes: list[str] = field(default_factory=list)   # what was done that the user should know
    workers: int = 1
    partitions: int = 0                              # parts merged (parallel or distributed conversion)

    def table(self) -> str:
        how = f" by {self.workers} workers" if self.workers > 1 else ""
        how += f", {self.partitions} partition(s) merged" if self.partitions else ""
        lines = [f"converted {self.files} file(s), {self.lines} line(s) in {self.seconds:.1f}s{how} -> {self.out}",
                 f"  rows kept      {self.rows_kept}",
                 f"  rows rejected  {self.rows_rejected}"]
        lines += [f"    {reason:<24}{n}" for reason, n in sorted(self.rejected_by_reason.items())]
        lines.append(f"  tokens         {self.tokens}")
        lines.append(f"  streams        {len(self.streams)}")
        width = max([len(s["name"]) for s in self.streams] + [6])
        lines.append(f"    {'stream':<{width}}  {'rows':>7}  {'neg':>7}  {'scores':>6}  {'parallel':>8}  {'max len':>7}")
        for s in self.streams:
            neg = f"{s['min_neg']}-{s['max_neg']}"
            lines.append(f"    {s['name']:<{width}}  {s['rows']:>7}  {neg:>7}  {str(s['has_teacher_scores']):>6}  "
                         f"{str(s['is_parallel']):>8}  {s['tokens']['row_len_max']:>7}")
        if self.rejects_path:
            lines.append(f"  rejects report {self.rejects_path}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# -------------------------------------------------------------------------------------- converter

def load_tokenizer(tokenizer):
    """A fast tokenizer from a local folder (never a hub name), or the object itself."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    folder = Path(tokenizer)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found (a local model folder is required)")
    tok = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True,
                                        trust_remote_code=False)
    if not tok.is_fast:
        raise ValueError(f"{folder}: no fast tokenizer (tokenizer.json) in this folder")
    return tok


def _tokenizer_facts(tok, tokenizer_arg) -> dict:
    name = str(tokenizer_arg) if isinstance(tokenizer_arg, (str, os.PathLike)) else tok.name_or_path
    facts = {"tokenizer": Path(name).name or name, "tokenizer_vocab_size": len(tok)}
    tok_json = Path(name) / "tokenizer.json"
    if tok_json.is_file():
        facts["tokenizer_sha256"] = hashlib.sha256(tok_json.read_bytes()).hexdigest()
    return facts


@dataclass(frozen=True)
class Unit:
    """A piece of work: a whole file, or the lines of a plain file that start in [start, end)."""
    file: InputFile
    start: int = 0
    end: int | None = None    # None: to the end of the file
    first_line: int = 1       # the file's line number of the line at `start`


class _Converter:
    """One conversion run (or one partition of it) into a local directory.

    With `part=None` every stream is written to `out_dir/<stream path>/`; with a partition name,
    to `out_dir/<stream path>/<part>/`, to be merged with the other partitions' (`_merge_parts`).
    The caller handles renaming and uploading.
    """

    def __init__(self, out_dir: Path, tok, *, bucket_edges, on_error, max_line_bytes, batch_rows,
                 compression, shard_size_limit, part: str | None = None, stop=None):
        self.out_dir = out_dir
        self.tok = tok
        self.bucket_edges = tuple(bucket_edges)
        self.on_error = on_error
        self.max_line_bytes = max_line_bytes
        self.batch_rows = batch_rows
        self.compression = compression
        self.shard_size_limit = shard_size_limit
        self.part = part
        self.stop = stop      # a shared Event: the first bad line of any worker stops writing in all (on_error=fail)
        self.writers: dict[tuple[str, Bucket, bool], object] = {}
        self.stats: dict[tuple[str, Bucket, bool], StreamStats] = {}
        self.errors: list[RowError] = []
        self.rejects_fh = None
        self.lines = 0
        self.kept = 0
        self.file_lines: dict[str, int] = {}
        self.writing = True   # turned off at the first error under on_error="fail"
        # The Rust tokenizer releases the GIL: tokenise batch k+1 in a thread while batch k is
        # encoded and written to MDS in this one.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3c-tokenize")
        self.pending: tuple[InputFile, list[Row], Future] | None = None

    # rows -> MDS
    def _tokenize(self, rows: list[Row]) -> dict[str, np.ndarray]:
        unique = list(dict.fromkeys(text for row in rows for text in (row.query, *row.pos, *row.neg)))
        encoded = self.tok(unique, add_special_tokens=True, truncation=False,
                           return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return {text: np.asarray(ids, dtype=np.int32) for text, ids in zip(unique, encoded)}

    def _writer(self, inp: InputFile, bucket: Bucket, scored: bool):
        key = (inp.task, bucket, scored)
        if key not in self.writers:
            from streaming import MDSWriter

            self.stats[key] = StreamStats(inp.task, bucket, inp.is_parallel,
                                          "file_name" if inp.bucket else "measured", scored)
            folder = self.out_dir / stream_path(*key)
            self.writers[key] = MDSWriter(out=str(folder / self.part if self.part else folder), columns=COLUMNS,
                                          compression=self.compression, size_limit=self.shard_size_limit,
                                          hashes=[SHARD_HASH], max_workers=1)
        stats = self.stats[key]
        if stats.is_parallel != inp.is_parallel:
            raise ValueError(f"{inp.source_name}: stream {stream_path(*key)} mixes parallel and non-parallel files")
        return self.writers[key], stats

    def _submit(self, inp: InputFile, rows: list[Row]) -> None:
        """Start tokenising `rows` in the background, then write the batch submitted before."""
        if not rows:
            return
        self.kept += len(rows)
        future = self.pool.submit(self._tokenize, rows)
        self._drain()
        self.pending = (inp, rows, future)

    def _drain(self) -> None:
        if self.pending is not None:
            inp, rows, future = self.pending
            self.pending = None
            self._write(inp, rows, future.result())

    def _write(self, inp: InputFile, rows: list[Row], ids: dict[str, np.ndarray]) -> None:
        for row in rows:
            query = ids[row.query]
            pos = [ids[t] for t in row.pos]
            neg = [ids[t] for t in row.neg]
            passage_lens = [len(a) for a in pos] + [len(a) for a in neg]
            row_len = max(len(query), *passage_lens)
            bucket = inp.bucket or bucket_for_length(row_len, self.bucket_edges)
            writer, stats = self._writer(inp, bucket, row.has_teacher_scores)
            offsets = np.zeros(len(passage_lens) + 1, dtype=np.int32)
            np.cumsum(passage_lens, out=offsets[1:])
            scores = (np.asarray(row.pos_scores + row.neg_scores, dtype=np.float32) if row.has_teacher_scores
                      else np.full(len(passage_lens), np.nan, dtype=np.float32))
            writer.write({
                "query": query, "passages": np.concatenate(pos + neg), "passage_offsets": offsets,
                "num_pos": len(pos), "scores": scores,
                "row_id": (inp.file_index << 32) | row.line_no,
                "source": f"{inp.source_name}:{row.line_no}",
            })
            stats.rows += 1
            stats.min_neg = len(neg) if stats.min_neg is None else min(stats.min_neg, len(neg))
            stats.max_neg = max(stats.max_neg, len(neg))
            tokens = stats.tokens
            tokens.query_tokens += len(query)
            tokens.passage_tokens += sum(passage_lens)
            tokens.passages += len(passage_lens)
            tokens.query_len_max = max(tokens.query_len_max, len(query))
            tokens.passage_len_max = max(tokens.passage_len_max, *passage_lens)
            tokens.row_len_max = max(tokens.row_len_max, row_len)
            stats.rows_outside_bucket += not bucket.contains(row_len)
            stats.sources.add(inp.source_name)

    def _reject(self, err: RowError) -> None:
        self.errors.append(err)
        if self.on_error == "fail":
            self.writing = False  # the output will be thrown away: stop tokenising, keep validating
            if self.stop is not None:
                self.stop.set()
        elif self.part is None:   # a partition's rejects travel in its record (_merge_parts writes them)
            if self.rejects_fh is None:
                self.rejects_fh = open(self.out_dir / REJECTS_FILE, "w", encoding="utf-8")
            self.rejects_fh.write(json.dumps(err.to_json(), ensure_ascii=False) + "\n")

    def convert_lines(self, inp: InputFile, lines, progress=None, offset: int = 0) -> None:
        """Validate and write `(line_no, raw, end_offset)` lines of `inp` (`rows.iter_lines`)."""
        batch: list[Row] = []
        counted = self.file_lines.setdefault(inp.source_name, 0)
        for line_no, raw, end_offset in lines:
            self.lines += 1
            counted += 1
            result = parse_line(raw, path=inp.source_name, line_no=line_no, max_line_bytes=self.max_line_bytes)
            if isinstance(result, RowError):
                self._reject(result)
            elif self.writing:
                batch.append(result)
                if len(batch) >= self.batch_rows:
                    if self.stop is not None and self.stop.is_set():
                        self.writing = False    # another worker found a bad line: validate only
                        self.kept += len(batch)
                    else:
                        self._submit(inp, batch)
                    batch = []
            else:
                self.kept += 1  # valid, counted, but not written: the run has already failed
            if progress is not None:
                progress.update(end_offset - offset)
            offset = end_offset
        self.file_lines[inp.source_name] = counted
        if self.writing:
            self._submit(inp, batch)
        else:
            self.kept += len(batch)

    def convert_unit(self, unit: Unit, progress=None) -> None:
        lines = iter_lines(unit.file.path, self.max_line_bytes, start=unit.start, end=unit.end,
                           first_line=unit.first_line)
        self.convert_lines(unit.file, lines, progress, offset=unit.start)

    def close(self) -> None:
        if self.writing:
            self._drain()
        self.shutdown()
        for writer in self.writers.values():
            writer.finish()
        if self.rejects_fh is not None:
            self.rejects_fh.close()

    def shutdown(self) -> None:
        self.pending = None
        self.pool.shutdown(wait=True, cancel_futures=True)

    def record(self, **facts) -> dict:
        """What a partition wrote, as JSON (`_merge_parts` reads it back)."""
        return {"partition": self.part, "lines": self.lines, "kept": self.kept, "file_lines": self.file_lines,
                "errors": [e.to_json() for e in self.errors],
                "streams": [s.to_json() for s in self.stats.values()], **facts}


# ------------------------------------------------------------------------- parallel conversion

def _line_ranges(path: Path, split_bytes: int, chunk: int = 1 << 20) -> list[tuple[int, int, int]]:
    """`(start, end, first_line)` ranges of about `split_bytes` that start at line starts.

    One pass counting newlines (no line is parsed or held whole), so that every range knows the
    file's line number of its first line and errors keep their global `file:line`.
    """
    size = path.stat().st_size
    ranges, start, first, lines, pos, target = [], 0, 1, 0, 0, split_bytes
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            i = 0
            while target < pos + len(block):
                j = block.find(b"\n", max(target - pos, i))
                if j < 0:
                    break
                cut = pos + j + 1
                if cut < size:
                    ranges.append((start, cut, first))
                    start, first = cut, lines + block.count(b"\n", 0, j + 1) + 1
                target, i = cut + split_bytes, j + 1
            lines += block.count(b"\n")
            pos += len(block)
    ranges.append((start, size, first))
    return ranges


def plan_units(files: list[InputFile], split_bytes: int | None) -> list[Unit]:
    """Whole files, plain files larger than `split_bytes` cut into row ranges (`.gz`: whole)."""
    units = []
    for f in files:
        if split_bytes is None or str(f.path).endswith(".gz") or f.path.stat().st_size <= split_bytes:
            units.append(Unit(f))
        else:
            units += [Unit(f, a, b, first) for a, b, first in _line_ranges(Path(f.path), split_bytes)]
    return units


_WORKER: dict = {}


def _init_worker(tokenizer, stop) -> None:
    tok = load_tokenizer(tokenizer)
    tok.model_max_length = sys.maxsize
    _WORKER.update(tok=tok, stop=stop)


def _convert_part(unit: Unit, out_dir: str, part: str, settings: dict) -> dict:
    """In a worker process: one unit into `out_dir/<stream>/<part>/`; returns its record."""
    conv = _Converter(Path(out_dir), _WORKER["tok"], part=part, stop=_WORKER["stop"], **settings)
    try:
        conv.convert_unit(unit)
        conv.close()
    finally:
        conv.shutdown()
    return conv.record()


def _run_workers(units: list[Unit], work: Path, tokenizer, settings: dict, workers: int, bar) -> list[dict]:
    """Convert `units` in `workers` processes; the records come back in unit order, which is the
    input order.

    Workers never fork the caller (its threads, the Rust tokenizer's pool): they come from a fork
    server that has imported Streaming (which imports torch) and transformers once, so a worker
    starts in milliseconds instead of seconds of imports; spawn where there is no fork server
    (Windows). Our own modules are not preloaded: the server ignores the caller's `sys.path`
    (Python 3.11), the workers do not. A calling script needs the `if __name__ == "__main__":` guard.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["streaming", "transformers", "transformers.models.auto.tokenization_auto",
                                    "transformers.tokenization_utils_fast"])   # no effect once it runs
    else:
        ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    sizes = [(u.end if u.end is not None else u.file.path.stat().st_size) - u.start for u in units]
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(tokenizer, stop)) as pool:
        futures = {pool.submit(_convert_part, u, str(work), f"part-{i:05d}", settings): i
                   for i, u in enumerate(units)}
        try:
            for future in as_completed(futures):
                future.result()   # the first failure stops the run
                bar.update(sizes[futures[future]])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return [f.result() for f in futures]


@contextmanager
def _quiet_streaming():
    """Streaming's merge_index and uploaders log a warning per call (their temp folder, a folder
    that is not empty: ours, on purpose); keep them out of the summary."""
    class _Drop(logging.Filter):
        def filter(self, record):
            return False

    root, streaming_log = logging.getLogger(), logging.getLogger("streaming")
    drop, level = _Drop(), streaming_log.level
    root.addFilter(drop)              # merge_index logs through the root logger itself
    streaming_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(drop)
        streaming_log.setLevel(level)


def _merge_parts(parts: list[dict], local_root: Path, remote: str | None = None) -> list[StreamStats]:
    """Merge the partitions' streams: one MDS index per stream over its partitions' shards, in
    partition order (Streaming's `merge_index`), and their statistics. Rows keep the input order."""
    from streaming.base.util import merge_index

    merged: dict[tuple, StreamStats] = {}
    members: dict[tuple, list[str]] = {}
    for part in parts:
        for obj in part["streams"]:
            s = StreamStats.from_json(obj)
            if s.key in merged:
                merged[s.key].absorb(s, part["partition"])
            else:
                merged[s.key] = s
            members.setdefault(s.key, []).append(part["partition"])
    with _quiet_streaming():
        for key, names in members.items():
            path = stream_path(*key)
            if remote:
                urls = [f"{remote}/{path}/{name}/index.json" for name in names]
                merge_index(urls, (str(local_root / path), f"{remote}/{path}"))
            else:
                merge_index([str(local_root / path / name / "index.json") for name in names], str(local_root / path))
    return list(merged.values())


@dataclass
class _Totals:
    """Line accounting of a whole conversion: one converter's, or the sum of its partitions'."""
    lines: int
    kept: int
    errors: list[RowError]
    file_lines: dict[str, int]


def _parts_totals(parts: list[dict]) -> _Totals:
    file_lines: dict[str, int] = {}
    for p in parts:
        for name, n in p["file_lines"].items():
            file_lines[name] = file_lines.get(name, 0) + n
    return _Totals(sum(p["lines"] for p in parts), sum(p["kept"] for p in parts),
                   [RowError.from_json(e) for p in parts for e in p["errors"]], file_lines)


def _write_rejects(folder: Path, errors: list[RowError]) -> None:
    with atomic_file(folder / REJECTS_FILE) as fh:
        for err in errors:
            fh.write(json.dumps(err.to_json(), ensure_ascii=False) + "\n")


def _prepare_local_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out}: output exists and is not empty (pass overwrite=True / --overwrite)")
    work = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def _publish_local(work: Path, out: Path) -> None:
    publish_dir(work, out)


def _remote_is_used(remote: str, overwrite: bool) -> bool:
    """Refuse a non-empty prefix unless `overwrite`; True when there is an old dataset to replace."""
    from streaming.base.storage.upload import CloudUploader

    probe_dir = tempfile.mkdtemp(prefix="m3c-probe-")
    try:
        existing = CloudUploader.get((probe_dir, remote), keep_local=True, exist_ok=True).list_objects()
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if existing and not overwrite:
        raise FileExistsError(f"{remote}: output prefix is not empty ({len(existing)} objects; "
                              f"pass overwrite=True / --overwrite)")
    return bool(existing)


def _upload(staged: Path, remote: str, replace: bool, threads: int = 4) -> None:
    """Upload every staged file with Streaming's uploader; the index goes last.

    When replacing an old dataset, its m3_index.json is deleted first so that no reader pairs
    it with half-uploaded new streams (s3:// only). Old objects the new dataset does not
    overwrite stay behind, unreferenced by the new index.
    """
    from streaming.base.storage.upload import CloudUploader

    uploader = CloudUploader.get((str(staged), remote), keep_local=True, exist_ok=True)
    if replace:
        if not hasattr(uploader, "s3"):
            raise ValueError(f"{remote}: replacing a dataset is only supported on s3://; choose an empty prefix")
        url = urllib.parse.urlparse(f"{remote}/{INDEX_FILE}")
        uploader.s3.delete_object(Bucket=url.netloc, Key=url.path.lstrip("/"))
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    body = [f for f in files if f != INDEX_FILE]

    def upload(name: str) -> None:
        try:
            uploader.upload_file(name)
        except Exception as err:  # botocore (AWS_MAX_ATTEMPTS) and Streaming have given up
            raise UploadError(f"{remote}/{name}: upload failed, so {INDEX_FILE} was not written and readers see "
                              f"no dataset: {type(err).__name__}: {' '.join(str(err).split())}") from err

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(upload, name) for name in body]
        try:
            for future in futures:
                future.result()       # re-raise the first failure
        except BaseException:
            for future in futures:    # a store that is down: do not wait out every file's retries
                future.cancel()
            raise
    upload(INDEX_FILE)


def convert(inputs: list[str | os.PathLike] | str | os.PathLike, out: str | os.PathLike, tokenizer, *,
            on_error: str = "fail", max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
            bucket_edges: tuple[int, ...] = DEFAULT_EDGES, batch_rows: int = 1024,
            local_cache: str | os.PathLike | None = None, overwrite: bool = False,
            compression: str | None = "zstd", shard_size_limit: int = 1 << 26,
            progress: bool | None = None, workers: int = 1, split_bytes: int | None = None) -> ConvertSummary:
    """Convert FlagEmbedding JSONL to MDS streams + m3_index.json under `out` (dir or URL).

    `tokenizer`: a local model folder or a loaded fast tokenizer. Raises `ConvertError` on bad
    lines when `on_error="fail"`; with `"skip"` they are reported in `OUT/rejects.jsonl`.
    `workers > 1` converts files, and row ranges of plain files over `split_bytes` (default: the
    input split in about 4 pieces per worker, 1-64 MiB each), in that many processes, and merges
    them: the same rows in the same order, ids, errors and index as one worker; only the shard
    files differ (each stream's shards sit in one `part-NNNNN/` folder per piece).
    """
    from tqdm.auto import tqdm

    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bucket_edges = _check_edges(bucket_edges)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    start = time.perf_counter()
    files = discover_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    # Untruncated on purpose: lift the limit so transformers does not warn about long rows.
    saved_max_length, tok.model_max_length = tok.model_max_length, sys.maxsize

    out_str = str(out)
    remote = out_str.rstrip("/") if is_remote(out_str) else None
    if remote:
        replace_remote = _remote_is_used(remote, overwrite)
        staging_root = Path(tempfile.mkdtemp(prefix="m3c-convert-", dir=local_cache))
        work = staging_root / "dataset"
        work.mkdir()
    else:
        work = _prepare_local_out(Path(out_str), overwrite)

    settings = dict(bucket_edges=bucket_edges, on_error=on_error, max_line_bytes=max_line_bytes,
                    batch_rows=batch_rows, compression=compression, shard_size_limit=shard_size_limit)
    conv = _Converter(work, tok, **settings)
    total_bytes = sum(f.path.stat().st_size for f in files)
    # hashing tokenizer.json (tens of MB) overlaps with reading the first batch
    facts = conv.pool.submit(_tokenizer_facts, tok, tokenizer)
    parts: list[dict] = []
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert",
                  disable=(not progress) if progress is not None else None) as bar:
            if workers == 1:
                for inp in files:
                    conv.convert_unit(Unit(inp), bar)
            else:
                if split_bytes is None:
                    split_bytes = min(max(total_bytes // (4 * workers), 1 << 20), 64 << 20)
                parts = _run_workers(plan_units(files, split_bytes), work,
                                     tokenizer if isinstance(tokenizer, (str, os.PathLike)) else tok,
                                     settings, workers, bar)
        conv.close()
        totals = (_parts_totals(parts) if parts
                  else _Totals(conv.lines, conv.kept, conv.errors, conv.file_lines))
        if totals.errors and on_error == "fail":
            raise ConvertError(totals.errors, totals.lines)
        stats = _merge_parts(parts, work) if parts else list(conv.stats.values())
        if parts and totals.errors:
            _write_rejects(work, totals.errors)
        entries, notes = _finalize_streams(stats, work)
        # last: its presence means complete
        index = write_index(work, {**facts.result(), "bucket_edges": list(bucket_edges)}, entries)
        if remote:
            _upload(work, remote, replace_remote)
        else:
            _publish_local(work, Path(out_str))
    finally:
        conv.shutdown()
        tok.model_max_length = saved_max_length
        if conv.rejects_fh is not None:
            conv.rejects_fh.close()
        shutil.rmtree(staging_root if remote else work, ignore_errors=True)

    return _summary(out_str, remote, [f.source_name for f in files], totals, index, notes, start,
                    workers=workers, partitions=len(parts))


def _check_edges(bucket_edges) -> tuple[int, ...]:
    bucket_edges = tuple(int(e) for e in bucket_edges)
    if not bucket_edges or bucket_edges[0] != 0 or list(bucket_edges) != sorted(set(bucket_edges)):
        raise ValueError(f"bucket_edges must start at 0 and increase strictly, got {bucket_edges}")
    return bucket_edges


def _summary(out_str: str, remote: str | None, sources: list[str], conv: _Totals, index: dict, notes: list[str],
             start: float, **how) -> ConvertSummary:
    empty_files = [name for name in sources if conv.file_lines.get(name, 0) == 0]
    for name in empty_files:
        log.warning("%s: empty file (no lines); it contributes no rows", name)
    warnings = [f"{name}: empty file" for name in empty_files]
    warnings += [f"{s['name']}: {s['rows_outside_bucket']} row(s) longer/shorter than the bucket in the file name"
                 for s in index["streams"] if s["rows_outside_bucket"]]
    by_reason: dict[str, int] = {}
    for err in conv.errors:
        by_reason[err.reason] = by_reason.get(err.reason, 0) + 1
    rejects_path = None
    if conv.errors:
        rejects_path = f"{remote}/{REJECTS_FILE}" if remote else str(Path(out_str) / REJECTS_FILE)
    summary = ConvertSummary(
        out=out_str, files=len(sources), lines=conv.lines, rows_kept=conv.kept, rows_rejected=len(conv.errors),
        rejected_by_reason=by_reason, streams=index["streams"],
        tokens=sum(s["tokens"]["query_tokens"] + s["tokens"]["passage_tokens"] for s in index["streams"]),
        seconds=time.perf_counter() - start, rejects_path=rejects_path, empty_files=empty_files,
        warnings=warnings, notes=notes, **how)
    assert summary.lines == summary.rows_kept + summary.rows_rejected, "every line is kept or rejected"
    return summary


# ---------------------------------------------------------------------- beyond one machine

@functools.lru_cache(maxsize=4)
def _cached_tokenizer(folder: str):
    tok = load_tokenizer(folder)
    tok.model_max_length = sys.maxsize
    return tok


def _as_line(row) -> bytes:
    """A JSONL line from what an engine hands over: bytes, str, a dict or a Row with asDict()."""
    if isinstance(row, bytes):
        return row
    if isinstance(row, str):
        return row.encode("utf-8")
    if hasattr(row, "asDict"):            # pyspark.sql.Row
        row = row.asDict(recursive=True)
    # a DataFrame has every column in every row: a null means "not given", as a missing JSON field
    return json.dumps({k: v for k, v in dict(row).items() if v is not None}, ensure_ascii=False).encode("utf-8")


def write_partition(rows: Iterable, out: str | os.PathLike, partition_id: int, tokenizer, *, task: str,
                    bucket: str | None = None, is_parallel: bool | None = None, source: str | None = None,
                    file_index: int | None = None, first_line: int = 1,
                    bucket_edges: tuple[int, ...] = DEFAULT_EDGES, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                    batch_rows: int = 1024, compression: str | None = "zstd", shard_size_limit: int = 1 << 26,
                    local_cache: str | os.PathLike | None = None) -> dict:
    """Convert one partition of a distributed job into `out` (local dir or `s3://...`); returns its record.

    Made to be called from any engine, once per partition (Spark: `mapPartitionsWithIndex`), then
    `merge_partitions(out)` once. `rows`: JSONL lines (str/bytes) or dicts / Spark Rows with
    FlagEmbedding's fields (None = absent), all of one `task` (and `bucket` like `len-0-500`, or
    None to bucket by measured length). Row `i` is line `first_line + i` of `source` (default
    `<task>.part-NNNNN`), its row id `(file_index << 32) | line` (default file_index: the
    partition id), so partitions that are the pieces of one file keep that file's ids.

    Bad rows never stop a partition: they travel in its record and `merge_partitions` decides
    (`on_error`). The partition is staged locally and published as
    `out/<stream>/part-NNNNN/` folders, then `out/.parts/part-NNNNN.json` last: a partition
    without its record (a crashed attempt) is ignored, and a retried one replaces it.
    """
    if partition_id < 0:
        raise ValueError(f"partition_id must be >= 0, got {partition_id}")
    part = f"part-{partition_id:05d}"
    bucket_edges = _check_edges(bucket_edges)
    tok = _cached_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    named = parse_bucket(bucket) if bucket else None
    inp = InputFile(path=Path(source or task), source_name=source or f"{_safe(task)}.{part}",
                    file_index=partition_id if file_index is None else file_index, task=_safe(task), bucket=named,
                    is_parallel=("parallel_" in task) if is_parallel is None else is_parallel)
    out_str = str(out).rstrip("/")
    remote = out_str if is_remote(out_str) else None
    staging = Path(tempfile.mkdtemp(prefix=f"m3c-{part}-", dir=local_cache))
    conv = _Converter(staging, tok, bucket_edges=bucket_edges, on_error="skip", max_line_bytes=max_line_bytes,
                      batch_rows=batch_rows, compression=compression, shard_size_limit=shard_size_limit, part=part)
    try:
        lines = ((first_line + i, _as_line(row)[: max_line_bytes + 1], 0) for i, row in enumerate(rows))
        conv.convert_lines(inp, lines)
        conv.close()
        record = conv.record(**_tokenizer_facts(tok, tokenizer), bucket_edges=list(bucket_edges))
        streams = [stream_path(*key) for key in conv.stats]
        write_json_atomic(staging / PARTS_DIR / f"{part}.json", record)
        if remote:
            from streaming.base.storage.upload import CloudUploader

            uploader = CloudUploader.get((str(staging), remote), keep_local=True, exist_ok=True)
            with _quiet_streaming():
                for path in streams:
                    for f in sorted((staging / path / part).rglob("*")):
                        uploader.upload_file(str(f.relative_to(staging)))
                uploader.upload_file(f"{PARTS_DIR}/{part}.json")   # last: the partition is complete
        else:
            root = Path(out_str)
            for path in streams:
                (root / path).mkdir(parents=True, exist_ok=True)
                publish_dir(staging / path / part, root / path / part)
            (root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
            os.replace(staging / PARTS_DIR / f"{part}.json", root / PARTS_DIR / f"{part}.json")
    finally:
        conv.shutdown()
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _read_part_records(out_str: str, remote: str | None, scratch: Path) -> list[dict]:
    if remote:
        from streaming.base.storage.download import CloudDownloader
        from streaming.base.storage.upload import CloudUploader

        lister = CloudUploader.get((str(scratch / "list"), f"{remote}/{PARTS_DIR}"), keep_local=True, exist_ok=True)
        names = sorted(Path(k).name for k in lister.list_objects() if k.endswith(".json"))
        paths = []
        for name in names:
            CloudDownloader.direct_download(f"{remote}/{PARTS_DIR}/{name}", str(scratch / name))
            paths.append(scratch / name)
    else:
        paths = sorted((Path(out_str) / PARTS_DIR).glob("part-*.json"))
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def merge_partitions(out: str | os.PathLike, *, on_error: str = "fail",
                     local_cache: str | os.PathLike | None = None) -> ConvertSummary:
    """Merge the partitions `write_partition` wrote into `out` into one dataset: every stream's
    MDS index over its partitions (in partition order), then `m3_index.json` (written last)."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    start = time.perf_counter()
    out_str = str(out).rstrip("/")
    remote = out_str if is_remote(out_str) else None
    scratch = Path(tempfile.mkdtemp(prefix="m3c-merge-", dir=local_cache))
    try:
        parts = _read_part_records(out_str, remote, scratch)
        if not parts:
            raise FileNotFoundError(f"{out_str}/{PARTS_DIR}: no partition records (write_partition writes them)")
        facts = {k: v for k, v in parts[0].items() if k.startswith("tokenizer") or k == "bucket_edges"}
        for p in parts[1:]:
            theirs = {k: v for k, v in p.items() if k.startswith("tokenizer") or k == "bucket_edges"}
            if theirs != facts:
                raise ValueError(f"{out_str}: partitions {parts[0]['partition']} and {p['partition']} were written "
                                 f"with different tokenizers or bucket edges ({facts} vs {theirs})")
        conv = _parts_totals(parts)
        if conv.errors and on_error == "fail":
            raise ConvertError(conv.errors, conv.lines)
        local_root = scratch / "dataset" if remote else Path(out_str)
        stats = _merge_parts(parts, local_root, remote)
        entries, notes = _finalize_streams(stats, None)   # partitions stay where they are
        if conv.errors:
            _write_rejects(local_root, conv.errors)
        index = write_index(local_root, facts, entries)
        if remote:
            from streaming.base.storage.upload import CloudUploader

            uploader = CloudUploader.get((str(local_root), remote), keep_local=True, exist_ok=True)
            with _quiet_streaming():
                if conv.errors:
                    uploader.upload_file(REJECTS_FILE)
                uploader.upload_file(INDEX_FILE)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _summary(out_str, remote, sorted(conv.file_lines), conv, index, notes, start, partitions=len(parts))


# ------------------------------------------------------------------------------------------- CLI

def _edges(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="JSONL file(s) or directories (.jsonl, .json, .gz)")
    parser.add_argument("--out", required=True, help="output directory or object-store URL (s3://bucket/prefix)")
    parser.add_argument("--tokenizer", default=None,
                        help="local model folder with a fast tokenizer, or asset:NAME (default: asset:e5-small)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="fail: write nothing if any line is bad (default); skip: keep valid lines, "
                             "write rejects.jsonl")
    parser.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES,
                        help="reject longer lines (default 1 MiB)")
    parser.add_argument("--bucket-edges", type=_edges, default=DEFAULT_EDGES,
                        help="length-bucket edges for files without len-A-B in the name "
                             f"(default {','.join(map(str, DEFAULT_EDGES))}; the last bucket is open)")
    parser.add_argument("--local-cache", default=None, help="staging directory for object-store output")
    parser.add_argument("--batch-rows", type=int, default=1024, help="rows tokenised per tokenizer call")
    parser.add_argument("--compression", default="zstd", help="MDS shard compression ('' for none)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes converting files / row ranges in parallel (output as with 1)")
    parser.add_argument("--split-bytes", type=int, default=None,
                        help="with --workers: cut plain files larger than this into row ranges "
                             "(default: about 4 pieces per worker, 1-64 MiB)")
    parser.add_argument("--merge", action="store_true",
                        help="no INPUT: merge the partitions that write_partition wrote into --out "
                             "into one dataset (README: Converting on a cluster)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if bool(args.merge) == bool(args.inputs):
        print("m3c convert: give INPUT files to convert, or --merge without INPUT", file=sys.stderr)
        return 2
    try:
        if args.merge:
            summary = merge_partitions(args.out, on_error=args.on_error, local_cache=args.local_cache)
        else:
            summary = convert(args.inputs, args.out, args.tokenizer, on_error=args.on_error,
                              max_line_bytes=args.max_line_bytes, bucket_edges=args.bucket_edges,
                              batch_rows=args.batch_rows, local_cache=args.local_cache, overwrite=args.overwrite,
                              compression=args.compression or None, progress=False if args.no_progress else None,
                              workers=args.workers, split_bytes=args.split_bytes)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:  # ConvertError is a ValueError
        print(f"m3c convert: {exc}", file=sys.stderr)
        return 1
    print(summary.table())
    return 0
