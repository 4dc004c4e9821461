"""The tokenizer of a conversion: a local fast tokenizer, loaded untruncated, and its facts for m3_index.json."""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path


def load_tokenizer(tokenizer):
    """A fast tokenizer from a local folder (never a hub name), or the object itself."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    folder = Path(tokenizer)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found (a local model folder is required)")
    tok = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True,
                                        trust_remote_code=False)
    if not tok.is_fast:
        raise ValueError(f"{folder}: no fast tokenizer (tokenizer.json) in this folder")
    return tok


def tokenizer_facts(tok, tokenizer_arg) -> dict:
    """What m3_index.json records of the tokenizer: its folder name, vocabulary size and tokenizer.json's sha256."""
    name = str(tokenizer_arg) if isinstance(tokenizer_arg, (str, os.PathLike)) else tok.name_or_path
    facts = {"tokenizer": Path(name).name or name, "tokenizer_vocab_size": len(tok)}
    tok_json = Path(name) / "tokenizer.json"
    if tok_json.is_file():
        facts["tokenizer_sha256"] = hashlib.sha256(tok_json.read_bytes()).hexdigest()
    return facts


def load_untruncated(tokenizer):
    """`load_tokenizer` with the length limit lifted: rows are tokenised untruncated on purpose, and
    transformers would warn about every long one."""
    tok = load_tokenizer(tokenizer)
    tok.model_max_length = sys.maxsize
    return tok


@functools.lru_cache(maxsize=4)
def cached_tokenizer(folder: str):
    """One untruncated tokenizer per folder and process (`write_partition` runs once per partition)."""
    return load_untruncated(folder)
