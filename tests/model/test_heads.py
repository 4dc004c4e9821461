"""m3composer.model.heads: pooling, per-token-id sparse weights, ColBERT vectors, on hand-made tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from m3composer.model import heads


def test_cls_and_mean_pooling():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert heads.pool_dense(hidden, mask, "cls").tolist() == [[1.0, 0.0]]
    assert heads.pool_dense(hidden, mask, "mean").tolist() == [[2.0, 2.0]]   # the padded row is ignored
    with pytest.raises(ValueError, match="pooling"):
        heads.pool_dense(hidden, mask, "max")


def test_l2_normalize_keeps_zero_rows_zero():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(heads.l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def _brute_force_vocab(weights, ids, vocab_size, special):
    """FlagEmbedding's construction: an (n, L, V) tensor, then max over positions, then zero the specials."""
    n, length = ids.shape
    full = torch.zeros(n, length, vocab_size)
    full.scatter_(2, ids.unsqueeze(-1), weights.unsqueeze(-1))
    vocab = full.max(dim=1).values
    vocab[:, special] = 0
    return vocab


def test_sparse_weights_take_the_max_per_token_id_and_zero_special_ids():
    ids = torch.tensor([[0, 5, 6, 5, 3, 2], [0, 7, 2, 1, 1, 1]])
    weights = torch.tensor([[0.9, 0.2, 0.4, 0.7, 0.5, 0.3], [0.8, 0.1, 0.6, 0.5, 0.5, 0.5]])
    vocab = heads.sparse_vocab_weights(weights, ids, 10, [0, 1, 2, 3])
    expected = torch.zeros(2, 10)
    expected[0, 5], expected[0, 6], expected[1, 7] = 0.7, 0.4, 0.1    # token 5 repeats: max(0.2, 0.7)
    assert torch.equal(vocab, expected)
    assert torch.equal(vocab, _brute_force_vocab(weights, ids, 10, [0, 1, 2, 3]))


def test_special_tokens_get_zero_weight_and_zero_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    linear = nn.Linear(8, 1)
    with torch.no_grad():
        linear.bias.fill_(5.0)                      # every position gets a positive weight
    ids = torch.tensor([[0, 5, 6, 5, 3, 2], [0, 7, 2, 1, 1, 1]])
    vocab = heads.sparse_vocab_weights(heads.sparse_token_weights(hidden, linear), ids, 10, [0, 1, 2, 3])
    assert (vocab[:, :4] == 0).all() and (vocab[0, [5, 6]] > 0).all()
    vocab.sum().backward()
    special_positions = ids < 4
    assert (hidden.grad[special_positions] == 0).all()
    assert hidden.grad[0, 2].abs().sum() > 0 and hidden.grad[1, 1].abs().sum() > 0   # tokens 6 and 7
    # repeated token 5 (positions 1 and 3): only the max position gets gradient
    assert (hidden.grad[0, 1].abs().sum() == 0) != (hidden.grad[0, 3].abs().sum() == 0)


def _autograd_vocab(weights, ids, vocab_size, special):
    """The plain-autograd construction `sparse_vocab_weights` replaces (torch's own amax backward)."""
    vocab = torch.zeros(ids.shape[0], vocab_size).scatter_reduce(1, ids, weights, reduce="amax", include_self=True)
    return vocab * heads.special_token_mask(vocab_size, special)


def test_sparse_weights_and_their_gradient_equal_plain_autograds_with_ties():
    """Repeated tokens with equal weights share the gradient, zero weights share it with the initial 0,
    special ids get none: bit for bit what autograd's scatter_reduce backward gives."""
    torch.manual_seed(0)
    ids = torch.randint(0, 12, (5, 40))
    weights = torch.rand(5, 40).round(decimals=1)            # few distinct values: many ties
    weights[weights < 0.2] = 0                               # zeros tie with the initial value
    ids[1][ids[1] == 7] = 8
    ids[1, :5], weights[1, :5] = 7, 0.5                      # one token five times, all at its maximum
    upstream = torch.randn(5, 12)
    results = []
    for build in (heads.sparse_vocab_weights, _autograd_vocab):
        w = weights.clone().requires_grad_(True)
        vocab = build(w, ids, 12, [0, 1, 2, 3])
        (vocab * upstream).sum().backward()
        results.append((vocab.detach(), w.grad))
    (ours, our_grad), (reference, reference_grad) = results
    assert torch.equal(ours, reference) and torch.equal(our_grad, reference_grad)
    assert torch.equal(our_grad[1, :5], torch.full((5,), float(upstream[1, 7]) / 5))
    assert (our_grad[ids < 4] == 0).all() and (our_grad != 0).sum() > 20


def test_sparse_weights_keep_no_vocabulary_sized_tensor_for_backward():
    weights = torch.rand(3, 16, requires_grad=True)
    vocab = heads.sparse_vocab_weights(weights, torch.randint(4, 1000, (3, 16)), 1000, [0, 1, 2, 3])
    saved = vocab.grad_fn.saved_tensors                     # (n, L) tensors and the (V,) mask
    assert saved and all(t.shape != (3, 1000) for t in saved) and sum(t.numel() for t in saved) < 3 * 1000


def test_sparse_weights_at_full_vocabulary_never_build_n_l_v():
    # (64, 512, 250002) floats would be 33 GB; the per-token-id max must stay at (64, 250002) = 64 MB
    n, length, vocab_size = 64, 512, 250_002
    ids = torch.randint(4, vocab_size, (n, length))
    weights = torch.rand(n, length, requires_grad=True)
    vocab = heads.sparse_vocab_weights(weights, ids, vocab_size, [0, 1, 2, 3])
    assert vocab.shape == (n, vocab_size)
    vocab.sum().backward()
    assert weights.grad.shape == (n, length)


def test_colbert_vectors_drop_cls_zero_padding_and_normalise():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    linear = nn.Linear(6, 3)
    vecs, vec_mask = heads.colbert_vectors(hidden, mask, linear, normalize=True)
    assert vecs.shape == (2, 3, 3) and vec_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.equal(vecs[1, 1:], torch.zeros(2, 3))
    assert torch.allclose(vecs[0].norm(dim=-1), torch.ones(3))
    raw = linear(hidden[0, 1])
    assert torch.allclose(vecs[0, 0], raw / raw.norm())


def test_a_fresh_sparse_head_starts_as_its_init_says():
    torch.manual_seed(0)
    for how in ("idf", "lexical_overlap"):      # idf starts as lexical overlap, then is fitted
        head = nn.Linear(4, 1)
        heads.init_fresh_sparse_head(head, how, temperature=0.04)
        assert torch.equal(head.weight, torch.zeros_like(head.weight)) and head.bias.item() == pytest.approx(0.2)
    default = nn.Linear(4, 1)
    before = default.weight.clone()
    heads.init_fresh_sparse_head(default, "default", temperature=0.04)
    assert torch.equal(default.weight, before)
    assert [h for h in heads.SPARSE_INITS if heads.needs_sparse_fit(h)] == ["idf"]
    with pytest.raises(ValueError, match="unknown sparse head init"):
        heads.init_fresh_sparse_head(default, "zeros", temperature=0.04)
