"""Length-grouped encoding (m3composer/model/m3.py: length_chunks, encoder_hidden, encode_many):
the chunk plan, and the same representations and gradients as one padded call per part."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaModel

from m3composer.model.composer_model import ComposerM3
from m3composer.model.m3 import M3Model, length_chunks
from tests.model.conftest import model_settings


def _as_lists(chunks):
    return [sorted(int(i) for i in c) for c in chunks]


def test_chunks_cover_every_row_once_shortest_chunk_first():
    lengths = [37, 5, 120, 64, 5, 99, 12, 64, 3, 128]
    chunks = length_chunks(lengths, hidden_size=64, overhead_tokens=16)
    rows = np.concatenate(chunks)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    longest = [max(lengths[i] for i in c) for c in chunks]
    assert longest == sorted(longest)
    for c in chunks:   # rows of a chunk in input order
        assert list(c) == sorted(c)


def test_chunk_plan_minimises_padded_tokens_plus_call_overhead():
    # Huge hidden size: the attention term vanishes and the cost is padded tokens + overhead per chunk.
    # lengths 100, 90, 10 with overhead 50:
    #   {100,90,10}: 3·100 + 50 = 350;  {100,90}{10}: 2·100 + 10 + 100 = 310 (best)
    #   {100}{90,10}: 100 + 2·90 + 100 = 380;  three chunks: 200 + 150 = 350
    assert _as_lists(length_chunks([100, 90, 10], hidden_size=10 ** 9, overhead_tokens=50)) == [[2], [0, 1]]
    # free calls: one chunk per distinct length; prohibitive calls: one chunk
    assert _as_lists(length_chunks([10, 100, 10, 100], hidden_size=10 ** 9, overhead_tokens=0)) == [[0, 2], [1, 3]]
    assert _as_lists(length_chunks([10, 100, 10, 100], hidden_size=10 ** 9, overhead_tokens=10 ** 6)) == [[0, 1, 2, 3]]
    assert _as_lists(length_chunks([7], hidden_size=64)) == [[0]]


def _model() -> M3Model:
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64, pad_token_id=1, type_vocab_size=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = XLMRobertaModel(cfg, add_pooling_layer=False)
    return M3Model(encoder, nn.Linear(16, 16), nn.Linear(16, 1), pooling="cls", normalize=True,
                   special_token_ids={"cls": 0, "pad": 1, "eos": 2, "unk": 3})


def _ids(lengths, width, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, n - 1] = 0, 2
        ids[row, 1:n - 1] = torch.randint(4, 50, (n - 2,), generator=g)
    return ids, (ids != 1).long()


def _batch():
    q_ids, q_mask = _ids([5, 12, 3, 8], 12, seed=1)
    p_ids, p_mask = _ids([30, 4, 17, 9, 40, 6, 22, 11], 40, seed=2)
    return {"query_input_ids": q_ids, "query_attention_mask": q_mask, "passage_input_ids": p_ids,
            "passage_attention_mask": p_mask, "teacher_scores": torch.zeros(4, 2),
            "has_teacher_scores": torch.tensor(False), "is_parallel": torch.tensor(False), "row_ids": torch.arange(4)}


def _losses_and_grads(grouping: bool):
    composer = ComposerM3(_model(), **model_settings(train_group_size=2, use_self_distill=True))
    composer.model.length_grouping = grouping
    composer.model.length_grouping_overhead_tokens = 1.0   # many chunks, mixing queries and passages
    batch = _batch()
    out = composer(batch)
    terms = composer.loss(out, batch)
    terms["total"].backward()
    grads = {n: p.grad.clone() for n, p in composer.named_parameters() if p.grad is not None}
    return out, terms, grads


def test_grouped_encoding_gives_the_padded_results_and_gradients():
    batch = _batch()
    lengths = torch.cat([batch["query_attention_mask"].sum(1), batch["passage_attention_mask"].sum(1)])
    assert len(length_chunks(lengths.tolist(), 16, overhead_tokens=1.0)) >= 3   # really several chunks
    out_a, terms_a, grads_a = _losses_and_grads(grouping=False)
    out_b, terms_b, grads_b = _losses_and_grads(grouping=True)
    for side in ("queries", "passages"):
        a, b = getattr(out_a, side), getattr(out_b, side)
        torch.testing.assert_close(b.dense, a.dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.sparse, a.sparse, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.colbert, a.colbert, rtol=1e-5, atol=1e-6)
        assert torch.equal(b.colbert_mask, a.colbert_mask)
    for key in terms_a:
        torch.testing.assert_close(terms_b[key], terms_a[key], rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        if name.endswith("attention.self.key.bias"):
            continue   # softmax is invariant to the key bias: its true gradient is 0, both are rounding noise
        scale = grads_a[name].abs().max().clamp_min(1e-8)
        assert (grads_b[name] - grads_a[name]).abs().max() / scale < 1e-4, name


def test_encoder_sees_chunks_padded_to_their_own_longest_row():
    model = _model().eval()
    model.length_grouping_overhead_tokens = 1.0
    widths = []
    model.encoder.register_forward_pre_hook(lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                            with_kwargs=True)
    batch = _batch()
    with torch.no_grad():
        model.encode_many([(batch["query_input_ids"], batch["query_attention_mask"]),
                           (batch["passage_input_ids"], batch["passage_attention_mask"])])
    assert len(widths) >= 3
    assert sum(r for r, _ in widths) == 12                      # every row once
    padded = sum(r * w for r, w in widths)
    assert padded < 12 * 40 / 2                                 # one padded call would be 480 tokens
    widths.clear()
    model.length_grouping = False
    with torch.no_grad():
        model.encode_many([(batch["query_input_ids"], batch["query_attention_mask"]),
                           (batch["passage_input_ids"], batch["passage_attention_mask"])])
    assert widths == [torch.Size([4, 12]), torch.Size([8, 40])]


def test_left_padding_is_encoded_in_one_call():
    model = _model().eval()
    model.length_grouping_overhead_tokens = 1.0
    ids, mask = _ids([5, 12, 3, 8], 12, seed=3)
    left_ids, left_mask = torch.ones_like(ids), torch.zeros_like(mask)
    for row, n in enumerate(mask.sum(1).tolist()):
        left_ids[row, 12 - n:], left_mask[row, 12 - n:] = ids[row, :n], 1
    calls = []
    model.encoder.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    with torch.no_grad():
        model.encode(left_ids, left_mask)
    assert len(calls) == 1


@pytest.mark.parametrize("device_type,expected", [("cpu", 128.0), ("cuda", 1024.0)])
def test_default_overhead(device_type, expected):
    from m3composer.model.m3 import default_overhead_tokens
    assert default_overhead_tokens(64, device_type) == expected
