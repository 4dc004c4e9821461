"""Partitions and merging: a conversion in pieces, written apart and merged into one dataset.

Beyond one machine: `write_partition` converts one piece of the input for any engine (Spark's
`mapPartitionsWithIndex`) into `<stream>/part-NNNNN/` folders and a record in `.parts/`;
`merge_partitions` (`m3c convert --merge`) merges them: every stream's MDS index over its
partitions in partition order (Streaming's `merge_index`), then `m3_index.json`, written last
(docs/operations.md §Converting on a cluster). `merge_parts` is the merge that `convert(workers=N)` uses too.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

from m3composer.fsutil import publish_dir, write_json_atomic
from m3composer.data.buckets import DEFAULT_EDGES, parse_bucket
from m3composer.data.convert.inputs import InputFile, as_line, safe_name
from m3composer.data.convert.publish import cloud_uploader, quiet_streaming
from m3composer.data.convert.stream_stats import StreamStats, finalize_streams, stream_path
from m3composer.data.convert.summary import ConvertSummary, summarize
from m3composer.data.convert.tokenizer import cached_tokenizer, tokenizer_facts
from m3composer.data.convert.validation import (DEFAULT_ON_ERROR, REJECTS_FILE, ConvertError, check_edges,
                                                check_on_error, totals_of_parts, write_rejects)
from m3composer.data.convert.writer import (DEFAULT_BATCH_ROWS, DEFAULT_COMPRESSION, DEFAULT_SHARD_SIZE_LIMIT,
                                            Converter)
from m3composer.data.index import INDEX_FILE, is_remote, write_index
from m3composer.data.rows import DEFAULT_MAX_LINE_BYTES

PARTS_DIR = ".parts"       # write_partition's records, one JSON per partition


def part_name(partition_id: int) -> str:
    """The folder of a partition inside each stream (`part-NNNNN`), and its record's name."""
    return f"part-{partition_id:05d}"


def write_partition(rows: Iterable, out: str | os.PathLike, partition_id: int, tokenizer, *, task: str,
                    bucket: str | None = None, is_parallel: bool | None = None, source: str | None = None,
                    file_index: int | None = None, first_line: int = 1,
                    bucket_edges: tuple[int, ...] = DEFAULT_EDGES, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                    batch_rows: int = DEFAULT_BATCH_ROWS, compression: str | None = DEFAULT_COMPRESSION,
                    shard_size_limit: int = DEFAULT_SHARD_SIZE_LIMIT,
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
    part = part_name(partition_id)
    bucket_edges = check_edges(bucket_edges)
    tok = cached_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    named = parse_bucket(bucket) if bucket else None
    inp = InputFile(path=Path(source or task), source_name=source or f"{safe_name(task)}.{part}",
                    file_index=partition_id if file_index is None else file_index, task=safe_name(task), bucket=named,
                    is_parallel=("parallel_" in task) if is_parallel is None else is_parallel)
    out_str = str(out).rstrip("/")
    remote = out_str if is_remote(out_str) else None
    staging = Path(tempfile.mkdtemp(prefix=f"m3c-{part}-", dir=local_cache))
    conv = Converter(staging, tok, bucket_edges=bucket_edges, on_error="skip", max_line_bytes=max_line_bytes,
                     batch_rows=batch_rows, compression=compression, shard_size_limit=shard_size_limit, part=part)
    try:
        lines = ((first_line + i, as_line(row)[: max_line_bytes + 1], 0) for i, row in enumerate(rows))
        conv.convert_lines(inp, lines)
        conv.close()
        record = conv.record(**tokenizer_facts(tok, tokenizer), bucket_edges=list(bucket_edges))
        streams = [stream_path(*key) for key in conv.stats]
        write_json_atomic(staging / PARTS_DIR / f"{part}.json", record)
        if remote:
            uploader = cloud_uploader(staging, remote)
            with quiet_streaming():
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


def read_part_records(out_str: str, remote: str | None, scratch: Path) -> list[dict]:
    """Every partition's record under `out/.parts/`, in partition order (remote ones via `scratch`)."""
    if remote:
        from streaming.base.storage.download import CloudDownloader

        lister = cloud_uploader(scratch / "list", f"{remote}/{PARTS_DIR}")
        names = sorted(Path(k).name for k in lister.list_objects() if k.endswith(".json"))
        paths = []
        for name in names:
            CloudDownloader.direct_download(f"{remote}/{PARTS_DIR}/{name}", str(scratch / name))
            paths.append(scratch / name)
    else:
        paths = sorted((Path(out_str) / PARTS_DIR).glob("part-*.json"))
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def merge_partitions(out: str | os.PathLike, *, on_error: str = DEFAULT_ON_ERROR,
                     local_cache: str | os.PathLike | None = None) -> ConvertSummary:
    """Merge the partitions `write_partition` wrote into `out` into one dataset: every stream's
    MDS index over its partitions (in partition order), then `m3_index.json` (written last)."""
    check_on_error(on_error)
    start = time.perf_counter()
    out_str = str(out).rstrip("/")
    remote = out_str if is_remote(out_str) else None
    scratch = Path(tempfile.mkdtemp(prefix="m3c-merge-", dir=local_cache))
    try:
        parts = read_part_records(out_str, remote, scratch)
        if not parts:
            raise FileNotFoundError(f"{out_str}/{PARTS_DIR}: no partition records (write_partition writes them)")
        facts = {k: v for k, v in parts[0].items() if k.startswith("tokenizer") or k == "bucket_edges"}
        for p in parts[1:]:
            theirs = {k: v for k, v in p.items() if k.startswith("tokenizer") or k == "bucket_edges"}
            if theirs != facts:
                raise ValueError(f"{out_str}: partitions {parts[0]['partition']} and {p['partition']} were written "
                                 f"with different tokenizers or bucket edges ({facts} vs {theirs})")
        conv = totals_of_parts(parts)
        if conv.errors and on_error == "fail":
            raise ConvertError(conv.errors, conv.lines)
        local_root = scratch / "dataset" if remote else Path(out_str)
        stats = merge_parts(parts, local_root, remote)
        entries, notes = finalize_streams(stats, None)   # partitions stay where they are
        if conv.errors:
            write_rejects(local_root, conv.errors)
        index = write_index(local_root, facts, entries)
        if remote:
            uploader = cloud_uploader(local_root, remote)
            with quiet_streaming():
                if conv.errors:
                    uploader.upload_file(REJECTS_FILE)
                uploader.upload_file(INDEX_FILE)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summarize(out_str, remote, sorted(conv.file_lines), conv, index, notes, start, partitions=len(parts))


def merge_parts(parts: list[dict], local_root: Path, remote: str | None = None) -> list[StreamStats]:
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
    with quiet_streaming():
        for key, names in members.items():
            path = stream_path(*key)
            if remote:
                urls = [f"{remote}/{path}/{name}/index.json" for name in names]
                merge_index(urls, (str(local_root / path), f"{remote}/{path}"))
            else:
                merge_index([str(local_root / path / name / "index.json") for name in names], str(local_root / path))
    return list(merged.values())
