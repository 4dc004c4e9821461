"""First stage + re-rank (`search_top_k(first_stage_k=K)`, `m3c eval --search rerank`, `m3c mine
--search rerank`): with K at least the corpus it is exact search, head by head; with a small K every
score it returns is an exact score and the dense and sparse heads keep their exact top-k; the
agreement report and the flags. The tiny model on real text (the pydoc topics of the sample data)."""
import json

import numpy as np
import pytest
import torch

from m3composer.cli import build_parser, main
from m3composer.model.m3 import M3Model
from m3composer.retrieval.beir import EvalSet
from m3composer.retrieval.evaluate import evaluate_model, format_table
from m3composer.retrieval.first_stage import DenseIndex
from m3composer.retrieval.search import search_top_k
from m3composer.sample_data.sources import pydoc_sections

SEARCH = dict(batch_size=16, query_max_len=32, passage_max_len=64, progress=False, query_instruction="",
              passage_instruction="")
ALL_HEADS = ("dense", "sparse", "colbert", "ensemble")


@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.manual_seed(0)
    model = M3Model.from_pretrained(tiny_dir)          # random heads: every head ranks differently
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.5)            # queries and passages share weighted tokens
    return model


@pytest.fixture(scope="module")
def real_set() -> EvalSet:
    items = pydoc_sections()[:80]
    queries = items[:16]
    return EvalSet(query_ids=[i.item_id for i in queries], queries=[i.query for i in queries],
                   doc_ids=[i.item_id for i in items], docs=[i.passage for i in items],
                   qrels={i.item_id: {i.item_id: 1.0} for i in queries})


@pytest.fixture(scope="module")
def exact(model, real_set):
    """Every document's score under every head (exact search, k = the corpus)."""
    return search_top_k(model, real_set.queries, real_set.docs, top_k=len(real_set.docs), dims=(8,), **SEARCH)


def score_table(top) -> list[dict[int, float]]:
    """Per query row, {document index: score} of a `(scores, indices)` pair (padding dropped)."""
    values, indices = top
    return [{i: v for i, v in zip(row_i.tolist(), row_v.tolist()) if i >= 0} for row_v, row_i in zip(values, indices)]


@pytest.mark.parametrize("heads", [("dense", "sparse", "colbert"), ("dense", "sparse"), ("dense",)])
def test_rerank_with_k_at_least_the_corpus_is_exact_search(model, real_set, exact, heads):
    n = len(real_set.docs)
    exact_top = search_top_k(model, real_set.queries, real_set.docs, heads=heads, top_k=10, dims=(8,), **SEARCH)
    for first_stage_k in (n, 2 * n):
        got = search_top_k(model, real_set.queries, real_set.docs, heads=heads, top_k=10, dims=(8,),
                           first_stage_k=first_stage_k, **SEARCH)
        assert set(got) == set(exact_top)
        for head, (values, indices) in got.items():
            assert torch.allclose(values, exact_top[head][0], atol=1e-5), head
            # the same documents, up to swaps among scores closer than float rounding
            full = score_table(exact[head])
            for row, (want, have) in enumerate(zip(exact_top[head][1].tolist(), indices.tolist())):
                for doc in set(want) ^ set(have):
                    assert abs(full[row][doc] - values[row, -1].item()) < 1e-5, (head, row, doc)


def test_a_small_first_stage_returns_exact_scores_and_keeps_the_dense_and_sparse_top_k(model, real_set, exact):
    got = search_top_k(model, real_set.queries, real_set.docs, top_k=10, dims=(8,), first_stage_k=12, **SEARCH)
    assert set(got) == set(exact)
    for head, top in got.items():
        full = score_table(exact[head])
        for row, scored in enumerate(score_table(top)):
            assert len(scored) == 10                                  # 12 dense candidates at least
            assert all(abs(full[row][doc] - s) < 1e-5 for doc, s in scored.items()), head
    # only candidates are ranked: a document among a query's 12 best by dense or (a positive score) by sparse
    dense, sparse = score_table(exact["dense"]), score_table(exact["sparse"])
    for row in range(len(real_set.queries)):
        dense_12th, sparse_12th = exact["dense"][0][row, 11].item(), max(exact["sparse"][0][row, 11].item(), 1e-6)
        for head in got:
            assert all(dense[row][doc] >= dense_12th - 1e-5 or sparse[row][doc] >= sparse_12th - 1e-5
                       for doc in got[head][1][row].tolist()), head
    # the first stage is flat faiss (exact) and an exact inverted index: their heads keep the exact top-10
    for head in ("dense", "sparse"):
        want = exact[head][0][:, :10]
        kept = (want > 0) if head == "sparse" else torch.ones_like(want, dtype=torch.bool)   # sparse 0: ties
        assert torch.allclose(got[head][0][kept], want[kept], atol=1e-5), head
    # ColBERT and the ensemble really re-rank a subset: some query's exact top-10 is not all found
    recall = np.mean([len(set(a[:10]) & set(b)) / 10 for a, b in zip(exact["colbert"][1].tolist(),
                                                                      got["colbert"][1].tolist())])
    assert 0.0 < recall < 1.0


def test_an_approximate_first_stage_still_scores_exactly(model, real_set, exact):
    for index in (DenseIndex("hnsw", hnsw_m=4, hnsw_ef_search=16), DenseIndex("ivf", ivf_nlist=4, ivf_nprobe=1)):
        got = search_top_k(model, real_set.queries, real_set.docs, heads=("dense", "colbert"), top_k=10,
                           first_stage_k=20, dense_index=index, **SEARCH)
        for head in ("dense", "colbert", "ensemble"):
            # the ensemble of (dense, colbert) is not `exact`'s three-head ensemble: check the heads only
            if head == "ensemble":
                continue
            full = score_table(exact[head])
            for row, scored in enumerate(score_table(got[head])):
                assert scored and all(abs(full[row][doc] - s) < 1e-5 for doc, s in scored.items()), (index, head)


def test_evaluation_reports_the_agreement_with_exact_search(model, real_set):
    n = len(real_set.docs)
    plain = evaluate_model(model, real_set, **SEARCH)
    whole = evaluate_model(model, real_set, first_stage_k=n, with_agreement=True, **SEARCH)
    assert plain["search"] == {"mode": "exact"} and "agreement" not in plain
    assert whole["search"]["mode"] == "rerank" and whole["search"]["first_stage_k"] == n
    assert whole["search"]["index"] == "flat" and whole["search"]["exact_seconds"] > 0
    assert whole["agreement"] == {head: 1.0 for head in ALL_HEADS}
    for head in ALL_HEADS:
        assert whole[head] == pytest.approx(plain[head]), head
    small = evaluate_model(model, real_set, first_stage_k=3, with_agreement=True, **SEARCH)
    assert small["search"]["first_stage_k"] == 10                     # raised to the depth compared
    assert set(small["agreement"]) == set(ALL_HEADS)
    assert all(0.0 <= value <= 1.0 for value in small["agreement"].values())
    assert min(small["agreement"].values()) < 1.0                    # some head lost part of its top-10
    assert small["agreement"]["dense"] == 1.0                        # flat faiss: the dense top-10 is exact
    assert "agreement with exact search" in format_table(small)
    with pytest.raises(ValueError, match="needs a re-rank"):
        evaluate_model(model, real_set, with_agreement=True, **SEARCH)


# ---------------------------------------------------------------- the command line

def write_real_set(path, real_set: EvalSet):
    path.mkdir()
    (path / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n"
                                               for i, t in zip(real_set.doc_ids, real_set.docs)))
    (path / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n"
                                                for i, t in zip(real_set.query_ids, real_set.queries)))
    (path / "qrels").mkdir()
    (path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t1\n" for q, rel in real_set.qrels.items() for d in rel))
    return path


def test_cli_eval_with_rerank_and_agreement(model, real_set, tmp_path, capsys):
    folder = model.save_pretrained(tmp_path / "model")
    beir = write_real_set(tmp_path / "beir", real_set)
    flags = ["--no-progress", "--no-instructions", "--passage-max-len", "64", "--dims", "none"]
    assert main(["eval", str(folder), str(beir), "--search", "rerank", "--first-stage-k", "5", "--index", "ivf",
                 "--ivf-nlist", "4", "--ivf-nprobe", "4", "--agreement", "--output", str(tmp_path / "r.json"),
                 *flags]) == 0
    assert "agreement with exact search" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["search"]["index"] == "ivf" and result["search"]["first_stage_k"] == 10
    assert set(result["agreement"]) == set(ALL_HEADS)
    assert result["agreement"]["dense"] == 1.0                       # IVF probing every cell is flat
    assert main(["eval", str(folder), str(beir), "--agreement", *flags]) == 2
    assert "--agreement compares a re-rank with exact search" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--first-stage-k", "0", "positive whole number"),
                                                  ("--ivf-nprobe", "-3", "positive whole number"),
                                                  ("--hnsw-ef-search", "many", "positive whole number"),
                                                  ("--search", "approximate", "invalid choice"),
                                                  ("--index", "annoy", "invalid choice")])
@pytest.mark.parametrize("command", ["eval", "mine"])
def test_bad_search_flags_are_refused_by_name(command, flag, value, message, capsys):
    positional = ["MODEL", "EVAL"] if command == "eval" else ["IN", "OUT", "--model", "M"]
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([command, *positional, flag, value])
    err = capsys.readouterr().err
    assert flag in err and message in err


def test_search_flags_parse_into_a_first_stage(capsys):
    from m3composer.retrieval.cli_args import search_from_args

    args = build_parser("eval").parse_args(["eval", "M", "E"])
    assert search_from_args(args) == (None, DenseIndex())
    args = build_parser("mine").parse_args(["mine", "IN", "OUT", "--model", "M", "--search", "rerank", "--index", "hnsw",
                                            "--hnsw-m", "16", "--hnsw-ef-search", "40", "--first-stage-k", "50"])
    assert search_from_args(args) == (50, DenseIndex("hnsw", hnsw_m=16, hnsw_ef_search=40))


def test_cli_mine_with_rerank(model, real_set, exact, tmp_path):
    folder = model.save_pretrained(tmp_path / "model")
    rows = [{"query": q, "pos": [real_set.docs[real_set.doc_ids.index(next(iter(real_set.qrels[i])))]]}
            for i, q in zip(real_set.query_ids, real_set.queries)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in real_set.docs))
    common = [str(src), "--model", str(folder), "--corpus", str(corpus), "--range", "1-20", "--negatives", "20",
              "--scores", "--no-progress", "--no-instructions", "--batch-size", "16", "--query-max-len", "32",
              "--passage-max-len", "64"]

    def mined(name, *flags):
        assert main(["mine", common[0], str(tmp_path / name), *common[1:], *flags]) == 0
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    # ensemble: K at least the pool re-ranks everything, so it mines what exact search mines
    exact_rows = mined("exact.jsonl", "--head", "ensemble")
    whole = mined("whole.jsonl", "--head", "ensemble", "--search", "rerank", "--first-stage-k", "1000")
    for a, b in zip(exact_rows, whole):
        assert set(a["neg"]) == set(b["neg"]) and len(a["neg"]) == 20
        assert sorted(a["neg_scores"]) == pytest.approx(sorted(b["neg_scores"]), abs=1e-5)
    # a small first stage: still 20 ranks (K is raised to the ranks needed), scored exactly
    small = mined("small.jsonl", "--head", "ensemble", "--search", "rerank", "--first-stage-k", "2")
    ensemble = [{real_set.docs[doc]: s for doc, s in row.items()} for row in score_table(exact["ensemble"])]
    for row, got in zip(ensemble, small):
        assert len(got["neg"]) == 20
        assert all(abs(row[t] - s) < 1e-5 for t, s in zip(got["neg"], got["neg_scores"]))
    # dense: the faiss first stage itself, IVF probing every cell = flat
    dense = mined("dense.jsonl", "--head", "dense")
    ivf = mined("ivf.jsonl", "--head", "dense", "--search", "rerank", "--index", "ivf", "--ivf-nlist", "4",
                "--ivf-nprobe", "4")
    for a, b in zip(dense, ivf):
        assert set(a["neg"]) == set(b["neg"])
