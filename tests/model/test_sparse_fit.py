"""The idf fit of a fresh sparse head (model/sparse_fit.py) on the tiny model and real tokenised text."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from m3composer.model.m3 import M3Model
from m3composer.model.sparse_fit import fit_sparse_head_to_idf, idf_of

TEXTS = [
    "the os module provides a portable way of using operating system dependent functionality",
    "the json module encodes and decodes javascript object notation",
    "the re module provides regular expression matching operations",
    "the socket module gives access to the bsd socket interface",
    "the zipfile module reads and writes zip archive files",
    "the sqlite3 module is an interface to the sqlite database engine",
    "the heapq module implements the heap queue algorithm",
    "the argparse module makes it easy to write command line interfaces",
]


def _ids(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)


def test_idf_is_bm25s_and_zero_for_special_ids():
    passages = [np.array([0, 5, 6, 2]), np.array([0, 5, 7, 2]), np.array([0, 5, 5, 2])]
    idf = idf_of(passages, 10, special_ids=[0, 1, 2])
    assert idf[5] == pytest.approx(np.log1p(0.5 / 3.5))           # in every passage: near 0
    assert idf[6] == pytest.approx(np.log1p(2.5 / 1.5))           # in one of three
    assert idf[0] == idf[2] == 0 and idf[9] == pytest.approx(np.log1p(3.5 / 0.5))


def test_fit_weighs_rare_tokens_above_common_ones_and_keeps_the_architecture(tiny_dir):
    m3 = M3Model.from_pretrained(tiny_dir)
    tok = m3.tokenizer
    passages = [_ids(tok, t) for t in TEXTS]
    queries = [_ids(tok, "what does the " + t.split()[1] + " module do") for t in TEXTS]
    weight_before = m3.sparse_linear.weight.detach().clone()
    m3.train()
    facts = fit_sparse_head_to_idf(m3, passages, queries, temperature=0.02, pad_id=tok.pad_token_id)
    assert m3.training                                            # the mode is restored
    assert facts["passages"] == len(passages) and facts["positions"] > 0 and 0 < facts["r2"] <= 1
    assert not torch.equal(m3.sparse_linear.weight, weight_before)
    assert m3.sparse_linear.weight.shape == weight_before.shape   # still Linear(H -> 1): BGEM3FlagModel loads it

    # per-token weights of the passages: "the"/"module" are in every passage, the module names in one
    idf = idf_of(passages, m3.vocab_size, m3.special_token_ids.values())
    m3.eval()
    common, rare = [], []
    with torch.no_grad():
        for ids in passages:
            x = torch.as_tensor(ids)[None]
            w = torch.relu(m3.sparse_linear(m3.encoder_hidden(x, torch.ones_like(x)))).squeeze(-1)[0]
            for token, weight in zip(ids[1:-1], w[1:-1].tolist()):
                (common if idf[token] < 0.2 else rare).append(weight)
    assert common and rare
    assert np.mean(rare) > 1.3 * np.mean(common)      # 0.119 vs 0.072 here: hidden 32 holds idf only roughly
    # the scale: a token of average idf is worth about one logit after / tau (c^2 * mean(idf^2) = tau)
    assert facts["scale"] ** 2 * np.mean(np.square(idf[np.concatenate([p[1:-1] for p in passages])])) == \
        pytest.approx(0.02, rel=0.5)


def test_fit_is_a_pure_function_of_the_model_and_the_ids(tiny_dir):
    heads = []
    for _ in range(2):
        m3 = M3Model.from_pretrained(tiny_dir)
        passages = [_ids(m3.tokenizer, t) for t in TEXTS]
        fit_sparse_head_to_idf(m3, passages, [], temperature=0.02, pad_id=m3.tokenizer.pad_token_id)
        heads.append(torch.cat([m3.sparse_linear.weight.flatten(), m3.sparse_linear.bias]))
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-6, atol=1e-9)


def test_fit_without_passages_is_an_error(tiny_dir):
    m3 = M3Model.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="at least one training passage"):
        fit_sparse_head_to_idf(m3, [], [], temperature=0.02, pad_id=1)
