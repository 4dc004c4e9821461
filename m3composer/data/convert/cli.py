"""`m3c convert`: the command line over `convert` and `merge_partitions`; options and their defaults
are the functions' (see the package docstring)."""
from __future__ import annotations

import argparse
import logging
import sys

from m3composer.data.buckets import DEFAULT_EDGES
from m3composer.data.convert.conversion import convert
from m3composer.data.convert.partitions import merge_partitions
from m3composer.data.convert.validation import DEFAULT_ON_ERROR, ON_ERROR
from m3composer.data.convert.workers import DEFAULT_WORKERS
from m3composer.data.convert.writer import DEFAULT_BATCH_ROWS, DEFAULT_COMPRESSION
from m3composer.data.rows import DEFAULT_MAX_LINE_BYTES


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
    parser.add_argument("--on-error", choices=ON_ERROR, default=DEFAULT_ON_ERROR,
                        help="fail: write nothing if any line is bad (default); skip: keep valid lines, "
                             "write rejects.jsonl")
    parser.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES,
                        help="reject longer lines (default 1 MiB)")
    parser.add_argument("--bucket-edges", type=_edges, default=DEFAULT_EDGES,
                        help="length-bucket edges for files without len-A-B in the name "
                             f"(default {','.join(map(str, DEFAULT_EDGES))}; the last bucket is open)")
    parser.add_argument("--local-cache", default=None, help="staging directory for object-store output")
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="rows tokenised per tokenizer call")
    parser.add_argument("--compression", default=DEFAULT_COMPRESSION, help="MDS shard compression ('' for none)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="processes converting files / row ranges in parallel (output as with 1)")
    parser.add_argument("--split-bytes", type=int, default=None,
                        help="with --workers: cut plain files larger than this into row ranges "
                             "(default: about 4 pieces per worker, 1-64 MiB)")
    parser.add_argument("--merge", action="store_true",
                        help="no INPUT: merge the partitions that write_partition wrote into --out "
                             "into one dataset (docs/operations.md: Converting on a cluster)")


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
