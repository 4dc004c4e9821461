"""What a conversion did, for the caller and the command line (`ConvertSummary.table`)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from m3composer.data.convert.validation import REJECTS_FILE, Totals, count_by_reason

log = logging.getLogger(__name__)


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


def summarize(out_str: str, remote: str | None, sources: list[str], conv: Totals, index: dict, notes: list[str],
              start: float, **how) -> ConvertSummary:
    """The summary of a finished conversion or merge; logs the empty input files."""
    empty_files = [name for name in sources if conv.file_lines.get(name, 0) == 0]
    for name in empty_files:
        log.warning("%s: empty file (no lines); it contributes no rows", name)
    warnings = [f"{name}: empty file" for name in empty_files]
    warnings += [f"{s['name']}: {s['rows_outside_bucket']} row(s) longer/shorter than the bucket in the file name"
                 for s in index["streams"] if s["rows_outside_bucket"]]
    by_reason = count_by_reason(conv.errors)
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
