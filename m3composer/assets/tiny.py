"""A tiny random-init XLM-R encoder over the real XLM-R tokenizer, for fast tests.

It has BGE-M3's layout (an `XLMRobertaModel`, CLS pooling, no instruction prefixes, vocabulary
size 250,002) at 2 layers x 32 hidden units, so tests exercise the real tokenisation, the real
sparse-head width and the real special ids while a training step stays in tens of milliseconds.
XLM-R numbers positions from pad+1, so 514 positions hold 512 tokens, as in bge-m3.
"""
from __future__ import annotations

import os
from pathlib import Path

from m3composer.assets.paths import write_model_meta

TINY_HIDDEN_SIZE = 32
TINY_LAYERS = 2
TINY_HEADS = 2
TINY_INTERMEDIATE_SIZE = 128
TINY_SEED = 0


def tiny_config(vocab_size: int):
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN_SIZE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        intermediate_size=TINY_INTERMEDIATE_SIZE,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
    )


def build_tiny(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> Path:
    """Write the tiny model (safetensors), the tokenizer from `tokenizer_dir`, and `m3composer.json`.

    The weights depend only on the seed and the config, so every build gives the same model.
    """
    import torch
    from transformers import AutoTokenizer, XLMRobertaModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=True)
    torch.manual_seed(TINY_SEED)
    model = XLMRobertaModel(tiny_config(len(tokenizer)), add_pooling_layer=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_model_meta(out, pooling="cls", normalize=True, query_instruction=None, passage_instruction=None)
    return out
