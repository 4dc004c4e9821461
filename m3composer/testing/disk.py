"""Disk usage of a cache folder that other threads are writing to (tests and benchmarks)."""
from __future__ import annotations

from pathlib import Path


def bytes_under(folder: Path) -> int:
    """Bytes of the files under `folder` now. A file that Streaming evicts, or a download's `.tmp`
    that is renamed, between the listing and its stat counts as gone (a watcher must not die on it)."""
    total = 0
    for path in folder.rglob("*") if folder.exists() else ():
        try:
            if path.is_file():
                total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total
