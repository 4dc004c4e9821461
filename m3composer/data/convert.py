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
"""
from __future__ import annotations

import argparse
import dataclasses
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3composer.fsutil import publish_dir
from m3composer.data.buckets import DEFAULT_EDGES, Bucket, bucket_for_length, parse_bucket
from m3composer.data.index import INDEX_FILE, SHARD_HASH, StreamEntry, TokenStats, is_remote, write_index
from m3composer.data.rows import (DEFAULT_MAX_LINE_BYTES, Row, RowError, ScoresConsistency,
                                  iter_lines, parse_line)

log = logging.getLogger(__name__)

REJECTS_FILE = "rejects.jsonl"
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

@dataclass
class StreamStats:
    """What m3_index.json says about one stream; filled while rows are written."""
    task: str
    bucket: Bucket
    is_parallel: bool
    bucket_from: str                 # "file_name" or "measured"
    rows: int = 0
    rows_with_scores: int = 0
    min_neg: int | None = None
    max_neg: int = 0
    tokens: TokenStats = field(default_factory=TokenStats)   # sums and maxima; means filled in to_entry
    rows_outside_bucket: int = 0     # named bucket, but the measured length falls outside it
    sources: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.bucket.name}"

    def to_entry(self) -> StreamEntry:
        return StreamEntry(
            name=self.name, path=self.name, task=self.task, bucket=self.bucket.name, rows=self.rows,
            is_parallel=self.is_parallel, has_teacher_scores=self.rows > 0 and self.rows_with_scores == self.rows,
            bucket_lo=self.bucket.lo, bucket_hi=self.bucket.hi, bucket_from=self.bucket_from,
            min_neg=self.min_neg or 0, max_neg=self.max_neg, rows_outside_bucket=self.rows_outside_bucket,
            tokens=dataclasses.replace(
                self.tokens, query_len_mean=round(self.tokens.query_tokens / max(self.rows, 1), 2),
                passage_len_mean=round(self.tokens.passage_tokens / max(self.tokens.passages, 1), 2)),
            sources=sorted(self.sources))


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

    def table(self) -> str:
        lines = [f"converted {self.files} file(s), {self.lines} line(s) in {self.seconds:.1f}s -> {self.out}",
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


class _Converter:
    """One conversion run into a local directory (the caller handles renaming and uploading)."""

    def __init__(self, out_dir: Path, tok, *, bucket_edges, on_error, max_line_bytes, batch_rows,
                 compression, shard_size_limit):
        self.out_dir = out_dir
        self.tok = tok
        self.bucket_edges = tuple(bucket_edges)
        self.on_error = on_error
        self.max_line_bytes = max_line_bytes
        self.batch_rows = batch_rows
        self.compression = compression
        self.shard_size_limit = shard_size_limit
        self.writers: dict[tuple[str, Bucket], object] = {}
        self.stats: dict[tuple[str, Bucket], StreamStats] = {}
        self.errors: list[RowError] = []
        self.rejects_fh = None
        self.lines = 0
        self.kept = 0
        self.writing = True   # turned off at the first error under on_error="fail"
        self.empty_files: list[str] = []
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

    def _writer(self, inp: InputFile, bucket: Bucket):
        key = (inp.task, bucket)
        if key not in self.writers:
            from streaming import MDSWriter

            self.stats[key] = StreamStats(inp.task, bucket, inp.is_parallel,
                                          "file_name" if inp.bucket else "measured")
            self.writers[key] = MDSWriter(out=str(self.out_dir / inp.task / bucket.name), columns=COLUMNS,
                                          compression=self.compression, size_limit=self.shard_size_limit,
                                          hashes=[SHARD_HASH], max_workers=1)
        stats = self.stats[key]
        if stats.is_parallel != inp.is_parallel:
            raise ValueError(f"{inp.source_name}: stream {stats.name} mixes parallel and non-parallel files")
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
            writer, stats = self._writer(inp, bucket)
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
            stats.rows_with_scores += row.has_teacher_scores
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
        else:
            if self.rejects_fh is None:
                self.rejects_fh = open(self.out_dir / REJECTS_FILE, "w", encoding="utf-8")
            self.rejects_fh.write(json.dumps(err.to_json(), ensure_ascii=False) + "\n")

    def convert_file(self, inp: InputFile, progress) -> None:
        consistency = ScoresConsistency()
        batch: list[Row] = []
        offset = 0
        lines_before = self.lines
        for line_no, raw, end_offset in iter_lines(inp.path, self.max_line_bytes):
            self.lines += 1
            result = parse_line(raw, path=inp.source_name, line_no=line_no, max_line_bytes=self.max_line_bytes)
            if isinstance(result, Row):
                result = consistency.check(result, raw)
            if isinstance(result, RowError):
                self._reject(result)
            elif self.writing:
                batch.append(result)
                if len(batch) >= self.batch_rows:
                    self._submit(inp, batch)
                    batch = []
            else:
                self.kept += 1  # valid, counted, but not written: the run has already failed
            progress.update(end_offset - offset)
            offset = end_offset
        if self.writing:
            self._submit(inp, batch)
        else:
            self.kept += len(batch)
        if self.lines == lines_before:
            self.empty_files.append(inp.source_name)
            log.warning("%s: empty file (no lines); it contributes no rows", inp.source_name)

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

    def streams(self) -> list[StreamEntry]:
        return [stats.to_entry() for stats in self.stats.values()]


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
            progress: bool | None = None) -> ConvertSummary:
    """Convert FlagEmbedding JSONL to MDS streams + m3_index.json under `out` (dir or URL).

    `tokenizer`: a local model folder or a loaded fast tokenizer. Raises `ConvertError` on bad
    lines when `on_error="fail"`; with `"skip"` they are reported in `OUT/rejects.jsonl`.
    """
    from tqdm.auto import tqdm

    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    bucket_edges = tuple(int(e) for e in bucket_edges)
    if not bucket_edges or bucket_edges[0] != 0 or list(bucket_edges) != sorted(set(bucket_edges)):
        raise ValueError(f"bucket_edges must start at 0 and increase strictly, got {bucket_edges}")
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

    conv = _Converter(work, tok, bucket_edges=bucket_edges, on_error=on_error, max_line_bytes=max_line_bytes,
                      batch_rows=batch_rows, compression=compression, shard_size_limit=shard_size_limit)
    total_bytes = sum(f.path.stat().st_size for f in files)
    # hashing tokenizer.json (tens of MB) overlaps with reading the first batch
    facts = conv.pool.submit(_tokenizer_facts, tok, tokenizer)
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert",
                  disable=(not progress) if progress is not None else None) as bar:
            for inp in files:
                conv.convert_file(inp, bar)
        conv.close()
        if conv.errors and on_error == "fail":
            raise ConvertError(conv.errors, conv.lines)
        # last: its presence means complete
        index = write_index(work, {**facts.result(), "bucket_edges": list(conv.bucket_edges)}, conv.streams())
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

    warnings = [f"{name}: empty file" for name in conv.empty_files]
    warnings += [f"{s['name']}: {s['rows_outside_bucket']} row(s) longer/shorter than the bucket in the file name"
                 for s in index["streams"] if s["rows_outside_bucket"]]
    by_reason: dict[str, int] = {}
    for err in conv.errors:
        by_reason[err.reason] = by_reason.get(err.reason, 0) + 1
    rejects_path = None
    if conv.errors:
        rejects_path = f"{remote}/{REJECTS_FILE}" if remote else str(Path(out_str) / REJECTS_FILE)
    summary = ConvertSummary(
        out=out_str, files=len(files), lines=conv.lines, rows_kept=conv.kept, rows_rejected=len(conv.errors),
        rejected_by_reason=by_reason, streams=index["streams"],
        tokens=sum(s["tokens"]["query_tokens"] + s["tokens"]["passage_tokens"] for s in index["streams"]),
        seconds=time.perf_counter() - start, rejects_path=rejects_path, empty_files=conv.empty_files,
        warnings=warnings)
    assert summary.lines == summary.rows_kept + summary.rows_rejected, "every line is kept or rejected"
    return summary


# ------------------------------------------------------------------------------------------- CLI

def _edges(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL file(s) or directories (.jsonl, .json, .gz)")
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


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = convert(args.inputs, args.out, args.tokenizer, on_error=args.on_error,
                          max_line_bytes=args.max_line_bytes, bucket_edges=args.bucket_edges,
                          batch_rows=args.batch_rows, local_cache=args.local_cache, overwrite=args.overwrite,
                          compression=args.compression or None, progress=False if args.no_progress else None)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:  # ConvertError is a ValueError
        print(f"m3c convert: {exc}", file=sys.stderr)
        return 1
    print(summary.table())
    return 0
