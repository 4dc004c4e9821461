"""The lexical-sparsity regulariser in ComposerM3 (docs/recipe.md §Sparsity control): the logged term
equals a hand computation from the sparse head's per-position weights, it is added to the total once,
scaled by the warm-up, and training with it leaves far fewer non-zero lexical weights."""
from __future__ import annotations

import pytest
import torch

from m3composer.model.composer_model import ComposerM3, SparsityRegularizer
from m3composer.model.m3 import M3Model
from tests.model.conftest import RECIPE_SPECIAL_IDS, build_recipe_model, model_settings, recipe_batch
from tests.model.test_composer_model import text_batch


def hand_vocab_vectors(m3: M3Model, ids: torch.Tensor, mask: torch.Tensor) -> list[dict[int, float]]:
    """Per text, {token id: max over its positions of ReLU(sparse_linear(h))}, special ids left out."""
    with torch.no_grad():
        hidden = m3.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = torch.relu(m3.sparse_linear(hidden)).squeeze(-1)
    special = set(RECIPE_SPECIAL_IDS.values())
    texts = []
    for row in range(ids.shape[0]):
        vector: dict[int, float] = {}
        for token, w, real in zip(ids[row].tolist(), weights[row].tolist(), mask[row].tolist()):
            if real and token not in special:
                vector[token] = max(vector.get(token, 0.0), w)
        texts.append(vector)
    return texts


def hand_flops(texts: list[dict[int, float]]) -> float:
    vocab = set().union(*texts)
    return sum((sum(t.get(v, 0.0) for t in texts) / len(texts)) ** 2 for v in vocab)


def hand_l1(texts: list[dict[int, float]]) -> float:
    return sum(sum(t.values()) for t in texts) / len(texts)


@pytest.mark.parametrize("regularizer, by_hand", [("flops", hand_flops), ("l1", hand_l1)])
def test_the_term_equals_a_hand_computation_and_is_added_to_the_total(regularizer, by_hand):
    batch = recipe_batch()
    settings = dict(use_self_distill=True, heads=("dense", "sparse"))
    model = ComposerM3(build_recipe_model(), **model_settings(
        sparsity=SparsityRegularizer(regularizer, 0.3, 0.1), **settings)).eval()   # eval: no dropout anywhere
    terms = model.loss(model(batch), batch)
    queries = hand_vocab_vectors(model.model, batch["query_input_ids"], batch["query_attention_mask"])
    passages = hand_vocab_vectors(model.model, batch["passage_input_ids"], batch["passage_attention_mask"])
    expected = 0.3 * by_hand(queries) + 0.1 * by_hand(passages)
    assert expected > 0
    assert terms["sparsity"].item() == pytest.approx(expected, rel=1e-5)
    off = ComposerM3(build_recipe_model(), **model_settings(sparsity=None, **settings)).eval()
    off_terms = off.loss(off(batch), batch)
    assert off_terms["sparsity"].item() == 0.0
    for key in ("dense", "sparse", "ensemble", "self_distill"):
        assert terms[key].item() == off_terms[key].item(), key
    assert terms["total"].item() == pytest.approx(off_terms["total"].item() + expected, rel=1e-6)
    # the warm-up scales the term (SparsityWarmup sets the attribute each batch)
    model.sparsity_scale = 0.25
    assert model.loss(model(batch), batch)["sparsity"].item() == pytest.approx(0.25 * expected, rel=1e-6)


def test_the_regulariser_needs_the_sparse_head():
    with pytest.raises(ValueError, match="needs the sparse head"):
        ComposerM3(build_recipe_model(), **model_settings(heads=("dense", "colbert"),
                                                          sparsity=SparsityRegularizer("l1", 1.0, 1.0)))
    with pytest.raises(ValueError, match="regularizer must be one of"):
        SparsityRegularizer("none", 1.0, 1.0)


def test_a_few_steps_with_flops_leave_far_fewer_non_zero_terms(tiny_dir, tokenizer):
    """The same 4 steps from the same start, with and without the regulariser: on a held batch the
    passages kept 62 non-zero terms without it and 5 with it (measured); the test asks for less
    than half."""
    batches = [text_batch(tokenizer, 4, 2, offset=0), text_batch(tokenizer, 4, 2, offset=6)]
    held = text_batch(tokenizer, 4, 2, offset=12)

    def non_zero_after_training(sparsity) -> tuple[int, int]:
        torch.manual_seed(0)
        model = ComposerM3(M3Model.from_pretrained(tiny_dir), **model_settings(
            heads=("dense", "sparse"), sparsity=sparsity)).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for step in range(4):
            batch = batches[step % 2]
            model.loss(model(batch), batch)["total"].backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            out = model(held)
        return int((out.queries.sparse > 0).sum()), int((out.passages.sparse > 0).sum())

    plain = non_zero_after_training(None)
    regularised = non_zero_after_training(SparsityRegularizer("flops", 1.0, 1.0))
    print("non-zero (queries, passages): plain", plain, "regularised", regularised)
    assert plain[1] >= 20, plain       # the comparison means something: the plain run keeps many terms
    assert regularised[1] < 0.5 * plain[1], (plain, regularised)
    assert regularised[0] <= plain[0]
