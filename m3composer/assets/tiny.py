"""A tiny random-init XLM-R encoder over the real XLM-R tokenizer, for fast tests.

It has BGE-M3's layout (an `XLMRobertaModel`, CLS pooling, no instruction prefixes, vocabulary
size 250,002) at 2 layers x 32 hidden units, so tests exercise the real tokenisation, the real
sparse-head width and the real special ids while a training step stays in tens of milliseconds.
XLM-R numbers positions from pad+1, so 514 positions hold 512 tokens, as in bge-m3.

Why the attention weights get a larger init than transformers' (std 0.02 everywhere): at 0.02 the
attention logits are ~0, so every token attends uniformly, and the values are too small to move
the residual stream. The CLS vector is then `<s>`'s own embedding for every text (dense cosine
1.0000 between unrelated texts, so retrieval tests ranked rounding noise). Queries/keys at std 0.7
make attention peaked on a few content tokens, values/outputs at std 0.2 (about 1/sqrt(hidden))
make what is attended to count: unrelated texts then get dense cosines of about 0.2-0.8 while each
token keeps its own hidden state, so a random sparse head still gives some tokens positive weights
and some zero, and a few AdamW steps still lower the loss (larger query/key scales saturate the
softmax and train worse). `tests/assets/test_tiny.py` guards that distinct texts stay apart.
"""
from __future__ import annotations

import os
from pathlib import Path

from m3composer.model.folder_config import M3FolderConfig

TINY_HIDDEN_SIZE = 32
TINY_LAYERS = 2
TINY_HEADS = 2
TINY_INTERMEDIATE_SIZE = 128
TINY_SEED = 0
TINY_QUERY_KEY_INIT_STD = 0.7      # peaked attention (see the module docstring)
TINY_VALUE_OUTPUT_INIT_STD = 0.2   # attended tokens move the residual stream


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

    The weights depend only on TINY_SEED and the config, so every build gives the same model.
    """
    import torch
    from transformers import AutoTokenizer, XLMRobertaModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=True)
    torch.manual_seed(TINY_SEED)
    model = XLMRobertaModel(tiny_config(len(tokenizer)), add_pooling_layer=False)
    with torch.no_grad():
        for layer in model.encoder.layer:
            attention = layer.attention
            for linear in (attention.self.query, attention.self.key):
                linear.weight.normal_(0.0, TINY_QUERY_KEY_INIT_STD)
            for linear in (attention.self.value, attention.output.dense):
                linear.weight.normal_(0.0, TINY_VALUE_OUTPUT_INIT_STD)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    M3FolderConfig(pooling="cls", normalize=True, query_instruction=None, passage_instruction=None).save(out)
    return out
