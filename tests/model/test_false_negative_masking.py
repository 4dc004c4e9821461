"""False-negative masking in ComposerM3 (docs/recipe.md §False-negative masking): on hand-built
batches, the masked loss of every head, the ensemble, self-distillation, KD and the bidirectional
term equals the loss computed by hand without the masked columns, with the same gradients; batches
without duplicates are untouched.

The batch is the reference batch (B = 2, G = 2: columns 0, 1 belong to query 0, columns 2, 3 to
query 1) with hand-chosen hash labels: the model only compares them.
"""
from __future__ import annotations

import pytest
import torch

from m3composer.model.composer_model import ComposerM3
from tests.model.conftest import build_recipe_model, model_settings, recipe_batch

G = 2
HEADS = ("dense", "sparse", "colbert", "ensemble")


def labelled(passage_hashes, positive_hashes, **kwargs) -> dict:
    batch = recipe_batch(**kwargs)
    batch["passage_hashes"] = torch.tensor(passage_hashes)
    batch["positive_hashes"] = torch.tensor(positive_hashes)
    return batch


def ce_without(row: torch.Tensor, keep: list[int], target: int) -> torch.Tensor:
    return -torch.log_softmax(row[keep], dim=0)[keep.index(target)]


def soft_ce_without(student: torch.Tensor, teacher: torch.Tensor, keep: list[int]) -> torch.Tensor:
    return -(torch.softmax(teacher[keep].detach(), dim=0) * torch.log_softmax(student[keep], dim=0)).sum()


# query 1's negative (column 3) is query 0's positive text
ANOTHER_QUERYS_NEGATIVE = ([10, 11, 12, 10], [[10], [12]], [[0, 1, 2], [0, 1, 2, 3]])
# both queries have the same positive text, and query 1 a second positive that is query 0's negative
SHARED_POSITIVE = ([10, 11, 10, 13], [[10, 10], [10, 11]], [[0, 1, 3], [2, 3]])


def hand_terms(model: ComposerM3, batch: dict, keep: list[list[int]]) -> dict[str, torch.Tensor]:
    """The unified + self-distill loss written out per row over the kept columns only."""
    scores = model(batch).scores
    terms = {h: torch.stack([ce_without(getattr(scores, h)[b], keep[b], b * G) for b in range(2)]).mean()
             for h in HEADS}
    terms["self_distill"] = sum(w * torch.stack([soft_ce_without(getattr(scores, h)[b], scores.ensemble[b], keep[b])
                                                 for b in range(2)]).mean()
                                for h, w in (("dense", 1.0), ("sparse", 0.1), ("colbert", 1.0))) / 3
    unified = (terms["dense"] + terms["ensemble"] + 0.1 * terms["sparse"] + terms["colbert"]) / 4
    terms["total"] = (unified + terms["self_distill"]) / 2
    return terms


def grads(model: ComposerM3) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", [ANOTHER_QUERYS_NEGATIVE, SHARED_POSITIVE],
                         ids=["another_querys_negative", "shared_positive_and_second_positive"])
def test_masked_loss_and_gradients_equal_the_hand_loss_without_those_columns(case):
    passage_hashes, positive_hashes, keep = case
    batch = labelled(passage_hashes, positive_hashes)
    masked = ComposerM3(build_recipe_model(), **model_settings(use_self_distill=True)).train()
    terms = masked.loss(masked(batch), batch)
    terms["total"].backward()
    by_hand = ComposerM3(build_recipe_model(), **model_settings(use_self_distill=True)).train()
    expected = hand_terms(by_hand, batch, keep)
    expected["total"].backward()
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), abs=1e-5), key
    assert terms["masked_negatives"].item() == sum(4 - len(k) for k in keep)
    got, want = grads(masked), grads(by_hand)
    assert set(got) == set(want)
    for name, g in want.items():
        assert torch.allclose(got[name], g, atol=1e-6, rtol=1e-4), name


def test_scores_of_masked_columns_get_no_gradient():
    batch = labelled(*ANOTHER_QUERYS_NEGATIVE[:2])
    model = ComposerM3(build_recipe_model(), **model_settings(use_self_distill=True)).train()
    out = model(batch)
    for head in HEADS:
        getattr(out.scores, head).retain_grad()
    model.loss(out, batch)["total"].backward()
    for head in HEADS:
        grad = getattr(out.scores, head).grad
        assert grad[0, 3].item() == 0.0, head                 # the masked entry
        assert (grad[0, :3] != 0).all() and (grad[1] != 0).all(), head   # every other entry still learns


def test_kd_masks_other_queries_copies_only():
    # column 1 (query 0's own negative) and column 3 (query 1's) are copies of query 0's positive
    batch = labelled([10, 10, 12, 10], [[10], [12]])
    model = ComposerM3(build_recipe_model(), **model_settings(heads=("dense",), knowledge_distillation=True)).train()
    dense = model(batch).scores.dense
    teacher = torch.softmax(batch["teacher_scores"], dim=-1)
    expected = 0.0
    for b, available in ((0, [0, 1, 2]), (1, [0, 1, 2, 3])):   # row 0 loses column 3 only: column 1 is a target
        available = list(available)
        for i in range(G):
            expected += teacher[b, i] * ce_without(dense[b], available, b * G + i) / 2
            available.remove(b * G + i)
    terms = model.loss(model(batch), batch)
    assert terms["dense"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert terms["masked_negatives"].item() == 2      # counted in the mask, though KD keeps column 1


def test_bidirectional_term_drops_the_query_with_the_same_positive():
    batch = labelled([10, 11, 10, 13], [[10], [10]], parallel=True)
    model = ComposerM3(build_recipe_model(), **model_settings(heads=("dense",))).train()
    dense = model(batch).scores.dense
    terms = model.loss(model(batch), batch)
    # passage→query rows: each positive has only its own query left, so L_bi = 0
    assert terms["bidirectional"].item() == pytest.approx(0.0, abs=1e-6)
    forward = torch.stack([ce_without(dense[0], [0, 1, 3], 0), ce_without(dense[1], [1, 2, 3], 2)]).mean()
    assert terms["dense"].item() == pytest.approx(forward.item(), abs=1e-5)


@pytest.mark.parametrize("kwargs", [dict(use_self_distill=True), dict(use_self_distill=True, knowledge_distillation=True),
                                    dict(heads=("dense",))])
def test_no_duplicates_or_switched_off_gives_exactly_todays_loss(kwargs):
    plain = recipe_batch()
    model = ComposerM3(build_recipe_model(), **model_settings(**kwargs)).train()
    today = model.loss(model(plain), plain)
    distinct = labelled([10, 11, 12, 13], [[10], [12]])
    assert {k: v.item() for k, v in model.loss(model(distinct), distinct).items()} == \
        {k: v.item() for k, v in today.items()}
    off = ComposerM3(build_recipe_model(), **model_settings(mask_false_negatives=False, **kwargs)).train()
    duplicated = labelled(*ANOTHER_QUERYS_NEGATIVE[:2])
    assert {k: v.item() for k, v in off.loss(off(duplicated), duplicated).items()} == \
        {k: v.item() for k, v in today.items()}
    assert today["masked_negatives"].item() == 0.0
