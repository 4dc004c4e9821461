"""One FlagEmbedding JSONL line -> a valid training row, or an error naming file:line and a reason.

FlagEmbedding loads every file with a forced schema, so one extra field or one bad line crashes
the whole run (docs/recipe.md §Data format). Here every line is judged on its own:

* a valid line has a non-empty string `query`, `pos` = a non-empty list of non-empty strings,
  and optionally `neg` = a list of non-empty strings (missing `neg` means no hard negatives,
  like `neg: []`: the dataset then draws negatives from other rows), and optionally teacher
  scores `pos_scores`/`neg_scores`: lists of finite numbers, one per passage, given together;
* unknown fields (`prompt`, `type`, `id`, ...) are ignored, not fatal;
* anything else is a `RowError` with one of the `REASONS` codes below.

What counts as a line: the bytes between two `\\n` (a trailing `\\r` is dropped). The final
newline of a file does not start another line, so a file of N newline-terminated lines has N
lines, and a file without a final newline has as many lines as it has text lines. Blank lines
(empty or only whitespace) are lines too and are rejected as `blank_line`, so the counts of
kept and rejected rows always add up to the number of lines.

Teacher scores are optional per row: `m3c convert` keeps a file's scored and unscored rows
apart, as two streams of the same task and bucket, so that every batch is all-KD or all-plain
(a batch's teacher list is all or nothing, as in FlagEmbedding).
"""
from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator

DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB
EXCERPT_CHARS = 200

# reason code -> what it means (shown in the rejects report and the summary)
REASONS: dict[str, str] = {
    "line_too_long": "line longer than the size limit (--max-line-bytes)",
    "non_utf8": "line is not valid UTF-8",
    "blank_line": "line is empty or only whitespace",
    "invalid_json": "line is not valid JSON",
    "not_object": "JSON value is not an object",
    "missing_query": "no 'query' field",
    "bad_query": "'query' is not a string",
    "empty_query": "'query' is empty or only whitespace",
    "missing_pos": "no 'pos' field",
    "bad_pos": "'pos' is not a non-empty list of non-empty strings",
    "bad_neg": "'neg' is not a list of non-empty strings",
    "scores_without_partner": "only one of 'pos_scores' / 'neg_scores' is given",
    "bad_scores_type": "'pos_scores' / 'neg_scores' is not a list of numbers",
    "bad_scores_length": "'pos_scores' / 'neg_scores' length differs from 'pos' / 'neg'",
    "nonfinite_score": "a teacher score is NaN or infinite",
}


@dataclass(frozen=True)
class Row:
    """A validated training example (text, not yet tokenised)."""
    query: str
    pos: list[str]
    neg: list[str]
    pos_scores: list[float] | None
    neg_scores: list[float] | None
    path: str
    line_no: int

    @property
    def has_teacher_scores(self) -> bool:
        return self.pos_scores is not None


@dataclass(frozen=True)
class RowError:
    """A rejected line: where it is, why, and the start of its text for the rejects report."""
    path: str
    line_no: int
    reason: str
    detail: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.reason}: {self.detail}"

    def to_json(self) -> dict:
        return {"file": self.path, "line": self.line_no, "reason": self.reason,
                "detail": self.detail, "text": self.excerpt}

    @classmethod
    def from_json(cls, obj: dict) -> "RowError":
        return cls(obj["file"], int(obj["line"]), obj["reason"], obj["detail"], obj["text"])


def _excerpt(raw: bytes) -> str:
    return raw[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")[:EXCERPT_CHARS]


def _is_number(value) -> bool:
    # bool is an int subclass; `true` as a score is a type error, not 1.0
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _passages_error(value, *, allow_empty: bool) -> str | None:
    """Why `value` is not a list of non-empty strings (or None when it is)."""
    if not isinstance(value, list):
        return f"expected a list, got {type(value).__name__}"
    if not value and not allow_empty:
        return "empty list"
    for i, text in enumerate(value):
        if not isinstance(text, str):
            return f"item {i} is {type(text).__name__}, not a string"
        if not text.strip():
            return f"item {i} is an empty string"
    return None


def parse_line(raw: bytes, *, path: str, line_no: int,
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Row | RowError:
    """Validate one JSONL line (without its newline). Pure: no I/O, no state."""
    def error(reason: str, detail: str) -> RowError:
        return RowError(path, line_no, reason, detail, _excerpt(raw))

    if len(raw) > max_line_bytes:
        return error("line_too_long", f"more than {max_line_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return error("non_utf8", f"byte {exc.start}: {exc.reason}")
    if not text.strip():
        return error("blank_line", "no content")
    try:
        # Python's json accepts NaN/Infinity literals (and 1e999 overflows to inf); they are
        # caught below as nonfinite_score rather than here, which names the real problem.
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return error("invalid_json", f"{exc.msg} at column {exc.colno}")
    if not isinstance(obj, dict):
        return error("not_object", f"got a JSON {type(obj).__name__}")

    if "query" not in obj:
        return error("missing_query", "no 'query' field")
    query = obj["query"]
    if not isinstance(query, str):
        return error("bad_query", f"'query' is {type(query).__name__}")
    if not query.strip():
        return error("empty_query", "'query' is blank")

    if "pos" not in obj:
        return error("missing_pos", "no 'pos' field")
    why = _passages_error(obj["pos"], allow_empty=False)
    if why:
        return error("bad_pos", f"'pos': {why}")
    pos = obj["pos"]
    neg = obj.get("neg", [])
    why = _passages_error(neg, allow_empty=True)
    if why:
        return error("bad_neg", f"'neg': {why}")

    pos_scores = obj.get("pos_scores")
    neg_scores = obj.get("neg_scores")
    if pos_scores is None and neg_scores is None:
        return Row(query, pos, neg, None, None, path, line_no)
    if neg_scores is None and not neg:
        neg_scores = []  # no negatives: nothing to score
    if pos_scores is None or neg_scores is None:
        missing = "pos_scores" if pos_scores is None else "neg_scores"
        return error("scores_without_partner", f"'{missing}' is missing")
    for name, scores, passages in (("pos_scores", pos_scores, pos), ("neg_scores", neg_scores, neg)):
        if not isinstance(scores, list):
            return error("bad_scores_type", f"'{name}' is {type(scores).__name__}, not a list")
        for i, score in enumerate(scores):
            if not _is_number(score):
                return error("bad_scores_type", f"'{name}'[{i}] is {type(score).__name__}")
            if not math.isfinite(score):
                return error("nonfinite_score", f"'{name}'[{i}] is {score}")
        if len(scores) != len(passages):
            return error("bad_scores_length",
                         f"'{name}' has {len(scores)} values for {len(passages)} passages")
    return Row(query, pos, neg, [float(s) for s in pos_scores], [float(s) for s in neg_scores],
               path, line_no)


def iter_lines(path: str | os.PathLike, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, *,
               start: int = 0, end: int | None = None, first_line: int = 1,
               ) -> Iterator[tuple[int, bytes, int]]:
    """Yield `(line_no, raw, end_offset)` for every line of a plain or `.gz` JSONL file.

    `start`/`end`/`first_line` read one row range of a plain file (`start` at a line start, the
    range's lines numbered from `first_line`, the file's line number there): the lines that start
    in `[start, end)`. A `.gz` file is read whole.

    `raw` excludes the newline and is cut to `max_line_bytes + 1` bytes when longer, so a huge
    line is never held in memory whole yet still fails `parse_line`'s size check.
    `end_offset` is the position in the file on disk (compressed bytes for .gz), for progress bars.
    """
    is_gz = str(path).endswith(".gz")
    if is_gz and (start or end is not None):
        raise ValueError(f"{path}: a .gz file cannot be read by byte range")
    with open(path, "rb") as disk:
        stream: BinaryIO = gzip.GzipFile(fileobj=disk) if is_gz else disk
        if start:
            disk.seek(start)
        limit = max_line_bytes + 2  # the kept bytes plus room for "\r\n"
        line_no = first_line - 1
        while end is None or disk.tell() < end:
            chunk = stream.readline(limit)
            if not chunk:
                return
            line_no += 1
            head = chunk
            # drain the rest of an over-long line without keeping it
            while not chunk.endswith(b"\n"):
                chunk = stream.readline(limit)
                if not chunk:
                    break
            if head.endswith(b"\n"):
                head = head[:-1]
            if head.endswith(b"\r"):
                head = head[:-1]
            yield line_no, head[: max_line_bytes + 1], disk.tell()
