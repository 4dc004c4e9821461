"""Conversion on Spark: `write_partition` run as Spark tasks, then one `merge_partitions`, into the
dataset `m3c convert` writes (docs/operations.md §Converting on a cluster).

`convert_files(spark, inputs, out, tokenizer)` is `m3c convert INPUTS --workers N` with Spark's
executors as the workers: the inputs are found and named on the driver (`discover_inputs`) and cut
into row ranges at line starts (`plan_units`, as `--workers` cuts them); each range is one Spark task
that reads its lines with the project's reader (`rows.iter_lines`) and validates, tokenises and
writes them with `write_partition`. The merge keeps range order, so the dataset has the rows of one
process in the same order, with the same ids, errors, rejects and `m3_index.json`. The inputs must
be readable at the same path on the driver and on every executor (a shared or FUSE-mounted file
system: NFS, Databricks' `/dbfs` or `/Volumes`).

`convert_dataframes({name: data}, out, tokenizer)` converts what Spark already holds: per name, a
DataFrame with FlagEmbedding's columns (`spark.read.json(...)`) or an RDD of JSONL lines, dicts or
Rows. A name stands for an input file's name (`qa`, `kd_len-0-500`, `parallel_en-de`) and gives the
task, the bucket and the parallel flag by the same rules; row `i` of a name, in Spark's order of the
data, is its line `i + 1`.

pyspark is never imported here: the caller's session and data are used as they are.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import time
from pathlib import Path
from typing import Mapping

from m3composer.data.buckets import DEFAULT_EDGES, parse_bucket
from m3composer.data.convert.inputs import (InputFile, Unit, base_name, default_split_bytes, discover_inputs,
                                            plan_units, safe_name)
from m3composer.data.convert.partitions import merge_partitions, write_partition
from m3composer.data.convert.publish import remote_is_used
from m3composer.data.convert.summary import ConvertSummary
from m3composer.data.convert.validation import DEFAULT_ON_ERROR, check_edges, check_on_error
from m3composer.data.convert.writer import DEFAULT_BATCH_ROWS, DEFAULT_COMPRESSION, DEFAULT_SHARD_SIZE_LIMIT
from m3composer.data.index import is_remote
from m3composer.data.rows import DEFAULT_MAX_LINE_BYTES, iter_lines


def convert_files(spark, inputs: list[str | os.PathLike] | str | os.PathLike, out: str | os.PathLike, tokenizer,
                  *, on_error: str = DEFAULT_ON_ERROR, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                  bucket_edges: tuple[int, ...] = DEFAULT_EDGES, batch_rows: int = DEFAULT_BATCH_ROWS,
                  compression: str | None = DEFAULT_COMPRESSION, shard_size_limit: int = DEFAULT_SHARD_SIZE_LIMIT,
                  split_bytes: int | None = None, local_cache: str | os.PathLike | None = None) -> ConvertSummary:
    """Convert JSONL files or folders (as `m3c convert` takes them) with Spark into `out` (a local
    folder, absent or empty, or an unused `s3://` prefix); returns the merge's summary.

    `spark`: a SparkSession or SparkContext. `tokenizer`: a local model folder, at the same path on
    every executor. `split_bytes`: the size of a row range (default: about 4 per core of the
    session, 1-64 MiB; a `.gz` file is one range). Every range is one Spark task and one partition.
    """
    sc = getattr(spark, "sparkContext", spark)
    files = discover_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
    settings = _settings(on_error, max_line_bytes, bucket_edges, batch_rows, compression, shard_size_limit)
    out, tokenizer = _absolute(out), _absolute(tokenizer)

    def write(job):
        return _write_unit(*job, out, tokenizer, settings)

    def run_tasks():
        size = split_bytes or default_split_bytes(sum(f.path.stat().st_size for f in files), sc.defaultParallelism)
        # executors read the files by absolute path: their working folder is not the driver's
        units = [dataclasses.replace(u, file=dataclasses.replace(u.file, path=u.file.path.resolve()))
                 for u in plan_units(files, size)]
        return sc.parallelize(list(enumerate(units)), len(units)).map(write).collect()

    return _convert(run_tasks, out, tokenizer, on_error, local_cache)


def convert_dataframes(data: Mapping[str, object], out: str | os.PathLike, tokenizer, *,
                       on_error: str = DEFAULT_ON_ERROR, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                       bucket_edges: tuple[int, ...] = DEFAULT_EDGES, batch_rows: int = DEFAULT_BATCH_ROWS,
                       compression: str | None = DEFAULT_COMPRESSION, shard_size_limit: int = DEFAULT_SHARD_SIZE_LIMIT,
                       local_cache: str | os.PathLike | None = None) -> ConvertSummary:
    """Convert `{name: DataFrame or RDD}` into `out` (as `convert_files`); returns the merge's summary.

    A DataFrame's null column is a missing field (`as_line`). Every Spark partition of every name is
    one partition of the conversion; names are taken in sorted order (their `file_index`). The data
    is computed twice (rows counted per partition, then written), so it must come out the same both
    times: cache it if it is the result of a nondeterministic shuffle.
    """
    if not data:
        raise ValueError("no data to convert")
    named = [InputFile(path=Path(name), source_name=name, file_index=i, task=safe_name(base_name(name)),
                       bucket=parse_bucket(name), is_parallel="parallel_" in name)
             for i, name in enumerate(sorted(data))]
    rdds = [getattr(data[f.source_name], "rdd", data[f.source_name]) for f in named]
    sc = rdds[0].context
    settings = _settings(on_error, max_line_bytes, bucket_edges, batch_rows, compression, shard_size_limit)
    out, tokenizer = _absolute(out), _absolute(tokenizer)

    def run_tasks():
        # Each job runs in the Python workers of the data's own partitions (no second Python stage
        # per task, as zipWithIndex would add): rows per partition first, for the line numbers.
        counts = sc.union([rdd.mapPartitions(_count) for rdd in rdds]).collect()
        starts = list(itertools.accumulate([0] + [rdd.getNumPartitions() for rdd in rdds]))
        first_lines = [1 + sum(counts[starts[i]:p])
                       for i in range(len(rdds)) for p in range(starts[i], starts[i + 1])]

        def writer(f: InputFile, start: int):
            def write(j, rows):
                pid = start + j
                return [_write(f, pid, rows, first_lines[pid], out, tokenizer, settings)]
            return write

        return sc.union([rdd.mapPartitionsWithIndex(writer(f, start))
                         for f, rdd, start in zip(named, rdds, starts)]).collect()

    return _convert(run_tasks, out, tokenizer, on_error, local_cache)


def _count(rows) -> list[int]:
    return [sum(1 for _ in rows)]


def _absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (executors do not share the driver's working folder); a URL as it is."""
    return str(path) if is_remote(str(path)) else str(Path(path).resolve())


def _settings(on_error, max_line_bytes, bucket_edges, batch_rows, compression, shard_size_limit) -> dict:
    check_on_error(on_error)
    return dict(max_line_bytes=max_line_bytes, bucket_edges=check_edges(bucket_edges), batch_rows=batch_rows,
                compression=compression, shard_size_limit=shard_size_limit)


def _write_unit(partition_id: int, unit: Unit, out: str, tokenizer: str, settings: dict) -> dict:
    """In a Spark task: one row range of a file, read as one process reads it, into partition `partition_id`."""
    lines = (raw for _, raw, _ in iter_lines(unit.file.path, settings["max_line_bytes"], start=unit.start,
                                             end=unit.end, first_line=unit.first_line))
    return _write(unit.file, partition_id, lines, unit.first_line, out, tokenizer, settings)


def _write(f: InputFile, partition_id: int, rows, first_line: int, out: str, tokenizer: str, settings: dict) -> dict:
    return write_partition(rows, out, partition_id, tokenizer, task=f.task, bucket=f.bucket.name if f.bucket else None,
                           is_parallel=f.is_parallel, source=f.source_name, file_index=f.file_index,
                           first_line=first_line, **settings)


def _convert(run_tasks, out: str, tokenizer: str, on_error: str, local_cache) -> ConvertSummary:
    """Check the output and the tokenizer, plan and run the Spark job (`run_tasks`), merge. A local `out` is
    left as it was found when the job or the merge fails (a remote one keeps its partitions, and no
    `m3_index.json`: it is not a dataset)."""
    start = time.perf_counter()
    out_str = str(out).rstrip("/")
    if not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"{tokenizer}: tokenizer folder not found (a local model folder is required)")
    root = None if is_remote(out_str) else Path(out_str)
    if root is None:
        remote_is_used(out_str, overwrite=False)
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: output exists and is not empty")
    created = root is not None and not root.exists()
    try:
        records = run_tasks()
        summary = merge_partitions(out_str, on_error=on_error, local_cache=local_cache)
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        elif root is not None:
            for child in root.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    assert summary.partitions == len(records), "every Spark task's partition is merged"
    return dataclasses.replace(summary, seconds=time.perf_counter() - start)
