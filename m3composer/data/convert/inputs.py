"""The input of a conversion: JSONL files found and named, and the pieces they are cut into.

Each file is one *task*; its name is the file stem without the `len-A-B` tag (or the directory
name when the file is just `len-A-B.jsonl`), made unique and filesystem-safe. `len-A-B` in the file
name gives the length bucket (None: bucketed row by row by measured length, docs/recipe.md §Length
buckets); `parallel_` anywhere in the path marks parallel data. `plan_units` cuts plain files into
row ranges for parallel workers; `as_line` turns what a distributed engine hands over into a line.
Reading and validating one line is `data/rows.py`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from m3composer.data.buckets import Bucket, parse_bucket

INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")

_BUCKET_TAG = re.compile(r"[_.-]?len-\d+-(?:\d+|inf)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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


def base_name(file_name: str) -> str:
    """A file name without its suffix and its `len-A-B` tag: what names its task."""
    return _BUCKET_TAG.sub("", _strip_suffix(file_name))


def safe_name(name: str) -> str:
    """`name` with runs of characters unsafe in a path replaced by `_` (a task's folder name)."""
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
        base = base_name(resolved.name)
        identities.append((resolved.parent, safe_name(base or resolved.parent.name)))
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
            candidate = name if len(group) == 1 else f"{safe_name(ident[0].name)}__{name}"
            unique, n = candidate, 2
            while unique in taken:
                unique, n = f"{candidate}-{n}", n + 1
            taken.add(unique)
            names[ident] = unique
    return names


@dataclass(frozen=True)
class Unit:
    """A piece of work: a whole file, or the lines of a plain file that start in [start, end)."""
    file: InputFile
    start: int = 0
    end: int | None = None    # None: to the end of the file
    first_line: int = 1       # the file's line number of the line at `start`


def _line_ranges(path: Path, split_bytes: int, chunk: int = 1 << 20) -> list[tuple[int, int, int]]:
    """`(start, end, first_line)` ranges of about `split_bytes` that start at line starts.

    One pass counting newlines (no line is parsed or held whole), so that every range knows the
    file's line number of its first line and errors keep their global `file:line`.
    """
    size = path.stat().st_size
    ranges, start, first, lines, pos, target = [], 0, 1, 0, 0, split_bytes
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            i = 0
            while target < pos + len(block):
                j = block.find(b"\n", max(target - pos, i))
                if j < 0:
                    break
                cut = pos + j + 1
                if cut < size:
                    ranges.append((start, cut, first))
                    start, first = cut, lines + block.count(b"\n", 0, j + 1) + 1
                target, i = cut + split_bytes, j + 1
            lines += block.count(b"\n")
            pos += len(block)
    ranges.append((start, size, first))
    return ranges


def default_split_bytes(total_bytes: int, workers: int) -> int:
    """The row-range size when none is given: about 4 pieces per worker, 1-64 MiB each."""
    return min(max(total_bytes // (4 * workers), 1 << 20), 64 << 20)


def plan_units(files: list[InputFile], split_bytes: int | None) -> list[Unit]:
    """Whole files, plain files larger than `split_bytes` cut into row ranges (`.gz`: whole)."""
    units = []
    for f in files:
        if split_bytes is None or str(f.path).endswith(".gz") or f.path.stat().st_size <= split_bytes:
            units.append(Unit(f))
        else:
            units += [Unit(f, a, b, first) for a, b, first in _line_ranges(Path(f.path), split_bytes)]
    return units


def as_line(row) -> bytes:
    """A JSONL line from what an engine hands over: bytes, str, a dict or a Row with asDict()."""
    if isinstance(row, bytes):
        return row
    if isinstance(row, str):
        return row.encode("utf-8")
    if hasattr(row, "asDict"):            # pyspark.sql.Row
        row = row.asDict(recursive=True)
    # a DataFrame has every column in every row: a null means "not given", as a missing JSON field
    return json.dumps({k: v for k, v in dict(row).items() if v is not None}, ensure_ascii=False).encode("utf-8")
