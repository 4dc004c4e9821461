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
