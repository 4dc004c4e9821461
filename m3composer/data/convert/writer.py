"""The writer: valid rows of one input -> tokenised rows of MDS streams, one per task x bucket.

Text is tokenised here, once, with the fast tokenizer in batches (identical strings in a batch are
tokenised once), untruncated, with `<s>`/`</s>`. Query/passage instructions are **not** applied
here: the collator inserts the instruction's token ids at training time, so one converted dataset
serves any instruction. Each line is validated by `data/rows.py`; what bad lines do is
`validation.py`'s. Shards carry `SHARD_HASH` hashes, checked when they are read
(`data/shard_checks.py`).
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from m3composer.data.buckets import Bucket, bucket_for_length
from m3composer.data.convert.inputs import InputFile, Unit
from m3composer.data.convert.stream_stats import StreamStats, stream_path
from m3composer.data.convert.validation import REJECTS_FILE
from m3composer.data.index import SHARD_HASH
from m3composer.data.rows import Row, RowError, iter_lines, parse_line

# The writer's settings that the command line also offers (`m3c convert --batch-rows`, ...).
DEFAULT_BATCH_ROWS = 1024          # rows tokenised per tokenizer call
DEFAULT_COMPRESSION = "zstd"       # MDS shard compression (None: none)
DEFAULT_SHARD_SIZE_LIMIT = 1 << 26  # bytes of one MDS shard before compression

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


class Converter:
    """One conversion run (or one partition of it) into a local directory.

    With `part=None` every stream is written to `out_dir/<stream path>/`; with a partition name,
    to `out_dir/<stream path>/<part>/`, to be merged with the other partitions' (`partitions.merge_parts`).
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
        elif self.part is None:   # a partition's rejects travel in its record (merge_parts writes them)
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
        """What a partition wrote, as JSON (`partitions.merge_parts` reads it back)."""
        return {"partition": self.part, "lines": self.lines, "kept": self.kept, "file_lines": self.file_lines,
                "errors": [e.to_json() for e in self.errors],
                "streams": [s.to_json() for s in self.stats.values()], **facts}
