"""Filesystem helpers shared by every writer that must never leave a half-written result.

Two shapes cover every writer of the package: a file written beside its target and renamed over it
(`atomic_file`, `write_json_atomic`), and a folder built beside its target and swapped in
(`building_dir`, `publish_dir`). A crash at any point leaves the old result or the new one, and at
most a dot-prefixed temporary that the next run ignores. What they publish has the modes a plain
`open` or `mkdir` would give under the process's umask (`tempfile` makes its files 0600 and its
folders 0700, which would keep a model from a serving process under another account).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def umask() -> int:
    """The process's umask (read without changing it where /proc says it; Linux 4.7 and later)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed.
    Text modes default to UTF-8 and '\\n' line ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
        open_kwargs.setdefault("newline", "\n")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


@contextmanager
def building_dir(target: str | os.PathLike, prefix: str | None = None) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to build into; on success it replaces `target`
    (`publish_dir`), on error it is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _modes_of_plain_writes(tmp)
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _modes_of_plain_writes(folder: Path) -> None:
    """Give `folder` and everything in it the modes `mkdir` and `open` give under the umask: some
    writers make private files (tempfile, safetensors' `save_file`: 0600)."""
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
