"""The gradient cache under DDP on 2 real gloo processes, with cross-rank dense negatives under both
gradient conventions (and with every head gathered, and with `loss.heads` leaving ColBERT out): after DDP's all-reduce every parameter gradient
equals the uncached DDP run's (to 1e-5 relative), over two steps (a reducer that saw a parameter twice, or not at all, fails the
second step: "Expected to have finished reduction in the prior iteration")."""
from __future__ import annotations

import os

import pytest
import torch

from m3composer.model.composer_model import ComposerM3
from m3composer.model.gradcache import GradientCacheBudget
from tests.model.conftest import build_recipe_model, model_settings
from tests.model.test_gradcache import REL, param_grads, worst_relative_difference
from tests.test_distributed import gloo_group, rank_batch, spawn_ranks

MODES = {
    "unified_parity": dict(use_self_distill=True, cross_rank_grad_scale="parity"),
    "unified_full_batch": dict(use_self_distill=True, cross_rank_grad_scale="full_batch"),
    "dense_full_batch_kd": dict(heads=("dense",), knowledge_distillation=True,
                                cross_rank_grad_scale="full_batch"),
    # every head's representations gathered (the cached outputs are the gather's inputs)
    "all_heads_parity": dict(use_self_distill=True, negatives_cross_device_heads="all",
                             cross_rank_grad_scale="parity"),
    # loss.heads=[dense, sparse]: ColBERT frozen, so plain DDP (no find_unused_parameters) finishes
    # both steps' reductions; the chosen heads' representations gathered, self-distilled
    "dense_sparse_all_heads": dict(heads=("dense", "sparse"), use_self_distill=True,
                                   negatives_cross_device_heads="all", cross_rank_grad_scale="full_batch"),
}
# Run in float64 (as tests/model/test_gradcache.py explains): without the ColBERT terms the sparse
# head's gradient is small (~3e-3) and float32 rounding of the chunked sums is 4e-5 of it (1e-16 in float64)
FLOAT64_MODES = {"dense_sparse_all_heads"}
BUDGET = GradientCacheBudget(max_sequences=2)       # 3 rows per rank: chunks of 2 and 1


def _two_steps(kwargs: dict, budget, rank: int, float64: bool = False) -> list[dict]:
    m3 = build_recipe_model().double() if float64 else build_recipe_model()
    model = ComposerM3(m3, **model_settings(negatives_cross_device=True, gradient_cache=budget, **kwargs)).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = rank_batch(rank)
    results = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        terms = model.loss(ddp(batch), batch)
        terms["total"].backward()
        results.append({"total": terms["total"].detach(), "grads": param_grads(model)})
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port):
        results = {name: {run: _two_steps(kwargs, budget, rank, float64=name in FLOAT64_MODES)
                          for run, budget in (("plain", None), ("cached", BUDGET))}
                   for name, kwargs in MODES.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("gradcache_ranks"))


@pytest.mark.parametrize("mode", list(MODES))
def test_cached_ddp_gradients_equal_the_uncached_ones_on_every_rank(two_rank_results, mode):
    for result in two_rank_results:
        for plain, cached in zip(result[mode]["plain"], result[mode]["cached"], strict=True):
            assert cached["total"].item() == pytest.approx(plain["total"].item(), rel=REL)
            worst = worst_relative_difference(cached["grads"], plain["grads"])
            print(mode, "max relative gradient difference:", worst)
            assert worst < REL, worst
    # DDP all-reduced: both ranks hold the same gradient (each rank's local loss differs)
    first, second = (r[mode]["cached"][0]["grads"] for r in two_rank_results)
    assert all(torch.allclose(first[n], second[n], rtol=1e-6, atol=1e-9) for n in first)


def test_under_ddp_a_head_left_out_of_loss_heads_has_no_gradient_on_any_rank(two_rank_results):
    for result in two_rank_results:
        for run in ("plain", "cached"):
            for one_step in result["dense_sparse_all_heads"][run]:
                assert not any(name.startswith("model.colbert_linear") for name in one_step["grads"])
                assert any(name.startswith("model.sparse_linear") for name in one_step["grads"])
