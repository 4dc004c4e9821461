"""m3composer.distributed + cross-rank negatives in ComposerM3, on 2 real gloo processes.

FlagEmbedding's reference check (docs/recipe.md §Reference numbers): rank r holds query r and
passages 2r, 2r+1 of the reference batch.
With cross-rank negatives each rank's dense loss is the one-process loss of the whole batch
(1.060854); after DDP averages gradients, the dense term's gradient is 1/W of the one-process
gradient under the parity convention, and equal to it under `full_batch`.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import signal
from contextlib import contextmanager
import time
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m3composer import distributed
from m3composer.model.composer_model import ComposerM3, SparsityRegularizer
from tests import bounded
from tests.model.conftest import (RECIPE_PASSAGE_IDS, RECIPE_QUERY_IDS, RECIPE_TEACHER, build_recipe_model, model_settings,
                                  recipe_batch)

WORLD = 2
ALL_HEADS = dict(heads=("dense", "sparse", "colbert"), use_self_distill=True, knowledge_distillation=True,
                 negatives_cross_device_heads="all")
# loss.matryoshka: dense cut to 2 of the recipe model's 4 dims (weight 0.5), ColBERT to 3 (weight 2)
MRL = {"dense_dims": [2], "dense_weights": [0.5], "colbert_dims": [3], "colbert_weights": [2.0]}
L1 = SparsityRegularizer("l1", query_weight=0.3, passage_weight=0.2)
SPAWN_TIMEOUT_S = 240
# (name, ComposerM3 kwargs)
MODES = [
    ("dense_parity", dict(heads=("dense",), cross_rank_grad_scale="parity")),
    ("dense_full_batch", dict(heads=("dense",), cross_rank_grad_scale="full_batch")),
    ("unified_self_distill", dict(heads=("dense", "sparse", "colbert"), use_self_distill=True, cross_rank_grad_scale="parity")),
    ("dense_masked", dict(heads=("dense",), cross_rank_grad_scale="parity")),
    # every head gathered (negatives_cross_device_heads="all"), with teacher scores and the
    # self-distillation term; each rank's batch cut to its own longest text (ColBERT padding differs)
    ("all_heads_full_batch", dict(ALL_HEADS, cross_rank_grad_scale="full_batch")),
    ("all_heads_parity", dict(ALL_HEADS, cross_rank_grad_scale="parity")),
    # the same with Matryoshka sizes for dense and ColBERT and the L1 sparsity regulariser (issue 32)
    ("all_heads_mrl_l1_full_batch", dict(ALL_HEADS, matryoshka=MRL, sparsity=L1, cross_rank_grad_scale="full_batch")),
]
# dense_masked: rank 1's negative (global column 3) is rank 0's positive text (docs/recipe.md
# §False-negative masking), by hash label
MASKED_PASSAGE_HASHES, MASKED_POSITIVE_HASHES = [10, 11, 12, 10], [[10], [12]]


def rank_batch(rank: int, masked: bool = False) -> dict:
    batch = recipe_batch(queries=RECIPE_QUERY_IDS[rank:rank + 1], passages=RECIPE_PASSAGE_IDS[2 * rank:2 * rank + 2],
                         teacher=RECIPE_TEACHER[rank:rank + 1])
    if masked:
        batch["passage_hashes"] = torch.tensor(MASKED_PASSAGE_HASHES[2 * rank:2 * rank + 2])
        batch["positive_hashes"] = torch.tensor(MASKED_POSITIVE_HASHES[rank:rank + 1])
    return batch


def cut_to_longest(batch: dict) -> dict:
    """The batch padded to its own longest query and passage (as collate does per rank)."""
    for side in ("query", "passage"):
        length = int(batch[f"{side}_attention_mask"].sum(dim=1).max())
        for key in (f"{side}_input_ids", f"{side}_attention_mask"):
            batch[key] = batch[key][:, :length]
    return batch


def encoder_grads(model: ComposerM3) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.model.encoder.named_parameters() if p.grad is not None}


@contextmanager
def gloo_group(rank: int, port: int):
    """A WORLD-rank gloo process group on 127.0.0.1 for a `spawn_ranks` worker (1 thread each),
    torn down on the way out the library's way (`distributed.shutdown`, docs/recipe.md
    §Process-group teardown). The rank variables are set as a launcher would: Composer's `dist`
    checks them against the group, and the spawning process may hold another test's (RANK=0)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), NODE_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    ok = False
    try:
        yield
        ok = True
    finally:
        distributed.shutdown(ok=ok)


def _worker(rank: int, port: int, out_dir: str) -> None:
    results = {"no_process_group": no_process_group_claims()}
    with gloo_group(rank, port):
        for name, kwargs in MODES:
            model = ComposerM3(build_recipe_model(), **model_settings(negatives_cross_device=True, **kwargs)).train()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            batch = rank_batch(rank, masked=name.endswith("masked"))
            if name.startswith("all_heads"):
                batch = cut_to_longest(batch)
            terms = model.loss(ddp(batch), batch)
            terms["total"].backward()
            results[name] = {"terms": {k: v.detach() for k, v in terms.items()}, "grads": encoder_grads(model)}
        gathered = distributed.gather_no_grad(torch.tensor([float(rank)]))
        results["gathered"] = gathered
        results["sparse_fit"] = fitted_sparse_head()          # each rank encodes half the sample
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def fitted_sparse_head() -> torch.Tensor:
    """The idf fit (model/sparse_fit.py) of the tiny model's fresh sparse head on real text."""
    from m3composer.assets.build import ensure_assets
    from m3composer.model.m3 import M3Model
    from m3composer.model.sparse_fit import fit_sparse_head_to_idf
    from tests.model.test_sparse_fit import TEXTS

    m3 = M3Model.from_pretrained(ensure_assets(log=lambda *a: None)["tiny-xlmr"])
    ids = [torch.tensor(m3.tokenizer(t)["input_ids"]).numpy() for t in TEXTS * 9]   # 72: several batches
    fit_sparse_head_to_idf(m3, ids[:40], ids[40:], temperature=0.02, pad_id=m3.tokenizer.pad_token_id,
                           batch_size=8)
    return torch.cat([m3.sparse_linear.weight.detach().flatten(), m3.sparse_linear.bias.detach()])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traced(rank: int, worker, port: int, out_dir: str) -> None:
    """`worker(rank, port, out_dir)` with its stacks written to `out_dir/rank{r}.stack` on SIGABRT
    (a C++ std::terminate too), a crash, or SIGTERM (how `mp.spawn` stops the other ranks when one
    fails: a rank hung in native code shows where)."""
    with open(os.path.join(out_dir, f"rank{rank}.stack"), "w") as stacks:
        faulthandler.enable(file=stacks, all_threads=True)
        faulthandler.register(signal.SIGTERM, file=stacks, all_threads=True, chain=True)
        worker(rank, port, out_dir)


def _stacks(out_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in sorted(out_dir.glob("rank*.stack")))


def spawn_ranks(worker, out_dir: Path, timeout_s: float = SPAWN_TIMEOUT_S) -> list[dict]:
    """Run `worker(rank, port, out_dir)` on WORLD processes; each writes `out_dir/rank{r}.pt`. A worker
    that fails or exits non-zero fails the test; one still running after `timeout_s` is sent
    SIGABRT, and the failure shows every rank's stacks."""
    bounded.release_finished_datasets()
    context = mp.spawn(_traced, args=(worker, _free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=2):          # raises if a worker failed or exited non-zero
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        os.kill(process.pid, signal.SIGABRT)
                for process in context.processes:
                    process.join(bounded.ABORT_GRACE_S)
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"2-rank workers did not finish within {timeout_s} s; their stacks:\n{_stacks(out_dir)}")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        pytest.fail(f"a rank failed: {err}\n{_stacks(out_dir)}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ranks"))


def one_process(masked: bool = False, **kwargs) -> tuple[dict, dict]:
    model = ComposerM3(build_recipe_model(), **model_settings(**kwargs)).train()
    batch = recipe_batch()
    if masked:
        batch["passage_hashes"] = torch.tensor(MASKED_PASSAGE_HASHES)
        batch["positive_hashes"] = torch.tensor(MASKED_POSITIVE_HASHES)
    terms = model.loss(model(batch), batch)
    terms["total"].backward()
    return terms, encoder_grads(model)


def no_process_group_claims() -> dict:
    """What the helpers and cross-rank negatives do without a process group, measured in a fresh
    interpreter (a `spawn_ranks` worker before it joins the group): earlier tests in the pytest
    process may leave a (world size 1) process group behind (Composer's Trainer opens one)."""
    claims = {"initialized_before": dist.is_initialized()}
    x = torch.randn(3, 2)
    claims["rank_info"] = (distributed.world_size(), distributed.rank(), distributed.is_distributed())
    claims["gathers_return_input"] = [gather(x) is x for gather in (
        distributed.gather_with_grad, distributed.gather_local_grad, distributed.gather_no_grad)]
    try:
        distributed.gather_for_negatives(x, "sum")
        claims["bad_scale_error"] = None
    except ValueError as err:
        claims["bad_scale_error"] = str(err)

    def total(**kwargs):
        model = ComposerM3(build_recipe_model(), **model_settings(heads=("dense",), **kwargs)).train()
        batch = recipe_batch()
        return model.loss(model(batch), batch)

    with_flag, without = total(negatives_cross_device=True), total()
    claims["same_total"] = torch.equal(with_flag["total"], without["total"])
    claims["dense"] = with_flag["dense"].item()
    claims["initialized_after"] = dist.is_initialized()
    return claims


def test_helpers_and_cross_rank_negatives_need_no_process_group(two_rank_results):
    for result in two_rank_results:
        claims = result["no_process_group"]
        assert not claims["initialized_before"] and not claims["initialized_after"]
        assert claims["rank_info"] == (1, 0, False)
        assert claims["gathers_return_input"] == [True] * 3
        assert claims["bad_scale_error"] is not None and "cross_rank_grad_scale" in claims["bad_scale_error"]
        assert claims["same_total"]
        assert abs(claims["dense"] - 1.060854) < 1e-5, claims["dense"]


def test_gather_orders_ranks(two_rank_results):
    for result in two_rank_results:
        assert result["gathered"].tolist() == [0.0, 1.0]


def test_dense_loss_on_each_rank_is_the_full_batch_loss(two_rank_results):
    full, _ = one_process(heads=("dense",))
    for rank, result in enumerate(two_rank_results):
        dense = result["dense_parity"]["terms"]["dense"]
        assert dense.item() == pytest.approx(full["dense"].item(), abs=1e-5)   # summation order differs
        assert dense.item() == pytest.approx(1.060854, abs=1e-5)
        # a local-only loss (this rank's 2 passages) is a different number: the other rank's passages count
        local_model = ComposerM3(build_recipe_model(), **model_settings(heads=("dense",))).train()
        local_batch = rank_batch(rank)
        local = local_model.loss(local_model(local_batch), local_batch)["dense"]
        assert abs(local.item() - dense.item()) > 1e-3


def test_parity_gradient_is_one_over_world_size_of_full_batch(two_rank_results):
    _, full_grads = one_process(heads=("dense",))
    for result in two_rank_results:
        grads = result["dense_parity"]["grads"]
        assert set(grads) == set(full_grads)
        for name, g in grads.items():
            assert torch.allclose(g, full_grads[name] / WORLD, atol=1e-6, rtol=1e-4), name


def test_full_batch_convention_gradient_equals_one_process_gradient(two_rank_results):
    _, full_grads = one_process(heads=("dense",))
    for result in two_rank_results:
        assert result["dense_full_batch"]["terms"]["dense"].item() == pytest.approx(1.060854, abs=1e-5)
        for name, g in result["dense_full_batch"]["grads"].items():
            assert torch.allclose(g, full_grads[name], atol=1e-6, rtol=1e-4), name


def test_unified_self_distill_per_rank_losses_match_flagembeddings_reference(two_rank_results):
    # only the dense term is global, so the ranks' totals differ (FlagEmbedding's numbers,
    # recipe.md §Reference numbers)
    totals = [r["unified_self_distill"]["terms"]["total"].item() for r in two_rank_results]
    assert totals == pytest.approx([0.173227, 0.793068], abs=1e-5)
    for r in two_rank_results:
        assert list(r["unified_self_distill"]["terms"]) == list(r["dense_parity"]["terms"])


def test_false_negatives_are_masked_across_ranks(two_rank_results):
    # each rank's gathered dense loss is the one-process masked loss, and the gradient keeps the 1/W parity
    full, full_grads = one_process(masked=True, heads=("dense",))
    unmasked, _ = one_process(heads=("dense",))
    assert abs(full["dense"].item() - unmasked["dense"].item()) > 1e-3
    for rank, result in enumerate(two_rank_results):
        terms = result["dense_masked"]["terms"]
        assert terms["dense"].item() == pytest.approx(full["dense"].item(), abs=1e-5)
        assert terms["masked_negatives"].item() == [1, 0][rank]      # query 0 (rank 0) loses column 3
        for name, g in result["dense_masked"]["grads"].items():
            assert torch.allclose(g, full_grads[name] / WORLD, atol=1e-6, rtol=1e-4), name


def test_the_idf_fit_of_the_sparse_head_sharded_over_ranks_equals_the_one_process_fit(two_rank_results):
    """Each rank encodes half the sample; the summed normal equations give every rank the fit one
    process computes from the whole sample."""
    alone = fitted_sparse_head()
    for result in two_rank_results:
        torch.testing.assert_close(result["sparse_fit"], alone, rtol=1e-5, atol=1e-7)
    assert torch.equal(two_rank_results[0]["sparse_fit"], two_rank_results[1]["sparse_fit"])


def test_with_every_head_gathered_each_rank_computes_the_one_process_loss_and_gradient(two_rank_results):
    """negatives_cross_device_heads="all": sparse, ColBERT, ensemble, KD and self-distillation on the
    whole global batch, so every term on every rank is the one-process term (rank 1's queries are
    one token shorter than rank 0's: the ColBERT vectors are padded before the gather), and the
    gradient is the one-process gradient (full_batch) or 1/W of it (parity)."""
    full, full_grads = one_process(**ALL_HEADS)
    for rank, result in enumerate(two_rank_results):
        for mode, scale in (("all_heads_full_batch", 1.0), ("all_heads_parity", 1.0 / WORLD)):
            terms = result[mode]["terms"]
            assert list(terms) == list(full)
            for key in ("dense", "sparse", "colbert", "ensemble", "self_distill", "total"):
                assert terms[key].item() == pytest.approx(full[key].item(), rel=1e-5, abs=1e-6), (mode, key)
            assert terms["self_distill"].item() > 0
            grads = result[mode]["grads"]
            assert set(grads) == set(full_grads)
            for name, g in grads.items():
                assert torch.allclose(g, full_grads[name] * scale, atol=1e-6, rtol=1e-4), (mode, name)
        # a rank's own batch alone gives other sparse and ColBERT terms: the other rank's passages count
        model = ComposerM3(build_recipe_model(), **model_settings(**ALL_HEADS)).train()
        batch = cut_to_longest(rank_batch(rank))
        local = model.loss(model(batch), batch)
        for key in ("sparse", "colbert"):
            assert abs(local[key].item() - result["all_heads_parity"]["terms"][key].item()) > 1e-3, key


def test_matryoshka_and_the_l1_regulariser_under_two_ranks_give_the_one_process_loss_and_gradient(two_rank_results):
    """Every head gathered, Matryoshka sizes for dense and ColBERT, and L1 on the lexical vectors: each
    Matryoshka term is a term of the global batch, so every rank has the one-process value. The regulariser
    is of each rank's own texts (docs/recipe.md §Sparsity control); L1 is a mean over texts and the ranks
    hold as many texts each, so the ranks' mean is the one-process term, and after DDP's average the
    gradient is the one-process gradient."""
    mode = "all_heads_mrl_l1_full_batch"
    full, full_grads = one_process(**ALL_HEADS, matryoshka=MRL, sparsity=L1)
    plain, _ = one_process(**ALL_HEADS)
    for key in ("dense", "colbert", "ensemble", "self_distill"):
        assert abs(full[key].item() - plain[key].item()) > 1e-4, key      # the sizes change these terms
    assert full["sparsity"].item() > 0
    for result in two_rank_results:
        terms = result[mode]["terms"]
        assert list(terms) == list(full)
        for key in ("dense", "sparse", "colbert", "ensemble", "self_distill"):
            assert terms[key].item() == pytest.approx(full[key].item(), rel=1e-5, abs=1e-6), key
        for name, g in result[mode]["grads"].items():
            assert torch.allclose(g, full_grads[name], atol=1e-6, rtol=1e-4), name
        assert set(result[mode]["grads"]) == set(full_grads)
    per_rank = [r[mode]["terms"]["sparsity"].item() for r in two_rank_results]
    assert abs(per_rank[0] - per_rank[1]) > 1e-4                        # each rank's own texts
    assert sum(per_rank) / WORLD == pytest.approx(full["sparsity"].item(), rel=1e-5)
