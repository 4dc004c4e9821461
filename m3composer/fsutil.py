"""Filesystem helpers shared by every writer that must never leave a half-written result."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def publish_dir(built: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder `built` to `target`, replacing an existing `target`.

    `os.replace` cannot overwrite a non-empty folder, so an old `target` is first moved aside
    (same parent, so both renames are atomic on one filesystem), the new one renamed in, and
    the old one removed. A reader sees the old folder or the new one, never a mix.
    """
    built, target = Path(built), Path(target)
    if not target.exists():
        os.replace(built, target)
        return target
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside / target.name)
    os.replace(built, target)
    shutil.rmtree(aside, ignore_errors=True)
    return target
