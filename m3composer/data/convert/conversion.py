"""`convert`: one conversion of JSONL files into a dataset, local or on an object store, by one
process or by `workers` processes (the package docstring says what it writes)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from m3composer.fsutil import publish_dir
from m3composer.data.buckets import DEFAULT_EDGES
from m3composer.data.convert.inputs import Unit, default_split_bytes, discover_inputs, plan_units
from m3composer.data.convert.partitions import merge_parts
from m3composer.data.convert.publish import prepare_local_out, remote_is_used, upload
from m3composer.data.convert.stream_stats import finalize_streams
from m3composer.data.convert.summary import ConvertSummary, summarize
from m3composer.data.convert.tokenizer import load_tokenizer, tokenizer_facts
from m3composer.data.convert.validation import (DEFAULT_ON_ERROR, ConvertError, Totals, check_edges, check_on_error,
                                                totals_of_parts, write_rejects)
from m3composer.data.convert.workers import DEFAULT_WORKERS, run_workers
from m3composer.data.convert.writer import (DEFAULT_BATCH_ROWS, DEFAULT_COMPRESSION, DEFAULT_SHARD_SIZE_LIMIT,
                                            Converter)
from m3composer.data.index import is_remote, write_index
from m3composer.data.rows import DEFAULT_MAX_LINE_BYTES


def convert(inputs: list[str | os.PathLike] | str | os.PathLike, out: str | os.PathLike, tokenizer, *,
            on_error: str = DEFAULT_ON_ERROR, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
            bucket_edges: tuple[int, ...] = DEFAULT_EDGES, batch_rows: int = DEFAULT_BATCH_ROWS,
            local_cache: str | os.PathLike | None = None, overwrite: bool = False,
            compression: str | None = DEFAULT_COMPRESSION, shard_size_limit: int = DEFAULT_SHARD_SIZE_LIMIT,
            progress: bool | None = None, workers: int = DEFAULT_WORKERS,
            split_bytes: int | None = None) -> ConvertSummary:
    """Convert FlagEmbedding JSONL to MDS streams + m3_index.json under `out` (dir or URL).

    `tokenizer`: a local model folder or a loaded fast tokenizer. Raises `ConvertError` on bad
    lines when `on_error="fail"`; with `"skip"` they are reported in `OUT/rejects.jsonl`.
    `workers > 1` converts files, and row ranges of plain files over `split_bytes` (default: the
    input split in about 4 pieces per worker, 1-64 MiB each), in that many processes, and merges
    them: the same rows in the same order, ids, errors and index as one worker; only the shard
    files differ (each stream's shards sit in one `part-NNNNN/` folder per piece).
    """
    from tqdm.auto import tqdm

    check_on_error(on_error)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bucket_edges = check_edges(bucket_edges)
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
        replace_remote = remote_is_used(remote, overwrite)
        staging_root = Path(tempfile.mkdtemp(prefix="m3c-convert-", dir=local_cache))
        work = staging_root / "dataset"
        work.mkdir()
    else:
        work = prepare_local_out(Path(out_str), overwrite)

    settings = dict(bucket_edges=bucket_edges, on_error=on_error, max_line_bytes=max_line_bytes,
                    batch_rows=batch_rows, compression=compression, shard_size_limit=shard_size_limit)
    conv = Converter(work, tok, **settings)
    total_bytes = sum(f.path.stat().st_size for f in files)
    # hashing tokenizer.json (tens of MB) overlaps with reading the first batch
    facts = conv.pool.submit(tokenizer_facts, tok, tokenizer)
    parts: list[dict] = []
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert",
                  disable=(not progress) if progress is not None else None) as bar:
            if workers == 1:
                for inp in files:
                    conv.convert_unit(Unit(inp), bar)
            else:
                if split_bytes is None:
                    split_bytes = default_split_bytes(total_bytes, workers)
                parts = run_workers(plan_units(files, split_bytes), work,
                                    tokenizer if isinstance(tokenizer, (str, os.PathLike)) else tok,
                                    settings, workers, bar)
        conv.close()
        totals = (totals_of_parts(parts) if parts
                  else Totals(conv.lines, conv.kept, conv.errors, conv.file_lines))
        if totals.errors and on_error == "fail":
            raise ConvertError(totals.errors, totals.lines)
        stats = merge_parts(parts, work) if parts else list(conv.stats.values())
        if parts and totals.errors:
            write_rejects(work, totals.errors)
        entries, notes = finalize_streams(stats, work)
        # last: its presence means complete
        index = write_index(work, {**facts.result(), "bucket_edges": list(bucket_edges)}, entries)
        if remote:
            upload(work, remote, replace_remote)
        else:
            publish_dir(work, Path(out_str))
    finally:
        conv.shutdown()
        tok.model_max_length = saved_max_length
        if conv.rejects_fh is not None:
            conv.rejects_fh.close()
        shutil.rmtree(staging_root if remote else work, ignore_errors=True)

    return summarize(out_str, remote, [f.source_name for f in files], totals, index, notes, start,
                     workers=workers, partitions=len(parts))
