"""What a conversion does with bad input: the error that lists every defect, the rejects report, the
line accounting (every line is kept or rejected), and the checks of the settings.

Whether one JSONL line is a valid row is `data/rows.py` (`parse_line`); this module handles what
the lines' verdicts add up to. With `on_error="fail"` the first bad line stops all writing, the rest
of the input is still validated, and `ConvertError` lists the defects; with `on_error="skip"` bad
lines go to `OUT/rejects.jsonl`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from m3composer.fsutil import atomic_file
from m3composer.data.rows import RowError

ON_ERROR = ("fail", "skip")     # what bad input lines do: stop the conversion, or go to rejects.jsonl
DEFAULT_ON_ERROR = ON_ERROR[0]
REJECTS_FILE = "rejects.jsonl"
MAX_ERRORS_SHOWN = 20


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")


def count_by_reason(errors: list[RowError]) -> dict[str, int]:
    by_reason: dict[str, int] = {}
    for err in errors:
        by_reason[err.reason] = by_reason.get(err.reason, 0) + 1
    return by_reason


class ConvertError(ValueError):
    """Bad input under `on_error="fail"`: carries every defect found (the message shows the first)."""

    def __init__(self, errors: list[RowError], lines: int):
        self.errors = errors
        by_reason = count_by_reason(errors)
        shown = "\n".join(f"  {err}" for err in errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items()))
        super().__init__(f"{len(errors)} bad line(s) of {lines} ({counts}); nothing was written "
                         f"(use --on-error=skip to keep the valid lines):\n{shown}{more}")


@dataclass
class Totals:
    """Line accounting of a whole conversion: one converter's, or the sum of its partitions'."""
    lines: int
    kept: int
    errors: list[RowError]
    file_lines: dict[str, int]


def totals_of_parts(parts: list[dict]) -> Totals:
    """The sum of the partitions' line accounting (their records, `Converter.record`)."""
    file_lines: dict[str, int] = {}
    for p in parts:
        for name, n in p["file_lines"].items():
            file_lines[name] = file_lines.get(name, 0) + n
    return Totals(sum(p["lines"] for p in parts), sum(p["kept"] for p in parts),
                  [RowError.from_json(e) for p in parts for e in p["errors"]], file_lines)


def write_rejects(folder: Path, errors: list[RowError]) -> None:
    """`folder/rejects.jsonl`: one JSON line per bad input line (`RowError.to_json`)."""
    with atomic_file(folder / REJECTS_FILE) as fh:
        for err in errors:
            fh.write(json.dumps(err.to_json(), ensure_ascii=False) + "\n")


def check_edges(bucket_edges) -> tuple[int, ...]:
    """The length-bucket edges as integers; they start at 0 and increase strictly."""
    bucket_edges = tuple(int(e) for e in bucket_edges)
    if not bucket_edges or bucket_edges[0] != 0 or list(bucket_edges) != sorted(set(bucket_edges)):
        raise ValueError(f"bucket_edges must start at 0 and increase strictly, got {bucket_edges}")
    return bucket_edges
