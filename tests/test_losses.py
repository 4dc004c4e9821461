"""m3composer.losses: each loss against hand-computed values, FlagEmbedding's reference numbers, and gradients."""
from __future__ import annotations

import math

import pytest
import torch

from m3composer import losses

# FlagEmbedding's score matrices of case A (docs/recipe.md §Reference numbers; already ÷ τ), B = 2 queries, G = 2.
S_DENSE = torch.tensor([[49.798645, 48.194595, 49.857792, 49.372311],
                        [49.849072, 48.351624, 49.808052, 49.277126]])
S_LEX = torch.tensor([[19.579647, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0]])
S_MUL = torch.tensor([[49.018509, 45.668518, 45.096268, 48.615753],
                      [49.709358, 46.539116, 47.023472, 48.651379]])
TEACHER_RAW = torch.tensor([[0.9, 0.1], [0.7, 0.6]])
G = 2


def row_ce(row: list[float], target: int) -> float:
    """−log softmax(row)[target], written out."""
    return -row[target] + math.log(sum(math.exp(x) for x in row))


def test_in_batch_targets_point_at_each_querys_positive():
    assert losses.in_batch_targets(3, 4).tolist() == [0, 4, 8]


def test_info_nce_matches_hand_computed_cross_entropy():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]])
    expected = (row_ce([2.0, 1.0, 0.0, -1.0], 0) + row_ce([0.5, 0.5, 3.0, 0.0], 2)) / 2
    got = losses.info_nce(scores, losses.in_batch_targets(2, G))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_m3_kd_loss_matches_hand_computed_rounds_with_masking():
    s = [[1.0, 2.0, 0.5, -1.0], [0.0, 1.5, 2.5, 1.0]]
    t = [[0.7, 0.3], [0.4, 0.6]]
    # round 0: own passage 0 is the target (columns 0 / 2), nothing masked
    round0 = (t[0][0] * row_ce(s[0], 0) + t[1][0] * row_ce(s[1], 2)) / 2
    # round 1: own passage 1 is the target (columns 1 / 3); the round-0 targets are removed from the rows
    row0 = [s[0][1], s[0][2], s[0][3]]          # column 0 masked
    row1 = [s[1][0], s[1][1], s[1][3]]          # column 2 masked
    round1 = (t[0][1] * row_ce(row0, 0) + t[1][1] * row_ce(row1, 2)) / 2
    got = losses.m3_kd_loss(torch.tensor(s), torch.tensor(t), G)
    assert got.item() == pytest.approx(round0 + round1, abs=1e-6)


def test_bidirectional_loss_is_passage_to_query_cross_entropy_over_positives():
    s = [[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]]
    # positive of q0 is column 0, of q1 column 2; passage a must find query a among both queries
    expected = (row_ce([s[0][0], s[1][0]], 0) + row_ce([s[0][2], s[1][2]], 1)) / 2
    assert losses.bidirectional_loss(torch.tensor(s), G).item() == pytest.approx(expected, abs=1e-6)


def test_bidirectional_loss_equals_forward_loss_for_symmetric_scores_and_g1():
    a = torch.randn(5, 5)
    symmetric = a + a.T
    targets = losses.in_batch_targets(5, 1)
    assert torch.allclose(losses.bidirectional_loss(symmetric, 1), losses.info_nce(symmetric, targets))


def test_unified_and_self_distill_coefficients():
    one = torch.tensor(1.0)
    assert losses.unified_loss(one * 4, one * 10, one * 8, one * 2).item() == pytest.approx((4 + 2 + 1 + 8) / 4)
    assert losses.combine_self_distill(one * 3, one).item() == pytest.approx(2.0)
    # self-distillation with a teacher equal to the student: the student terms are the teacher's entropy
    scores = torch.tensor([[1.0, 0.0, 2.0]])
    p = torch.softmax(scores, -1)
    entropy = -(p * p.log()).sum().item()
    got = losses.self_distill_loss(scores, scores, scores, scores).item()
    assert got == pytest.approx(entropy * (1 + 0.1 + 1) / 3, abs=1e-6)


def _ensemble(dense, lex, mul):
    return dense + 0.3 * lex + mul


def test_reference_case_a_and_b_in_batch_unified_with_and_without_self_distill():
    targets = losses.in_batch_targets(2, G)
    ens = _ensemble(S_DENSE, S_LEX, S_MUL)
    unified = losses.unified_loss(losses.info_nce(S_DENSE, targets), losses.info_nce(S_LEX, targets),
                                  losses.info_nce(S_MUL, targets), losses.info_nce(ens, targets))
    assert unified.item() == pytest.approx(1.104364, abs=1e-5)                       # case B
    total = losses.combine_self_distill(unified, losses.self_distill_loss(ens, S_DENSE, S_LEX, S_MUL))
    assert total.item() == pytest.approx(0.849707, abs=1e-5)                         # case A


def test_reference_case_c_m3_kd_loss_unified_with_self_distill():
    t = torch.softmax(TEACHER_RAW, dim=-1)
    ens = _ensemble(S_DENSE, S_LEX, S_MUL)
    unified = losses.unified_loss(losses.m3_kd_loss(S_DENSE, t, G), losses.m3_kd_loss(S_LEX, t, G),
                                  losses.m3_kd_loss(S_MUL, t, G), losses.m3_kd_loss(ens, t, G))
    total = losses.combine_self_distill(unified, losses.self_distill_loss(ens, S_DENSE, S_LEX, S_MUL))
    assert total.item() == pytest.approx(0.922237, abs=1e-5)


def test_reference_dense_only_loss():
    # the cross-device reference: dense-only loss of the full batch is 1.060854 (recipe.md §Reference numbers)
    assert losses.info_nce(S_DENSE, losses.in_batch_targets(2, G)).item() == pytest.approx(1.060854, abs=1e-5)


def test_self_distill_teacher_sends_no_gradient():
    dense, lex, mul = (x.clone().requires_grad_(True) for x in (S_DENSE, S_LEX, S_MUL))
    ens = _ensemble(dense, lex, mul)
    losses.self_distill_loss(ens, dense, lex, mul).backward()
    with_graph = [x.grad.clone() for x in (dense, lex, mul)]

    # same loss with the teacher built from constants: identical gradients means the teacher path adds nothing
    dense2, lex2, mul2 = (x.clone().requires_grad_(True) for x in (S_DENSE, S_LEX, S_MUL))
    losses.self_distill_loss(_ensemble(S_DENSE, S_LEX, S_MUL), dense2, lex2, mul2).backward()
    for a, b in zip(with_graph, (dense2.grad, lex2.grad, mul2.grad)):
        assert torch.equal(a, b)
    assert dense.grad.abs().sum() > 0

    leaf_teacher = _ensemble(S_DENSE, S_LEX, S_MUL).requires_grad_(True)
    losses.self_distill_loss(leaf_teacher, S_DENSE, S_LEX, S_MUL.clone().requires_grad_(True)).backward()
    assert leaf_teacher.grad is None


def test_m3_kd_loss_gradient_skips_masked_columns_only_in_later_rounds():
    # with a one-hot teacher on the positive, only round 0 counts: plain CE of the positive
    scores = S_MUL.clone().requires_grad_(True)
    one_hot = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    kd = losses.m3_kd_loss(scores, one_hot, G)
    ce = losses.info_nce(S_MUL, losses.in_batch_targets(2, G))
    assert kd.item() == pytest.approx(ce.item(), abs=1e-6)
    kd.backward()
    assert torch.isfinite(scores.grad).all()


def test_false_negative_mask_marks_copies_of_a_positive_but_never_the_own_positive_column():
    # B = 2, G = 2: column 1 (q0's negative) and column 3 (q1's negative) are copies of q0's positive (10);
    # q1's second positive (10, a row with two positives) makes column 0 a false negative of q1 too.
    hashes = torch.tensor([10, 10, 12, 10])
    positives = torch.tensor([[10, 10], [12, 10]])
    mask = losses.false_negative_mask(hashes, positives, group_size=2)
    assert mask.tolist() == [[False, True, False, True], [True, True, False, True]]
    # rows of rank 1 (first_row = 1) against all columns: its own positive column is 2, not 0
    assert losses.false_negative_mask(hashes, torch.tensor([[12, 12]]), 2, first_row=1).tolist() == \
        [[False, False, False, False]]


def test_masked_info_nce_equals_the_loss_without_those_columns_and_gives_them_no_gradient():
    scores = S_DENSE.clone().requires_grad_()
    mask = torch.tensor([[False, False, False, True], [True, False, False, False]])
    loss = losses.info_nce(losses.mask_scores(scores, mask), losses.in_batch_targets(2, G))
    expected = (row_ce(S_DENSE[0, :3].tolist(), 0) + row_ce(S_DENSE[1, 1:].tolist(), 1)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert scores.grad[mask].abs().max().item() == 0.0 and (scores.grad[~mask] != 0).all()
    assert losses.mask_scores(S_DENSE, None) is S_DENSE


def test_masked_m3_kd_loss_drops_other_queries_copies_and_keeps_its_own_group():
    teacher = torch.softmax(TEACHER_RAW, dim=-1)
    # column 2 is masked for row 0 (another query's passage); column 1 for row 1 is masked too;
    # column 1 for row 0 (its own negative) is in the mask but stays a target
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    got = losses.m3_kd_loss(S_DENSE, teacher, G, mask=mask).item()
    expected = 0.0
    for b, keep in ((0, [0, 1, 3]), (1, [0, 2, 3])):
        available = list(keep)
        for i in range(G):
            target = b * G + i
            row = [S_DENSE[b, c].item() for c in available]
            expected += teacher[b, i].item() * row_ce(row, available.index(target)) / 2
            available.remove(target)
    assert got == pytest.approx(expected, abs=1e-5)
    assert losses.m3_kd_loss(S_DENSE, teacher, G, mask=torch.zeros(2, 4, dtype=torch.bool)).item() == \
        losses.m3_kd_loss(S_DENSE, teacher, G).item()


def test_masked_bidirectional_loss_drops_a_query_whose_positive_is_the_same_text():
    # both queries have the same positive: mask[0, 2] and mask[1, 0]; passage→query rows then keep only their own query
    mask = torch.tensor([[False, False, True, False], [True, False, False, False]])
    assert losses.bidirectional_loss(S_DENSE, G, mask=mask).item() == pytest.approx(0.0, abs=1e-6)
    unmasked = losses.bidirectional_loss(S_DENSE, G)
    assert losses.bidirectional_loss(S_DENSE, G, mask=torch.zeros(2, 4, dtype=torch.bool)).item() == unmasked.item()


# ------------------------------------------------------------------ sparsity (recipe.md §Sparsity control)
W_Q = torch.tensor([[0.5, 0.0, 2.0, 0.0], [1.5, 1.0, 0.0, 0.0]])        # 2 queries over a vocabulary of 4
W_P = torch.tensor([[0.0, 0.0, 1.0, 3.0], [0.0, 2.0, 0.0, 0.0], [4.0, 0.0, 0.0, 1.0]])


def test_flops_is_the_sum_of_squared_mean_term_weights():
    # term means over the 2 queries: 1.0, 0.5, 1.0, 0.0
    assert losses.flops_regularizer(W_Q).item() == pytest.approx(1.0 + 0.25 + 1.0)
    # over the 3 passages: 4/3, 2/3, 1/3, 4/3
    assert losses.flops_regularizer(W_P).item() == pytest.approx((16 + 4 + 1 + 16) / 9)


def test_l1_is_the_mean_over_texts_of_the_sum_of_weights():
    assert losses.l1_regularizer(W_Q).item() == pytest.approx((2.5 + 2.5) / 2)
    assert losses.l1_regularizer(W_P).item() == pytest.approx((4 + 2 + 5) / 3)


def test_sparsity_loss_weights_queries_and_passages_apart():
    flops = losses.sparsity_loss(W_Q, W_P, "flops", 0.3, 0.1).item()
    assert flops == pytest.approx(0.3 * 2.25 + 0.1 * 37 / 9)
    assert losses.sparsity_loss(W_Q, W_P, "l1", 0.0, 2.0).item() == pytest.approx(2.0 * 11 / 3)
    with pytest.raises(ValueError, match="regularizer must be one of"):
        losses.sparsity_loss(W_Q, W_P, "none", 1.0, 1.0)


def test_sparsity_warmup_is_splades_quadratic_ramp():
    assert [losses.sparsity_warmup_scale(t, 10) for t in (0, 5, 10, 20)] == [0.0, 0.25, 1.0, 1.0]
    assert losses.sparsity_warmup_scale(0, 0) == 1.0
