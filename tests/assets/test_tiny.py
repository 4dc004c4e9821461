"""Proves `m3composer/assets/tiny.py`: the tiny XLM-R folder loads with the recorded shape,
carries the real tokenizer, runs 512-token inputs, is the same model on every build, and keeps
distinct texts apart (so retrieval tests on it rank real score gaps, not rounding noise)."""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from m3composer.model.folder_config import M3FolderConfig
from m3composer.assets.tiny import build_tiny


def test_tiny_folder_loads_as_a_2_layer_hidden_32_xlm_roberta(tiny_dir):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(tiny_dir, add_pooling_layer=False, output_loading_info=True)
    assert type(model).__name__ == "XLMRobertaModel"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 32, 2, 128)
    assert cfg.vocab_size == 250_002 and cfg.pad_token_id == 1
    # Every weight comes from the file; there is no pooler (CLS pooling is done by our heads).
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert not any(k.startswith("pooler") for k in load_file(tiny_dir / "model.safetensors"))
    assert (tiny_dir / "model.safetensors").is_file() and not (tiny_dir / "pytorch_model.bin").exists()


def test_tiny_folder_carries_the_e5_tokenizer(tiny_dir, tokenizer):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(tiny_dir, use_fast=True)
    slow = AutoTokenizer.from_pretrained(tiny_dir, use_fast=False)
    texts = ["Hello World!", "Der schnelle braune Fuchs.", "東京は日本の首都です。"]
    assert ours(texts)["input_ids"] == tokenizer(texts)["input_ids"] == slow(texts)["input_ids"]
    assert ours.encode("Hello World!") == [0, 35378, 6661, 38, 2]


def test_tiny_model_encodes_a_full_512_token_window(tiny_dir, tokenizer):
    """XLM-R positions run from pad+1 = 2, so 514 position rows are exactly enough for 512 tokens."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_dir, add_pooling_layer=False).eval()
    batch = tokenizer(["word " * 2000, "short"], padding=True, truncation=True, max_length=512, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 512)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, 512, 32) and torch.isfinite(hidden).all()


def test_tiny_metadata_is_a_bge_m3_layout(tiny_dir):
    assert M3FolderConfig.from_folder(tiny_dir) == M3FolderConfig(pooling="cls", normalize=True,
                                                                  query_instruction=None, passage_instruction=None)


def test_tiny_build_is_deterministic(tmp_path, tiny_dir, e5_dir):
    rebuilt = build_tiny(tmp_path / "tiny", tokenizer_dir=e5_dir)
    cached, fresh = load_file(tiny_dir / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert cached.keys() == fresh.keys()
    for name in cached:
        assert torch.equal(cached[name], fresh[name]), name
    # Random init, not zeros or copies of one value.
    assert cached["embeddings.word_embeddings.weight"].std() > 0.01


# Unrelated texts in several languages and scripts, code and numbers: no two say the same thing.
DISTINCT_TEXTS = ["the cat sat on the mat", "how do I open a file in python", "Der Hund läuft im Park",
                  "def main(): return 0", "numbers 1 2 3 4", "a quick brown fox jumps",
                  "what is the capital of france", "SELECT * FROM users", "ошибка при открытии файла",
                  "打开文件失败", "json.loads parses a string", "sorted() returns a new list"]


def test_tiny_model_gives_distinct_texts_clearly_different_dense_vectors(tiny_dir):
    """The guard against the collapse of transformers' default init at this size (every CLS vector
    the same, dense cosine 1.0000 between unrelated texts): see `assets/tiny.py`."""
    from m3composer.model.m3 import M3Model

    torch.manual_seed(0)
    out = M3Model.from_pretrained(tiny_dir).encode_texts(DISTINCT_TEXTS)
    dense = out["dense_vecs"]
    cosines = (dense @ dense.T)[~np.eye(len(DISTINCT_TEXTS), dtype=bool)]
    assert cosines.max() < 0.99, cosines.max()
    assert cosines.mean() < 0.9, cosines.mean()
    # tokens keep hidden states of their own: a random sparse head weights some tokens, not all or none
    kept = sum(len(w) for w in out["lexical_weights"])
    tokens = sum(len(set(ids)) - 2 for ids in M3Model.from_pretrained(tiny_dir).tokenizer(DISTINCT_TEXTS)["input_ids"])
    assert 0.05 * tokens < kept < 0.95 * tokens, (kept, tokens)
