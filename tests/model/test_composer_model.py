"""m3composer.model.composer_model: FlagEmbedding's reference losses end to end, the fixed loss dict,
the gradient-cache seam, gradient checkpointing, metrics, and a short real training run."""
from __future__ import annotations

import pydoc_data.topics
import pytest
import torch

from m3composer import losses
from m3composer.model.composer_model import LOSS_KEYS, ComposerM3, InBatchAccuracy
from m3composer.model.m3 import M3Model
from m3composer.model.scores import M3Reps
from tests.model.conftest import build_recipe_model, model_settings, recipe_batch


def run(model: ComposerM3, batch: dict) -> dict[str, torch.Tensor]:
    return model.loss(model(batch), batch)


@pytest.mark.parametrize("kwargs, has_teacher, expected", [
    (dict(use_self_distill=True), True, 0.849707),                                  # A (teacher ignored)
    (dict(use_self_distill=False), True, 1.104364),                                 # B
    (dict(use_self_distill=True, knowledge_distillation=True), True, 0.922237),     # C: m3_kd_loss
    (dict(use_self_distill=True, knowledge_distillation=True), False, 0.849707),    # no scores in batch -> A
    (dict(heads=("dense",)), True, 1.060854),                               # dense only
])
def test_reference_losses_of_recipe_md_match_flagembedding(kwargs, has_teacher, expected):
    model = ComposerM3(build_recipe_model(), **model_settings(**kwargs)).train()
    terms = run(model, recipe_batch(has_teacher=has_teacher))
    assert terms["total"].item() == pytest.approx(expected, abs=1e-5)


def test_loss_dict_has_the_same_keys_whatever_is_switched_off():
    batch = recipe_batch()
    for kwargs in (dict(), dict(use_self_distill=True), dict(heads=("dense",))):
        model = ComposerM3(build_recipe_model(), **model_settings(**kwargs)).train()
        terms = run(model, batch)
        assert tuple(terms) == LOSS_KEYS and all(v.dim() == 0 for v in terms.values())
    off = ComposerM3(build_recipe_model(), **model_settings(heads=("dense",))).train()
    terms = run(off, batch)
    assert terms["sparse"].item() == terms["colbert"].item() == terms["self_distill"].item() == 0.0
    assert not any(p.requires_grad for p in off.model.sparse_linear.parameters())


def test_self_distill_switch_on_the_model_changes_the_total_only_when_flipped():
    model = ComposerM3(build_recipe_model(), **model_settings(use_self_distill=False)).train()
    batch = recipe_batch()
    off = run(model, batch)
    model.self_distill_on = True
    on = run(model, batch)
    assert off["self_distill"].item() == 0.0 and on["self_distill"].item() > 0
    assert on["total"].item() == pytest.approx(((off["total"] + on["self_distill"]) / 2).item(), abs=1e-6)


def test_parallel_batches_add_the_passage_to_query_direction():
    model = ComposerM3(build_recipe_model(), **model_settings(heads=("dense",))).train()
    plain = run(model, recipe_batch())
    parallel = run(model, recipe_batch(parallel=True))
    out = model(recipe_batch())
    expected_bi = losses.bidirectional_loss(out.scores.dense, 2)
    assert plain["bidirectional"].item() == 0.0
    assert parallel["bidirectional"].item() == pytest.approx(expected_bi.item(), abs=1e-6)
    assert parallel["total"].item() == pytest.approx((plain["dense"] + expected_bi).item() / 2, abs=1e-6)
    switched_off = ComposerM3(build_recipe_model(), **model_settings(heads=("dense",), bidirectional_parallel=False)).train()
    assert run(switched_off, recipe_batch(parallel=True))["total"].item() == pytest.approx(plain["total"].item())


def test_group_size_is_checked():
    model = ComposerM3(build_recipe_model(), **model_settings(train_group_size=4))
    with pytest.raises(ValueError, match="train_group_size=4"):
        model(recipe_batch())


def _param_grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_gradient_cache_seam_gives_the_same_gradients_as_direct_backprop():
    batch = recipe_batch()
    direct = ComposerM3(build_recipe_model(), **model_settings(use_self_distill=True)).train()
    run(direct, batch)["total"].backward()
    expected = _param_grads(direct)

    cached = ComposerM3(build_recipe_model(), **model_settings(use_self_distill=True)).train()
    sides = (("query_input_ids", "query_attention_mask", 1), ("passage_input_ids", "passage_attention_mask", 2))
    with torch.no_grad():   # 1) encode without a graph
        reps = [cached.encode(batch[ids], batch[mask]) for ids, mask, _ in sides]
    leaves = [M3Reps(dense=r.dense.requires_grad_(), sparse=r.sparse.requires_grad_(),
                     colbert=r.colbert.requires_grad_(), colbert_mask=r.colbert_mask) for r in reps]
    cached.loss_from_reps(leaves[0], leaves[1], batch)["total"].backward()   # 2) d loss / d reps
    for (ids, mask, chunk), leaf in zip(sides, leaves):                      # 3) re-encode in chunks
        for start in range(0, batch[ids].shape[0], chunk):
            part = slice(start, start + chunk)
            r = cached.encode(batch[ids][part], batch[mask][part])
            torch.autograd.backward([r.dense, r.sparse, r.colbert],
                                    [leaf.dense.grad[part], leaf.sparse.grad[part], leaf.colbert.grad[part]])
    got = _param_grads(cached)
    assert set(got) == set(expected)
    for name, g in expected.items():
        assert torch.allclose(got[name], g, atol=1e-5, rtol=1e-4), name


def test_gradient_checkpointing_keeps_loss_and_gradients(tiny_dir, tokenizer):
    batch = text_batch(tokenizer, 2, 2)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ComposerM3(M3Model.from_pretrained(tiny_dir), **model_settings(gradient_checkpointing=checkpointing,
                           use_self_distill=True)).train()
        # dropout stays on: checkpointing restores the RNG state, so the recomputed masks are the same
        loss = run(model, batch)["total"]
        loss.backward()
        results.append((loss.item(), _param_grads(model)))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    assert results[1][1].keys() == results[0][1].keys()
    for name, g in results[0][1].items():
        assert torch.allclose(results[1][1][name], g, atol=1e-6, rtol=1e-4), name


def test_in_batch_accuracy_metric():
    metric = InBatchAccuracy("dense")
    metric.update(torch.tensor([[3.0, 1.0, 0.0, 0.0], [5.0, 0.0, 1.0, 0.0]]), torch.tensor([0, 2]))
    assert metric.compute().item() == pytest.approx(0.5)
    model = ComposerM3(build_recipe_model(), **model_settings())
    assert set(model.get_metrics(is_train=True)) == {"dense_accuracy", "sparse_accuracy", "colbert_accuracy",
                                                     "ensemble_accuracy"}


# ---------------------------------------------------------------- a short run on real text
def _topic_texts(n: int) -> list[tuple[str, str]]:
    """(title, body) pairs from the CPython help topics shipped with the standard library."""
    pairs = []
    for title, body in sorted(pydoc_data.topics.topics.items()):
        body = " ".join(body.split())
        if len(body) > 300:
            pairs.append((title.replace("-", " "), body[:400]))
        if len(pairs) == n:
            break
    return pairs


def text_batch(tokenizer, num_queries: int, group_size: int, offset: int = 0) -> dict:
    """A collated batch (docs/architecture.md layout): query = topic title, positive = its body,
    negatives = bodies of the next topics."""
    pairs = _topic_texts(offset + num_queries + group_size)
    queries, passages = [], []
    for b in range(num_queries):
        title, body = pairs[offset + b]
        queries.append(title)
        passages.append(body)
        passages += [pairs[offset + b + k][1] for k in range(1, group_size)]
    q = tokenizer(queries, padding=True, truncation=True, max_length=16, return_tensors="pt")
    p = tokenizer(passages, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
            "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"],
            "teacher_scores": torch.zeros(num_queries, group_size), "has_teacher_scores": torch.tensor(False),
            "is_parallel": torch.tensor(False), "row_ids": torch.arange(num_queries)}


def test_a_few_trainer_steps_on_real_text_lower_the_loss(tiny_dir, tokenizer):
    from composer import Trainer
    from composer.core import DataSpec
    from composer.loggers import InMemoryLogger

    torch.manual_seed(0)
    model = ComposerM3(M3Model.from_pretrained(tiny_dir), **model_settings(train_group_size=2, use_self_distill=True))
    batches = [text_batch(tokenizer, 4, 2, offset=0), text_batch(tokenizer, 4, 2, offset=6)]
    spec = DataSpec(batches, split_batch=lambda batch, size: [batch],
                    get_num_samples_in_batch=lambda batch: batch["query_input_ids"].shape[0])
    logger = InMemoryLogger()

    def loss_without_dropout() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(model.loss(model(batch), batch)["total"].item() for batch in batches) / len(batches)
        model.train()
        return total

    before = loss_without_dropout()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    trainer = Trainer(model=model, train_dataloader=spec, optimizers=optimizer, max_duration="10ba",
                      device_train_microbatch_size=4, loggers=[logger], progress_bar=False, device="cpu",
                      precision="fp32", seed=0)
    trainer.fit()
    totals = [float(v) for _, v in logger.data["loss/train/total"]]
    print("loss/train/total per step:", [round(t, 4) for t in totals])
    assert len(totals) == 10
    # the same two batches, without dropout (the per-step values above jump with the dropout masks)
    after = loss_without_dropout()
    assert after < 0.75 * before, (before, after)
    for key in LOSS_KEYS:
        assert f"loss/train/{key}" in logger.data
    assert "metrics/train/dense_accuracy" in logger.data


def test_bf16_autocast_keeps_scores_and_losses_in_fp32():
    batch = recipe_batch()
    model = ComposerM3(build_recipe_model(), **model_settings(use_self_distill=True)).train()
    reference = run(model, batch)["total"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch)
        terms = model.loss(outputs, batch)
    assert outputs.scores.dense.dtype == outputs.scores.colbert.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in terms.values())
    assert torch.isfinite(terms["total"]) and abs(terms["total"].item() - reference.item()) < 0.2
    terms["total"].backward()


# ---------------------------------------------------------------- loss.heads: a subset of the heads
SUBSETS = [("dense", "sparse"), ("sparse", "colbert"), ("dense", "colbert"), ("sparse",), ("colbert",)]
CE_WEIGHTS = {"dense": 1.0, "sparse": 0.1, "colbert": 1.0, "ensemble": 1.0}     # recipe.md §Unified loss
ENSEMBLE = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}                         # recipe.md §Scores
DISTILL = {"dense": 1.0, "sparse": 0.1, "colbert": 1.0}                          # recipe.md §Self-distillation


# self-distillation needs two heads (one head has no ensemble to distil from; config refuses it)
@pytest.mark.parametrize("heads, self_distill", [(h, False) for h in SUBSETS] + [(h, True) for h in SUBSETS
                                                                                  if len(h) > 1])
def test_the_loss_of_a_subset_is_the_hand_computed_sum_over_the_chosen_heads(heads, self_distill):
    """Per-head InfoNCE from the all-heads score matrices, the ensemble re-summed over the chosen
    heads only, each sum divided by its number of terms, by hand (torch's cross entropy)."""
    batch = recipe_batch()
    every = ComposerM3(build_recipe_model(), **model_settings()).train()
    with torch.no_grad():
        scores = every(batch).scores        # the same weights (seed 0): every head's (2, 4) matrix
    targets = torch.tensor([0, 2])
    matrices = {h: getattr(scores, h) for h in heads}
    if len(heads) > 1:
        matrices["ensemble"] = sum(ENSEMBLE[h] * matrices[h] for h in heads)
    ce = {name: torch.nn.functional.cross_entropy(m, targets) for name, m in matrices.items()}
    expected = sum(CE_WEIGHTS[name] * value for name, value in ce.items()) / len(ce)
    if self_distill:
        teacher = torch.softmax(matrices["ensemble"], dim=-1)
        distill = sum(DISTILL[h] * -(teacher * torch.log_softmax(matrices[h], dim=-1)).sum(-1).mean()
                      for h in heads) / len(heads)
        expected = (expected + distill) / 2

    model = ComposerM3(build_recipe_model(), **model_settings(heads=heads, use_self_distill=self_distill)).train()
    terms = run(model, batch)
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    for name in ("dense", "sparse", "colbert", "ensemble"):
        assert (terms[name].item() == 0.0) == (name not in ce), name
        if name in ce:
            assert terms[name].item() == pytest.approx(ce[name].item(), rel=1e-5), name
    assert set(model.get_metrics(is_train=True)) == {f"{name}_accuracy" for name in ce}


@pytest.mark.parametrize("heads", SUBSETS)
def test_heads_not_chosen_get_no_gradient_no_optimizer_state_and_keep_their_weights(heads):
    from m3composer import optim

    model = ComposerM3(build_recipe_model(), **model_settings(heads=heads, use_self_distill=len(heads) > 1)).train()
    linears = {"sparse": model.model.sparse_linear, "colbert": model.model.colbert_linear}
    before = {h: [p.detach().clone() for p in linear.parameters()] for h, linear in linears.items()}
    optimizer = optim.adamw(model, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                            new_head_lr_multiplier=10.0)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        run(model, recipe_batch())["total"].backward()
        for head, linear in linears.items():
            assert all((p.grad is not None) == (head in heads) for p in linear.parameters()), head
        optimizer.step()
    state = {id(p) for p in optimizer.state}
    for head, linear in linears.items():
        params = list(linear.parameters())
        changed = [not torch.equal(p, b) for p, b in zip(params, before[head])]
        if head in heads:
            assert any(changed) and all(id(p) in in_optimizer and id(p) in state for p in params), head
        else:
            assert not any(changed) and not any(p.requires_grad for p in params), head
            assert not any(id(p) in in_optimizer or id(p) in state for p in params), head
    assert model.model.trained_heads == tuple(h for h in ("dense", "sparse", "colbert") if h in heads)


def test_heads_must_be_a_non_empty_subset_without_repeats():
    for heads in ((), ("dense", "dense"), ("lexical",)):
        with pytest.raises(ValueError, match="heads must be a non-empty subset"):
            ComposerM3(build_recipe_model(), **model_settings(heads=heads))


# ------------------------------------------------------------------------------------ Matryoshka
def mrl(dense_dims=(), colbert_dims=(), dense_weights=(), colbert_weights=()) -> dict:
    """`loss.matryoshka` as ComposerM3 takes it."""
    return {"dense_dims": list(dense_dims), "dense_weights": list(dense_weights),
            "colbert_dims": list(colbert_dims), "colbert_weights": list(colbert_weights)}


def _cut(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.nn.functional.normalize(x[..., :dim], dim=-1)


def test_matryoshka_loss_and_gradient_equal_the_hand_computed_sum():
    """Recipe model (hidden 4, ColBERT 4), dense at 2 (weight 0.5) and ColBERT at 3 (weight 2), paired in
    one level whose ensemble weighs (0.5 + 2) / 2; self-distillation from the full-size ensemble."""
    batch = recipe_batch()
    settings = model_settings(use_self_distill=True, matryoshka=mrl([2], [3], [0.5], [2.0]))
    model = ComposerM3(build_recipe_model(), **settings).train()
    terms = run(model, batch)
    terms["total"].backward()
    got = _param_grads(model)

    by_hand = ComposerM3(build_recipe_model(), **model_settings(use_self_distill=True)).train()
    tau = by_hand.temperature
    q = by_hand.encode(batch["query_input_ids"], batch["query_attention_mask"])
    p = by_hand.encode(batch["passage_input_ids"], batch["passage_attention_mask"])
    s_dense, s_lex = q.dense @ p.dense.T / tau, q.sparse @ p.sparse.T / tau

    def maxsim(qc, pc):   # padding kept, summed over the query's tokens, / their number
        best = torch.einsum("qin,pjn->qipj", qc, pc).max(dim=-1).values.sum(dim=1)
        return best / q.colbert_mask.sum(dim=-1, keepdim=True) / tau

    s_mul = maxsim(q.colbert, p.colbert)
    s_dense2 = _cut(q.dense, 2) @ _cut(p.dense, 2).T / tau
    s_mul3 = maxsim(_cut(q.colbert, 3), _cut(p.colbert, 3))
    s_ens, s_ens_level = s_dense + 0.3 * s_lex + s_mul, s_dense2 + 0.3 * s_lex + s_mul3
    y = torch.tensor([0, 2])

    def ce(s):
        return torch.nn.functional.cross_entropy(s, y)

    teacher = torch.softmax(s_ens.detach(), dim=-1)

    def sce(s):
        return -(teacher * torch.log_softmax(s, dim=-1)).sum(dim=-1).mean()

    dense, colbert = ce(s_dense) + 0.5 * ce(s_dense2), ce(s_mul) + 2.0 * ce(s_mul3)
    ensemble = ce(s_ens) + 1.25 * ce(s_ens_level)
    unified = (dense + ensemble + 0.1 * ce(s_lex) + colbert) / 4
    distill = (sce(s_dense) + 0.5 * sce(s_dense2) + 0.1 * sce(s_lex) + sce(s_mul) + 2.0 * sce(s_mul3)) / 3
    total = (unified + distill) / 2
    for key, want in (("dense", dense), ("colbert", colbert), ("ensemble", ensemble),
                      ("self_distill", distill), ("total", total)):
        assert terms[key].item() == pytest.approx(want.item(), rel=1e-5), key
    assert terms["dense"].item() > run(by_hand, batch)["dense"].item()   # the prefixes add to the term
    total.backward()
    want = _param_grads(by_hand)
    assert set(got) == set(want)
    for name, g in want.items():
        assert torch.allclose(got[name], g, atol=1e-6, rtol=1e-4), name


def test_matryoshka_sizes_apply_to_the_dense_term_of_parallel_batches_and_dense_only_runs():
    """Dense only, dense at 3 and 2 (weights 1): the dense and passage→query terms each become the
    sum over the full size and the prefixes."""
    batch = recipe_batch(parallel=True)
    model = ComposerM3(build_recipe_model(), **model_settings(heads=("dense",), matryoshka=mrl([3, 2]))).train()
    terms = run(model, batch)
    reference = ComposerM3(build_recipe_model(), **model_settings(heads=("dense",))).train()
    q = reference.encode(batch["query_input_ids"], batch["query_attention_mask"])
    p = reference.encode(batch["passage_input_ids"], batch["passage_attention_mask"])
    at = [q.dense @ p.dense.T / reference.temperature] + \
         [_cut(q.dense, d) @ _cut(p.dense, d).T / reference.temperature for d in (3, 2)]
    y = torch.tensor([0, 2])
    dense = sum(torch.nn.functional.cross_entropy(s, y) for s in at)
    bidirectional = sum(losses.bidirectional_loss(s, 2) for s in at)
    assert terms["dense"].item() == pytest.approx(dense.item(), rel=1e-5)
    assert terms["bidirectional"].item() == pytest.approx(bidirectional.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx((dense + bidirectional).item() / 2, rel=1e-5)
    assert model.model.matryoshka == {"dense_dims": [3, 2], "colbert_dims": []}


@pytest.mark.parametrize("matryoshka, heads, message", [
    (mrl([4]), ("dense",), r"loss\.matryoshka\.dense_dims: .*below the dense vectors' size 4, got \[4\]"),
    (mrl(colbert_dims=[2, 5]), ("colbert",), r"loss\.matryoshka\.colbert_dims: .*size 4, got \[5\]"),
    (mrl(colbert_dims=[2]), ("dense", "sparse"), r"loss\.matryoshka\.colbert_dims: colbert is not in loss\.heads"),
])
def test_matryoshka_sizes_are_checked_against_the_model(matryoshka, heads, message):
    with pytest.raises(ValueError, match=message):
        ComposerM3(build_recipe_model(), **model_settings(heads=heads, matryoshka=matryoshka))


@pytest.mark.parametrize("cross_device_heads", ["dense", "all"])
def test_matryoshka_terms_of_the_gathered_paths_equal_the_local_ones_on_one_rank(monkeypatch, cross_device_heads):
    """The cross-rank branches (dense gathered alone, or every head) cut the gathered vectors; with one
    rank whose gathers return their input they must give the local terms exactly."""
    from m3composer import distributed
    settings = dict(use_self_distill=True, matryoshka=mrl([3, 2], [2, 3], [0.5, 2.0], [1.0, 0.25]))
    batch = recipe_batch(parallel=True)
    local = run(ComposerM3(build_recipe_model(), **model_settings(**settings)).train(), batch)
    for name, fake in (("is_distributed", lambda: True), ("rank", lambda: 0), ("gather_no_grad", lambda x: x),
                       ("gather_for_negatives", lambda x, scale: x), ("pad_to_longest_across_ranks", lambda xs, dim=1: xs)):
        monkeypatch.setattr(distributed, name, fake)
    gathered = run(ComposerM3(build_recipe_model(), **model_settings(
        negatives_cross_device=True, negatives_cross_device_heads=cross_device_heads, **settings)).train(), batch)
    for key in LOSS_KEYS:
        assert gathered[key].item() == pytest.approx(local[key].item(), rel=1e-6), key
    assert local["dense"].item() > 0 and local["colbert"].item() > 0 and local["self_distill"].item() > 0
