"""`m3c convert`: FlagEmbedding JSONL -> tokenised MDS streams (one per task x length bucket).

Input: JSONL files or directories of them (searched recursively), plain or `.gz`; each file is one
*task*, bucketed by the `len-A-B` tag in its name or, without one, row by row by its measured token
length under `bucket_edges`, so FlagEmbedding's separate split script is not needed
(docs/recipe.md §Length buckets).

Output: `OUT/<task>/<bucket>/` MDS streams and `OUT/m3_index.json` (the contract is in
docs/architecture.md; the dataset reads exactly that), written last: a reader that finds the
index finds a complete dataset. With `on_error="fail"` (default) nothing is left behind by bad
input; with `on_error="skip"` bad lines go to `OUT/rejects.jsonl` and every line is accounted for.

One file per job:
    inputs.py        input files found and named; pieces of them for workers; engine rows as lines
    tokenizer.py     the fast tokenizer, untruncated, and its facts for m3_index.json
    validation.py    bad input: ConvertError, rejects.jsonl, line accounting, settings checks
    stream_stats.py  stream paths (plain / `.scored`), per-stream statistics, stream names
    writer.py        rows -> tokenised MDS rows (`Converter`)
    workers.py       `workers=N`: pieces converted in worker processes
    partitions.py    `write_partition` / `merge_partitions`: a conversion in pieces, merged
    spark.py         `convert_files` / `convert_dataframes`: `write_partition` as Spark tasks, merged
    publish.py       local swap into place, object-store upload with the index last
    summary.py       `ConvertSummary`: what a conversion did
    conversion.py    `convert`: one conversion, from inputs to a published dataset
    cli.py           `m3c convert`: add_arguments / run
"""
from m3composer.data.convert.conversion import convert
from m3composer.data.convert.inputs import INPUT_SUFFIXES, InputFile, Unit, discover_inputs, plan_units
from m3composer.data.convert.partitions import PARTS_DIR, merge_partitions, write_partition
from m3composer.data.convert.publish import UploadError
from m3composer.data.convert.stream_stats import SCORED, StreamStats, stream_path
from m3composer.data.convert.summary import ConvertSummary
from m3composer.data.convert.tokenizer import load_tokenizer
from m3composer.data.convert.validation import REJECTS_FILE, ConvertError
from m3composer.data.convert.writer import COLUMNS

__all__ = ["COLUMNS", "INPUT_SUFFIXES", "PARTS_DIR", "REJECTS_FILE", "SCORED", "ConvertError", "ConvertSummary",
           "InputFile", "StreamStats", "Unit", "UploadError", "convert", "discover_inputs", "load_tokenizer",
           "merge_partitions", "plan_units", "stream_path", "write_partition"]
