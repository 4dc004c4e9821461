"""m3composer.model.scores: each head's score matrix by its formula, chunked ColBERT == unchunked."""
from __future__ import annotations

import torch

from m3composer.model import scores
from m3composer.model.scores import M3Reps


def test_dense_and_sparse_scores_are_inner_products_over_temperature():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    got = scores.dense_scores(q, p, 0.5)
    assert torch.allclose(got, torch.tensor([[0.0, 2.0, 1.2], [1.6, 1.2, 2.0]]))
    assert torch.allclose(scores.sparse_scores(q, p, 0.5), got)


def test_colbert_score_is_sum_of_max_sims_over_query_vectors():
    # one query with 2 real vectors + 1 padding row; one passage with 2 vectors + 1 padding (zero) row
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    q_mask = torch.tensor([[1, 1, 0]])
    p = torch.tensor([[[0.6, 0.8], [-1.0, 0.0], [0.0, 0.0]],
                      [[-0.6, -0.8], [-0.8, -0.6], [0.0, 0.0]]])
    got = scores.colbert_scores(q, q_mask, p, temperature=0.1)
    # passage 0: max(0.6, -1, 0) + max(0.8, 0, 0) = 1.4; passage 1: every real sim < 0, padding gives 0
    assert torch.allclose(got, torch.tensor([[1.4 / 2 / 0.1, 0.0]]))


def test_colbert_chunked_equals_full_in_values_and_gradients():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 5, 4), dim=-1).requires_grad_(True)
    p = torch.nn.functional.normalize(torch.randn(7, 6, 4), dim=-1).requires_grad_(True)
    q_mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    full = scores.colbert_scores(q, q_mask, p, 0.02)
    full.sum().backward()
    grads = q.grad.clone(), p.grad.clone()
    for budget in (5 * 6 * 2, 5 * 6, 7):       # passage chunks; one passage per chunk; query chunks too
        q.grad = p.grad = None
        chunked = scores.colbert_scores(q, q_mask, p, 0.02, max_elements=budget)
        assert torch.allclose(chunked, full, atol=1e-5)
        chunked.sum().backward()
        assert torch.allclose(q.grad, grads[0], atol=1e-5) and torch.allclose(p.grad, grads[1], atol=1e-5)


def test_ensemble_weights_and_score_dispatch():
    d, s, c = torch.ones(1, 2), torch.full((1, 2), 10.0), torch.full((1, 2), 2.0)
    assert torch.allclose(scores.ensemble_scores(d, s, c), torch.full((1, 2), 1 + 3 + 2.0))
    dense_only = scores.score(M3Reps(dense=torch.eye(2)), M3Reps(dense=torch.eye(2)), 1.0)
    assert dense_only.sparse is None and dense_only.ensemble is None
    assert torch.equal(dense_only.dense, torch.eye(2))


def test_scores_are_fp32_for_bf16_reps():
    q = torch.randn(2, 4).to(torch.bfloat16)
    assert scores.dense_scores(q, q, 0.02).dtype == torch.float32
