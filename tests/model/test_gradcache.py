"""m3composer.model.gradcache: the chunk plan, and loss + every parameter gradient through the cache
equal to one big forward (to 1e-5 relative), over every loss term, with dropout, checkpointing, bf16
autocast and Composer's training loop."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from m3composer.model import gradcache
from m3composer.model.composer_model import LOSS_KEYS, ComposerM3, SparsityRegularizer
from m3composer.model.gradcache import GradientCacheBudget, plan_chunks
from m3composer.model.m3 import M3Model
from m3composer.model.scores import HEADS
from tests.model.conftest import build_recipe_model, model_settings, recipe_batch
from tests.model.test_composer_model import text_batch

REL = 1e-5
# dense at 3 and 2, ColBERT at 2 and 3 (the recipe model's vectors have 4 dims), unequal weights
MATRYOSHKA = {"dense_dims": [3, 2], "dense_weights": [0.5, 2.0], "colbert_dims": [2, 3], "colbert_weights": [1.0, 0.25]}


def param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def worst_relative_difference(got: dict, want: dict) -> float:
    """max over parameters of max|got - want| / max|want|. Attention key biases are compared against the
    largest gradient entry of the model instead: their exact gradient is 0 (softmax ignores a shift
    shared by all keys), so what they hold is rounding noise."""
    assert set(got) == set(want)
    scale = max(float(g.abs().max()) for g in want.values())
    worst = 0.0
    for name, g in want.items():
        ref = scale if name.endswith("key.bias") else float(g.abs().max())
        worst = max(worst, float((got[name] - g).abs().max()) / max(ref, 1e-30))
    return worst


def assert_same_step(cached: tuple[dict, dict], reference: tuple[dict, dict]) -> float:
    (terms, grads), (ref_terms, ref_grads) = cached, reference
    assert list(terms) == list(LOSS_KEYS)
    for key in LOSS_KEYS:
        assert terms[key].item() == pytest.approx(ref_terms[key].item(), rel=REL, abs=1e-7), key
    worst = worst_relative_difference(grads, ref_grads)
    assert worst < REL, worst
    return worst


def step(model: ComposerM3, batch: dict, seed: int = 0) -> tuple[dict, dict]:
    """forward + loss + backward as Composer runs them; the terms and every parameter gradient."""
    torch.manual_seed(seed)
    terms = model.loss(model(batch), batch)
    terms["total"].backward()
    return {k: v.detach() for k, v in terms.items()}, param_grads(model)


# ------------------------------------------------------------------------------ the chunk plan
def test_plan_cuts_length_sorted_rows_under_both_limits():
    lengths = [5, 40, 7, 40, 12, 3, 30]
    chunks = plan_chunks(lengths, GradientCacheBudget(max_sequences=3, max_tokens=90))
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(lengths)))
    for rows in chunks:
        assert list(rows) == sorted(rows)                        # input order inside a chunk
        assert len(rows) <= 3 and len(rows) * max(lengths[r] for r in rows) <= 90
    assert [sorted(lengths[r] for r in rows) for rows in chunks] == [[40, 40], [7, 12, 30], [3, 5]]
    assert [len(c) for c in plan_chunks(lengths, GradientCacheBudget(max_sequences=1))] == [1] * 7


def test_a_sequence_longer_than_the_token_budget_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.gradient_cache\.max_tokens=20 .*one sequence of 40 tokens"):
        plan_chunks([5, 40], GradientCacheBudget(max_sequences=4, max_tokens=20))
    with pytest.raises(ValueError, match=r"model\.gradient_cache\.max_sequences"):
        GradientCacheBudget(max_sequences=0)


# --------------------------------------------- against the plain uncached forward (no dropout)
@pytest.mark.parametrize("kwargs, batch_kwargs", [
    (dict(use_self_distill=True), {}),                                               # unified + self-distill
    (dict(use_self_distill=True, knowledge_distillation=True), {}),                  # m3_kd_loss, teacher scores
    (dict(use_self_distill=True), dict(parallel=True)),                              # bidirectional term
    (dict(heads=("dense",)), dict(parallel=True)),                           # dense only
    (dict(heads=("dense", "sparse"), use_self_distill=True), dict(parallel=True)),  # a subset: ColBERT frozen
    (dict(heads=("sparse",), knowledge_distillation=True), {}),                     # sparse only, teacher scores
    (dict(use_self_distill=True, sparsity=SparsityRegularizer("flops", 0.3, 0.1)), {}),  # + FLOPS regulariser
    (dict(heads=("dense", "sparse"), sparsity=SparsityRegularizer("l1", 0.2, 0.05)), {}),  # + L1 regulariser
    (dict(use_self_distill=True, matryoshka=MATRYOSHKA), dict(parallel=True)),       # Matryoshka sizes
    (dict(use_self_distill=True, knowledge_distillation=True, matryoshka=MATRYOSHKA), {}),   # ... and KD
    (dict(use_self_distill=True, matryoshka=MATRYOSHKA, sparsity=SparsityRegularizer("flops", 0.3, 0.1)), {}),  # both
])
@pytest.mark.parametrize("budget", [GradientCacheBudget(1), GradientCacheBudget(4),   # 4 does not divide 6 rows
                                    GradientCacheBudget(16, max_tokens=12)])          # tokens: 2 rows of 6
def test_cached_loss_and_gradients_equal_the_uncached_ones(kwargs, batch_kwargs, budget):
    """In float64: the cache calls the encoder on other shapes (one row at a time, say), and in float32
    the kernels a CPU picks for those shapes round differently (on one Xeon a LayerNorm weight's
    gradient differed by 1.35e-5 of its largest entry with chunks of 1 row, against under 1e-5 on an
    EPYC). In float64 that rounding is ~1e-15, so what is compared is the cache's arithmetic. The
    scores and losses are still computed in float32 (`.float()`), as in training."""
    batch = recipe_batch(**batch_kwargs)
    reference = step(ComposerM3(build_recipe_model().double(), **model_settings(**kwargs)).train(), batch)
    cached = step(ComposerM3(build_recipe_model().double(), **model_settings(gradient_cache=budget, **kwargs)).train(), batch)
    assert_same_step(cached, reference)


# -------------------------------------------------- dropout on: the replay draws the same masks
_LOADED: dict = {}


def tiny_model(tiny_dir, **kwargs) -> ComposerM3:
    """The tiny model as loaded after `torch.manual_seed(0)` (its fresh heads drawn from that seed), and
    the random state it leaves: loaded once, then copied (the tokenizer shared, not copied)."""
    if tiny_dir not in _LOADED:
        torch.manual_seed(0)
        m3 = M3Model.from_pretrained(tiny_dir)
        _LOADED[tiny_dir] = (m3, torch.get_rng_state())
    m3, rng = _LOADED[tiny_dir]
    torch.set_rng_state(rng)
    m3 = copy.deepcopy(m3, memo={id(m3.tokenizer): m3.tokenizer})
    return ComposerM3(m3, **model_settings(use_self_distill=True, **kwargs)).train()


def chunked_reference(model: ComposerM3, batch: dict, chunks, seed: int = 0, autocast=None) -> tuple[dict, dict]:
    """Ordinary autograd over the same encoder calls as the cache (so the same dropout draws); the
    forward under `autocast` when given, the backward outside it (as Composer runs them)."""
    torch.manual_seed(seed)
    parts = [(batch["query_input_ids"], batch["query_attention_mask"]),
             (batch["passage_input_ids"], batch["passage_attention_mask"])]
    with autocast if autocast is not None else contextlib.nullcontext():
        q, p = gradcache.encode_chunks(model.model, parts, chunks, with_sparse=True, with_colbert=True, cached=False)
        terms = model.loss_from_reps(q, p, batch)
    terms["total"].backward()
    return {k: v.detach() for k, v in terms.items()}, param_grads(model)


# 3 queries + 6 passages = 9 rows: chunks of 1, and chunks of 4 (4 does not divide 9) with gradient
# checkpointing, whose recomputation inside the replay must draw the same masks once more
# (and a subset of the heads: the frozen ColBERT head's vectors are not even built by the cache)
# (and Matryoshka sizes of the tiny model's 32-dim vectors)
TINY_MATRYOSHKA = {"dense_dims": [16, 8], "dense_weights": [], "colbert_dims": [8, 16], "colbert_weights": [0.5, 1.0]}


@pytest.mark.parametrize("max_sequences, checkpointing, heads, matryoshka", [
    (1, False, HEADS, None), (4, True, HEADS, None), (4, False, ("dense", "sparse"), None),
    (4, False, HEADS, TINY_MATRYOSHKA)])
def test_with_dropout_the_replay_reproduces_the_masks(tiny_dir, tokenizer, checkpointing, max_sequences, heads,
                                                      matryoshka):
    batch = text_batch(tokenizer, 3, 2)
    budget = GradientCacheBudget(max_sequences)
    lengths = torch.cat([batch["query_attention_mask"].sum(1), batch["passage_attention_mask"].sum(1)]).tolist()
    sizes = {} if matryoshka is None else {"matryoshka": matryoshka}
    reference_model = tiny_model(tiny_dir, gradient_checkpointing=checkpointing, heads=heads, **sizes)
    reference = chunked_reference(reference_model, batch, plan_chunks(lengths, budget))
    cached = step(tiny_model(tiny_dir, gradient_cache=budget, gradient_checkpointing=checkpointing, heads=heads,
                             **sizes), batch)
    print("max relative gradient difference:", assert_same_step(cached, reference))
    # the masks matter: another seed gives another loss
    other = tiny_model(tiny_dir, gradient_cache=budget)
    assert abs(step(other, batch, seed=1)[0]["total"].item() - cached[0]["total"].item()) > 1e-4


def test_under_bf16_autocast_the_replay_equals_the_chunked_reference_and_keeps_dtypes(tiny_dir, tokenizer):
    batch = text_batch(tokenizer, 2, 2)
    budget = GradientCacheBudget(3)
    lengths = torch.cat([batch["query_attention_mask"].sum(1), batch["passage_attention_mask"].sum(1)]).tolist()

    # Autocast's weight-cast cache would make the reference sum all chunks' weight gradients in bf16
    # (one cast node per weight) where the replay sums them in fp32 (one cast per chunk): a bf16-level
    # difference (measured 0.3-2 %). Without the cache both sum in fp32.
    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)

    reference = chunked_reference(tiny_model(tiny_dir), batch, plan_chunks(lengths, budget), autocast=bf16())
    model = tiny_model(tiny_dir, gradient_cache=budget)
    torch.manual_seed(0)
    with bf16():
        outputs = model(batch)
        terms = model.loss(outputs, batch)
        with torch.no_grad():
            uncached = model.model.encode(batch["passage_input_ids"], batch["passage_attention_mask"])
    # the cached outputs keep the dtype the uncached encode gives the loss under autocast
    for field in ("dense", "sparse", "colbert"):
        assert getattr(outputs.passages, field).dtype == getattr(uncached, field).dtype, field
    assert terms["total"].dtype == torch.float32
    terms["total"].backward()                                   # outside autocast, as Composer does
    # the replay re-enters the forward's autocast, so it rounds to bf16 where the reference does
    assert terms["total"].item() == pytest.approx(reference[0]["total"].item(), rel=REL)
    assert worst_relative_difference(param_grads(model), reference[1]) < REL


# ------------------------------------------------------------------- Composer's training loop
def test_a_short_trainer_run_with_the_cache_logs_the_same_losses(tiny_dir, tokenizer):
    """Composer's loop (in-place loss scaling, one backward, GradientClipping, an optimizer) over 6
    steps: the same per-step loss terms with and without the cache (dropout off: the masks would
    differ). AdamW with eps 1e-6 and a small lr: with eps 1e-8 Adam turns the ~1e-9 rounding noise of
    gradients that are 0 in theory (attention key biases) into full-size steps, and the tiny model's
    peaked attention amplifies weight differences, so two runs drift apart by ~1e-4 within a few large
    steps whatever computes the gradients (rounding differences of ~1e-6, as measured above). The model
    is float64 (scores and losses stay float32): in float32 the rounding of the kernels one CPU picks
    for the cache's smaller encoder calls reached 1.2e-5 of a loss term by step 6 with one thread
    on a Xeon."""
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.core import DataSpec
    from composer.loggers import InMemoryLogger

    batches = [text_batch(tokenizer, 4, 2, offset=0), text_batch(tokenizer, 4, 2, offset=6)]
    spec = DataSpec(batches, split_batch=lambda batch, size: [batch],
                    get_num_samples_in_batch=lambda batch: batch["query_input_ids"].shape[0])
    logged = []
    for budget in (None, GradientCacheBudget(5, max_tokens=128)):
        torch.manual_seed(0)
        m3 = M3Model.from_pretrained(tiny_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).double()
        model = ComposerM3(m3, **model_settings(train_group_size=2, use_self_distill=True, gradient_cache=budget))
        logger = InMemoryLogger()
        trainer = Trainer(model=model, train_dataloader=spec, optimizers=torch.optim.AdamW(model.parameters(), lr=2e-4, eps=1e-6),
                          max_duration="6ba", device_train_microbatch_size=4, loggers=[logger], progress_bar=False,
                          device="cpu", precision="fp32", seed=0,
                          algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=0.5)])
        trainer.fit()
        trainer.close()
        logged.append({k: [float(v) for _, v in logger.data[f"loss/train/{k}"]] for k in LOSS_KEYS})
    uncached, cached = logged
    assert len(cached["total"]) == 6 and min(cached["total"][2::2]) < cached["total"][0]   # it trains
    for key in LOSS_KEYS:
        assert cached[key] == pytest.approx(uncached[key], rel=REL, abs=1e-7), key
