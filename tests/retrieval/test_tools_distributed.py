"""`m3c eval`, `m3c mine` and `m3c score-teacher` on 2 gloo ranks give one process's results
(docs/operations.md §Evaluate, mine and score on N ranks): the same rows in the same order, scores
within float tolerance, the same documents wherever no two scores are closer than rounding.

Two kinds of 2-rank runs, each compared with one process in the same test:
* the commands under the real launcher (`composer -n 2 -m m3composer.cli …`): rank 0 alone writes
  the output, which equals the one-process command's;
* one spawned pair of workers calling the library with `across_ranks=True`: search with every head
  (exact, re-rank, Matryoshka sizes, the lexical cost), the corpus store shared among the ranks
  (stopped after one shard per rank, resumed, then reused), and dense mining.

The tiny model with random heads (every head ranks differently) on real text: the pydoc topics of
the sample data.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m3composer.cli import main
from m3composer.model.inference import load_model_for_inference
from m3composer.model.scores import LexicalCost
from m3composer.retrieval.corpus_store import CorpusCache, StoreInterrupted
from m3composer.retrieval.mine import mine
from m3composer.retrieval.search import search_top_k
from m3composer.sample_data.sources import pydoc_sections
from tests import bounded
from tests.test_distributed import gloo_group, spawn_ranks

LAUNCHER = Path(sys.executable).parent / "composer"
LAUNCH_TIMEOUT_S = 240
SEARCH = dict(batch_size=8, query_max_len=32, passage_max_len=64, progress=False, query_instruction="",
              passage_instruction="")
# what the worker searches with across_ranks=True, and the test with one process
SEARCHES = {"exact": dict(top_k=10, dims=(8,)), "rerank": dict(top_k=10, dims=(8,), first_stage_k=6)}
SHARD_DOCS = 24             # the store of 79 documents: 4 shards, the last one short
NEAR_TIE = 1e-5             # scores closer than this may swap (float rounding is ~1e-6 here)
ATOL = 1e-5
MINE = dict(rank_range=(2, 12), negatives=3, with_scores=True, batch_size=8, query_max_len=32, passage_max_len=64,
            progress=False)


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model with random heads, saved: what both the launcher's ranks and the test load."""
    from m3composer.model.m3 import M3Model

    torch.manual_seed(0)
    model = M3Model.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.5)            # queries and passages share weighted tokens
    folder = tmp_path_factory.mktemp("model") / "m3"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model_for_inference(model_dir)


@pytest.fixture(scope="module")
def texts() -> dict:
    """79 documents (an odd corpus: the second rank's share is short) and 15 queries."""
    items = pydoc_sections()[:79]
    rows = [{"query": items[i].query, "pos": [items[i].passage],
             "neg": [items[(i + j) % 40].passage for j in (1, 2, 3)], "id": i} for i in range(15)]
    return {"docs": [i.passage for i in items], "queries": [i.query for i in items[:15]],
            "doc_ids": [i.item_id for i in items], "query_ids": [i.item_id for i in items[:15]], "rows": rows}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def clear_of_ties(scores: np.ndarray, depth: int) -> np.ndarray:
    """Rows whose best `depth + 1` sorted scores (one process's) differ pairwise by more than NEAR_TIE."""
    top = np.sort(scores, axis=1)[:, ::-1][:, :depth + 1]
    return np.all(top[:, :-1] - top[:, 1:] > NEAR_TIE, axis=1)


def assert_same_top(got, want, full_scores: dict[int, dict[int, float]] | None = None) -> None:
    """`(scores, indices)` of N ranks and of one process: scores within ATOL; the same documents,
    except swaps among scores closer than NEAR_TIE (checked against one process's scores)."""
    got_v, got_i = (torch.as_tensor(x) for x in got)
    want_v, want_i = (torch.as_tensor(x) for x in want)
    assert got_v.shape == want_v.shape
    finite = torch.isfinite(want_v)
    assert torch.equal(finite, torch.isfinite(got_v))
    assert torch.allclose(got_v[finite], want_v[finite], atol=ATOL)
    for row in range(len(want_i)):
        values = want_v[row][finite[row]]
        for col in torch.nonzero(got_i[row] != want_i[row]).flatten().tolist():
            near = (values - want_v[row, col]).abs() < NEAR_TIE
            assert near.sum() > 1, f"row {row}, rank {col}: {got_i[row].tolist()} != {want_i[row].tolist()}"


def launch(args: list[str], logs: Path) -> str:
    """`composer -n 2 -m m3composer.cli ARGS` (gloo on the CPU); fails the test with every rank's
    output on error, and with their stacks when it runs past LAUNCH_TIMEOUT_S."""
    bounded.release_finished_datasets()
    logs.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(name, None)
    done = bounded.run([str(LAUNCHER), "-n", "2", "--stdout", str(logs / "r{rank}.out"),
                        "--stderr", str(logs / "r{rank}.err"), "-m", "m3composer.cli", *args, "--device", "cpu"],
                       timeout=LAUNCH_TIMEOUT_S, env=env)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*")))
    assert done.returncode == 0 and "terminate called" not in done.stderr + tails, \
        f"composer -n 2 exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}\n{tails}"
    return done.stdout             # rank 0's


# ---- the commands under the launcher ------------------------------------------------------------------
def test_eval_on_two_ranks_writes_the_one_process_metrics_from_rank_0(model, model_dir, texts, tmp_path):
    from tests.retrieval.test_rerank import write_real_set
    from m3composer.retrieval.beir import EvalSet

    data = tmp_path / "beir"
    write_real_set(data, EvalSet(query_ids=texts["query_ids"], queries=texts["queries"], doc_ids=texts["doc_ids"],
                                 docs=texts["docs"], qrels={q: {q: 1.0} for q in texts["query_ids"]}))
    common = [str(data), "--no-instructions", "--batch-size", "8", "--query-max-len", "32", "--passage-max-len", "64",
              "--dims", "8", "--per-query", "--no-progress"]
    assert main(["eval", str(model_dir), *common, "--output", str(tmp_path / "one.json")]) == 0
    (tmp_path / "out").mkdir()
    printed = launch(["eval", str(model_dir), *common, "--output", str(tmp_path / "out" / "two.json")],
                     tmp_path / "logs")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["two.json"]     # no temporary left, one writer
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "out/two.json"))
    assert "ensemble" in printed and "[eval]" not in (tmp_path / "logs" / "r1.out").read_text()  # rank 0's table only
    assert (one["num_queries"], one["num_docs"]) == (two["num_queries"], two["num_docs"]) == (15, 79)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    exact = search_top_k(model, texts["queries"], texts["docs"], top_k=len(texts["docs"]), dims=(8,), **SEARCH)
    compared = 0
    for head, per_query in one["per_query"].items():
        clear = clear_of_ties(exact[head][0].numpy(), 10)
        assert list(two["per_query"][head]) == list(per_query)                      # the same rows, in order
        for row, (query, metrics) in enumerate(per_query.items()):
            if clear[row]:
                assert two["per_query"][head][query] == pytest.approx(metrics, abs=1e-9), (head, query)
                compared += 1
    assert compared >= 0.5 * 15 * len(one["per_query"])                          # most rows are compared
    assert two["sparse_cost"] == pytest.approx(one["sparse_cost"], rel=1e-9)       # every rank's texts counted once


def test_mine_with_the_ensemble_on_two_ranks_writes_the_one_process_file(model, model_dir, texts, tmp_path):
    rows = write_jsonl(tmp_path / "in.jsonl", texts["rows"])
    common = ["--model", str(model_dir), "--head", "ensemble", "--range", "2-12", "--negatives", "3", "--scores",
              "--batch-size", "8", "--query-max-len", "32", "--passage-max-len", "64", "--no-progress"]
    assert main(["mine", str(rows), str(tmp_path / "one.jsonl"), *common]) == 0
    (tmp_path / "out").mkdir()
    launch(["mine", str(rows), str(tmp_path / "out" / "two.jsonl"), *common], tmp_path / "logs")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["two.jsonl"]
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "out" / "two.jsonl")
    pool = list(dict.fromkeys(t for r in texts["rows"] for t in r["pos"] + r["neg"]))
    scores = search_top_k(model, texts["queries"], pool, top_k=len(pool), **SEARCH)["ensemble"][0].numpy()
    assert_same_mined(one, two, clear_of_ties(scores, 12 + 2))


def assert_same_mined(one: list[dict], two: list[dict], clear: np.ndarray) -> None:
    """The same rows in order, the same positive scores; the same negatives (and their scores) in
    every row without near-ties among its candidates, and most rows are such rows."""
    assert [r["id"] for r in two] == [r["id"] for r in one]
    assert [r["pos"] for r in two] == [r["pos"] for r in one]
    for a, b in zip(one, two):
        assert b["pos_scores"] == pytest.approx(a["pos_scores"], abs=ATOL)
    assert clear.sum() >= 0.5 * len(one)
    for a, b, ok in zip(one, two, clear):
        if ok:
            assert b["neg"] == a["neg"]
            assert b["neg_scores"] == pytest.approx(a["neg_scores"], abs=ATOL)


def test_score_teacher_on_two_ranks_writes_the_one_process_scores(model_dir, texts, tmp_path):
    rows = write_jsonl(tmp_path / "in.jsonl", texts["rows"])
    common = ["--model", str(model_dir), "--score", "ensemble", "--scale", "50", "--batch-size", "8",
              "--query-max-len", "32", "--passage-max-len", "64", "--no-progress"]
    assert main(["score-teacher", str(rows), str(tmp_path / "one.jsonl"), *common]) == 0
    (tmp_path / "out").mkdir()
    launch(["score-teacher", str(rows), str(tmp_path / "out" / "two.jsonl"), *common], tmp_path / "logs")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["two.jsonl"]
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "out" / "two.jsonl")
    assert len(two) == len(one) == 15
    for a, b in zip(one, two):
        assert {k: v for k, v in b.items() if not k.endswith("_scores")} == \
               {k: v for k, v in a.items() if not k.endswith("_scores")}
        assert len(b["pos_scores"]) == 1 and len(b["neg_scores"]) == 3
        assert b["pos_scores"] + b["neg_scores"] == pytest.approx(a["pos_scores"] + a["neg_scores"], abs=50 * ATOL)


# ---- the library on 2 spawned ranks -------------------------------------------------------------------
def _worker(rank: int, port: int, out_dir: str) -> None:
    out = Path(out_dir)
    inputs = json.loads((out / "inputs.json").read_text())
    with gloo_group(rank, port):
        model = load_model_for_inference(inputs["model"])
        queries, docs = inputs["queries"], inputs["docs"]
        results = {}
        for name, kwargs in SEARCHES.items():
            cost = LexicalCost()
            tops = search_top_k(model, queries, docs, lexical_cost=cost, across_ranks=True, **SEARCH, **kwargs)
            results[name] = {head: list(top) for head, top in tops.items()}
            results[name + "_cost"] = cost.summary()
        # the corpus store shared among the ranks: killed after one shard each, resumed, reused
        store = dict(heads=("dense", "sparse", "colbert"), across_ranks=True, **SEARCH, **SEARCHES["rerank"])
        try:
            search_top_k(model, queries, docs, corpus_cache=CorpusCache(out / "store", SHARD_DOCS, stop_after=1), **store)
            results["interrupted"] = False
        except StoreInterrupted:
            results["interrupted"] = True
        results["shards_after_kill"] = len(list((out / "store").glob("*/shard-*.safetensors")))
        cache = CorpusCache(out / "store", SHARD_DOCS)
        results["store_rerank"] = {h: list(t) for h, t in search_top_k(model, queries, docs, corpus_cache=cache,
                                                                        **store).items()}
        results["resumed"] = cache.report
        exact = dict(store, first_stage_k=None, heads=("dense", "sparse"))
        results["store_exact"] = {h: list(t) for h, t in search_top_k(model, queries, docs, corpus_cache=cache,
                                                                       **exact).items()}
        results["reused"] = cache.report
        # dense mining: rank 0 writes the file
        (out / f"mined{rank}").mkdir()
        results["mine"] = mine(inputs["rows"], out / f"mined{rank}" / "out.jsonl", model, head="dense",
                               across_ranks=True, query_instruction="", passage_instruction="", **MINE)["rows"]
        torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(model_dir, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    rows = write_jsonl(out / "rows.jsonl", texts["rows"])
    (out / "inputs.json").write_text(json.dumps({"model": str(model_dir), "queries": texts["queries"],
                                                 "docs": texts["docs"], "rows": str(rows)}))
    return out, spawn_ranks(_worker, out)


def test_search_on_two_ranks_returns_the_one_process_top_k_on_every_rank(model, texts, two_ranks):
    _, ranks = two_ranks
    for name, kwargs in SEARCHES.items():
        cost = LexicalCost()
        want = search_top_k(model, texts["queries"], texts["docs"], lexical_cost=cost, **SEARCH, **kwargs)
        for results in ranks:
            assert set(results[name]) == set(want) == {"dense", "sparse", "colbert", "ensemble", "dense@8",
                                                       "colbert@8", "ensemble@8"}
            for head in want:
                assert_same_top(results[name][head], want[head])
            assert results[name + "_cost"] == pytest.approx(cost.summary(), rel=1e-9)


def test_the_corpus_store_is_written_by_both_ranks_resumed_after_a_kill_and_reused(model, texts, two_ranks):
    out, ranks = two_ranks
    for results in ranks:
        assert results["interrupted"] and results["shards_after_kill"] == 2      # one shard per rank
        assert (results["resumed"]["shards_encoded"], results["resumed"]["shards_reused"]) == (2, 2)
        assert results["reused"]["reused"] and results["reused"]["shards_encoded"] == 0
    (store,) = (out / "store").iterdir()
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 4
    rerank = search_top_k(model, texts["queries"], texts["docs"], **SEARCH, **SEARCHES["rerank"])
    exact = search_top_k(model, texts["queries"], texts["docs"], heads=("dense", "sparse"), top_k=10, dims=(8,),
                         **SEARCH)
    for results in ranks:
        for head in rerank:
            assert_same_top(results["store_rerank"][head], rerank[head])
        for head in exact:
            assert_same_top(results["store_exact"][head], exact[head])


def test_dense_mining_on_two_ranks_writes_the_one_process_file_from_rank_0(model, texts, two_ranks, tmp_path):
    out, ranks = two_ranks
    assert [r["mine"] for r in ranks] == [15, 15]
    assert not any((out / "mined1").iterdir())                                   # rank 1 writes nothing
    mine(out / "rows.jsonl", tmp_path / "one.jsonl", model, head="dense", query_instruction="",
         passage_instruction="", **MINE)
    pool = list(dict.fromkeys(t for r in texts["rows"] for t in r["pos"] + r["neg"]))
    scores = search_top_k(model, texts["queries"], pool, heads=("dense",), top_k=len(pool), **SEARCH)["dense"][0]
    assert_same_mined(read_jsonl(tmp_path / "one.jsonl"), read_jsonl(out / "mined0" / "out.jsonl"),
                      clear_of_ties(scores.numpy(), 12 + 2))
