"""m3c eval: per-head scores, rankings and metrics, checked by hand on a hand-made model and set,
against BGE-M3's inference formulas on a real tiny model, and through the CLI (folders with and
without heads, export -> reload gives identical numbers)."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from m3composer.cli import main
from m3composer.model.m3 import M3Model
from m3composer.retrieval.beir import EvalSet, load_eval_set
from m3composer.model.inference import heads_in_folder, unwrap_m3
from m3composer.retrieval.evaluate import evaluate_model, format_table
from m3composer.model.scores import colbert_maxsim
from m3composer.retrieval.search import RunningTopK, rank_corpus
from m3composer.retrieval.metrics import mean_metrics
from tests.ranking import SCORE_TOL, assert_ranked_by, min_neighbour_gap

# ---------------------------------------------------------------- a model whose scores are known by hand
# Token ids: <s>=0 <pad>=1 </s>=2 <unk>=3, then the words a, b, c. Word vectors (specials are 0):
#   a = [1, 0, 1]   b = [0, 1, 0]   c = [0, 2, 3]
# The encoder puts the sum of the text's word vectors at position 0 (so CLS pooling = bag of words)
# and each word's own vector at its position. Sparse weight = ReLU(third coordinate); the ColBERT
# projection is the identity; nothing is normalised.
WORDS = {"a": 4, "b": 5, "c": 6}
VECTORS = {"a": [1.0, 0.0, 1.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 2.0, 3.0]}


class WordTokenizer:
    pad_token_id = 1

    def __call__(self, texts, truncation=True, max_length=512, add_special_tokens=True):
        return {"input_ids": [[0] + [WORDS[w] for w in t.split()] + [2] for t in texts]}


class BagOfWordsEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        table = torch.zeros(len(WORDS) + 4, 3)
        for word, vec in VECTORS.items():
            table[WORDS[word]] = torch.tensor(vec)
        self.table = nn.Embedding.from_pretrained(table)
        self.config = SimpleNamespace(vocab_size=table.shape[0], hidden_size=3)

    def forward(self, input_ids, attention_mask, return_dict=True):
        words = self.table(input_ids) * attention_mask[..., None]
        hidden = torch.cat([words.sum(dim=1, keepdim=True), words[:, 1:]], dim=1)
        return SimpleNamespace(last_hidden_state=hidden)


def hand_model() -> M3Model:
    colbert, sparse = nn.Linear(3, 3), nn.Linear(3, 1)
    with torch.no_grad():
        colbert.weight.copy_(torch.eye(3)), colbert.bias.zero_()
        sparse.weight.copy_(torch.tensor([[0.0, 0.0, 1.0]])), sparse.bias.zero_()
    return M3Model(BagOfWordsEncoder(), colbert, sparse, pooling="cls", normalize=False,
                   special_token_ids={"cls": 0, "pad": 1, "eos": 2, "unk": 3}, tokenizer=WordTokenizer())


# Corpus d0 = "a", d1 = "b", d2 = "c b"; queries q0 = "a" (relevant d0), q1 = "b" (d1 grade 2, d2 grade 1).
HAND_SET = EvalSet(query_ids=["q0", "q1"], queries=["a", "b"], doc_ids=["d0", "d1", "d2"], docs=["a", "b", "c b"],
                   qrels={"q0": {"d0": 1.0}, "q1": {"d1": 2.0, "d2": 1.0}})


def test_metrics_per_head_equal_hand_computed_values():
    # dense = bag-of-words dot products: d0 [1,0,1], d1 [0,1,0], d2 [0,3,3]
    #   q0 [1,0,1]: 2, 0, 3 -> d2, d0, d1          q1 [0,1,0]: 0, 1, 3 -> d2, d1, d0
    # sparse: weights a 1, b 0, c 3 -> q0·d0 = 1, everything else 0 -> ties in corpus order
    #   q0: d0, d1, d2                              q1: d0, d1, d2
    # colbert (query vectors = its words + a zero </s>; docs also keep their zero </s>):
    #   q0 [a, 0]: d0 (2+0)/2 = 1, d1 (0+0)/2 = 0, d2 (3+0)/2 = 1.5 -> d2, d0, d1
    #   q1 [b, 0]: d0 0, d1 0.5, d2 (2+0)/2 = 1 -> d2, d1, d0
    # ensemble with weights (0.1, 1.0, 0.1):
    #   q0: d0 .2+1+.1 = 1.3, d1 0, d2 .3+0+.15 = .45 -> d0, d2, d1
    #   q1: d0 0, d1 .1+0+.05 = .15, d2 .3+0+.1 = .4 -> d2, d1, d0
    got = evaluate_model(hand_model(), HAND_SET, query_instruction="", passage_instruction="", batch_size=2,
                         weights=(0.1, 1.0, 0.1), k_values=(1, 2))
    log3 = math.log2(3)
    ndcg_q0_rank2 = 1 / log3                                # the only relevant document at rank 2
    ndcg_q1_d2_d1 = (1 + 2 / log3) / (2 + 1 / log3)        # grades 1 then 2 vs the ideal 2 then 1
    ndcg_q1_d0_d1 = (2 / log3) / (2 + 1 / log3)            # miss, then grade 2
    expected = {
        "dense": {"recall@1": (0 + .5) / 2, "recall@2": (1 + 1) / 2, "mrr@2": (.5 + 1) / 2,
                  "ndcg@2": (ndcg_q0_rank2 + ndcg_q1_d2_d1) / 2},
        "sparse": {"recall@1": (1 + 0) / 2, "recall@2": (1 + .5) / 2, "mrr@2": (1 + .5) / 2,
                   "ndcg@2": (1 + ndcg_q1_d0_d1) / 2},
        "ensemble": {"recall@1": (1 + .5) / 2, "recall@2": (1 + 1) / 2, "mrr@2": (1 + 1) / 2,
                     "ndcg@2": (1 + ndcg_q1_d2_d1) / 2},
    }
    expected["colbert"] = expected["dense"]                 # same rankings as dense, by the table above
    for head, metrics in expected.items():
        assert got[head] == pytest.approx(metrics), head
    assert got["num_queries"] == 2 and got["num_docs"] == 3
    assert got["heads"] == ["dense", "sparse", "colbert"]


def test_rankings_of_the_hand_model_and_dense_only_evaluation():
    rankings = rank_corpus(hand_model(), HAND_SET, batch_size=1, weights=(0.1, 1.0, 0.1), top_k=3, progress=False)
    assert rankings["dense"] == {"q0": ["d2", "d0", "d1"], "q1": ["d2", "d1", "d0"]}
    assert rankings["sparse"] == {"q0": ["d0", "d1", "d2"], "q1": ["d0", "d1", "d2"]}
    assert rankings["colbert"] == {"q0": ["d2", "d0", "d1"], "q1": ["d2", "d1", "d0"]}
    assert rankings["ensemble"] == {"q0": ["d0", "d2", "d1"], "q1": ["d2", "d1", "d0"]}
    dense_only = rank_corpus(hand_model(), HAND_SET, heads=("dense",), top_k=2, progress=False)
    assert set(dense_only) == {"dense"} and dense_only["dense"]["q0"] == ["d2", "d0"]


def test_running_top_k_keeps_the_best_and_breaks_ties_by_corpus_order():
    top = RunningTopK(num_queries=2, k=3, device="cpu")
    # Batches arrive length-sorted, not in corpus order: documents 3, 1, then 0, 2, 4.
    top.update(torch.tensor([[1.0, 1.0], [0.0, 5.0]]), torch.tensor([3, 1]))
    top.update(torch.tensor([[1.0, 1.0, 2.0], [5.0, 5.0, -1.0]]), torch.tensor([0, 2, 4]))
    assert top.indices.tolist() == [[4, 0, 1], [0, 1, 2]]
    assert top.values.tolist() == [[2.0, 1.0, 1.0], [5.0, 5.0, 5.0]]


def test_colbert_maxsim_excludes_document_padding_and_averages_over_query_vectors():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])            # two vectors + one padding row
    q_mask = torch.tensor([[1, 1, 0]])
    d = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [0.0, 0.0]],              # third row is padding
                      [[-1.0, 0.0], [0.0, -1.0], [0.0, 0.0]]])
    d_mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # doc 0: max(0.6, 1) = 1 and max(0.8, 0) = 0.8 -> 0.9; doc 1: max(-1, 0) = 0 for both vectors -> 0
    assert colbert_maxsim(q, q_mask, d, d_mask)[0].tolist() == pytest.approx([0.9, 0.0])
    d_neg = torch.tensor([[[-1.0, -1.0], [0.0, 0.0]]])
    # only negative sims: a padding zero row would give max 0; excluded, the max is -1 per vector
    assert colbert_maxsim(q, q_mask, d_neg, torch.tensor([[1, 0]]))[0].tolist() == pytest.approx([-1.0])
    # chunking over queries changes nothing
    many_q = torch.randn(5, 3, 2)
    full = colbert_maxsim(many_q, torch.ones(5, 3), d, d_mask)
    assert torch.allclose(colbert_maxsim(many_q, torch.ones(5, 3), d, d_mask, max_elements=1), full)


def test_unwrap_finds_the_m3_model_inside_wrappers():
    m3 = hand_model()
    composer_like = nn.Module()
    composer_like.model = m3
    ddp_like = nn.Module()
    ddp_like.module = composer_like
    assert unwrap_m3(m3) is m3 and unwrap_m3(composer_like) is m3 and unwrap_m3(ddp_like) is m3
    with pytest.raises(TypeError, match="no M3Model"):
        unwrap_m3(nn.Linear(2, 2))


# ---------------------------------------------------------------- a real tiny XLM-R vs BGE-M3's formulas

TEXTS_SET = EvalSet(
    query_ids=["q1", "q2", "q3"],
    queries=["how do I open a file", "what is a list comprehension in Python", "sort"],
    doc_ids=[f"d{i}" for i in range(7)],
    docs=["Use open(path) to read a file.", "List comprehensions build lists: [x for x in y].",
          "sorted() returns a new sorted list; list.sort() sorts in place.", "The weather is nice today.",
          "A dictionary maps keys to values.", "open", "Files are closed by the with statement when the block ends."],
    qrels={"q1": {"d0": 1.0, "d6": 1.0}, "q2": {"d1": 1.0}, "q3": {"d2": 2.0, "d5": 1.0}})


def reference_scores(model, eval_set, weights):
    """Full score matrices from `encode_texts` (BGEM3FlagModel semantics) and recipe.md §Scores."""
    q = model.encode_texts(eval_set.queries, batch_size=8, max_length=64)
    p = model.encode_texts(eval_set.docs, batch_size=8, max_length=512)
    dense = q["dense_vecs"] @ p["dense_vecs"].T
    sparse = np.array([[sum(w * pw[t] for t, w in qw.items() if t in pw) for pw in p["lexical_weights"]]
                       for qw in q["lexical_weights"]])
    colbert = np.array([[(qv @ pv.T).max(axis=1).mean() for pv in p["colbert_vecs"]] for qv in q["colbert_vecs"]])
    w_d, w_s, w_c = weights
    return {"dense": dense, "sparse": sparse, "colbert": colbert, "ensemble": w_d * dense + w_s * sparse + w_c * colbert}


def test_streamed_scores_match_bge_m3_inference_formulas_on_a_real_model(tiny_dir):
    torch.manual_seed(0)
    model = M3Model.from_pretrained(tiny_dir)          # random heads: every head ranks differently
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.5)            # some shared tokens get positive weight on both sides
    weights = (0.4, 0.2, 0.4)
    reference = reference_scores(model, TEXTS_SET, weights)
    # The tiny model keeps texts apart (assets/tiny.py), so its scores are well separated: the
    # rankings below are then exact orders, not rounding noise. Ties (a query sharing no token with
    # several documents: sparse 0) are broken by corpus order, both sides exactly.
    for head in ("dense", "colbert", "ensemble"):
        assert min_neighbour_gap(reference[head]) > 10 * SCORE_TOL, head
    # batch 3 -> 3 corpus batches; a tiny ColBERT block forces the chunked max-sim
    got = rank_corpus(model, TEXTS_SET, batch_size=3, top_k=7, weights=weights, progress=False,
                      colbert_max_elements=64)
    evaluated = evaluate_model(model, TEXTS_SET, heads=("dense", "sparse", "colbert"))
    for head, scores in reference.items():
        for row, qid in enumerate(TEXTS_SET.query_ids):
            assert_ranked_by(got[head][qid], dict(zip(TEXTS_SET.doc_ids, scores[row].tolist())))
        assert evaluated[head] == pytest.approx(mean_metrics(got[head], TEXTS_SET.qrels)), head
    assert np.abs(reference["sparse"]).max() > 0                # the sparse head really scored something


def test_evaluation_restores_training_mode_and_reads_instructions_from_the_model(tiny_dir):
    model = M3Model.from_pretrained(tiny_dir).train()
    model.query_instruction, model.passage_instruction = "query: ", "passage: "
    got = evaluate_model(model, TEXTS_SET, heads=("dense",))
    assert model.training
    assert got["query_instruction"] == "query: " and got["passage_instruction"] == "passage: "
    assert set(got) >= {"dense", "num_queries", "num_docs"} and "ensemble" not in got
    assert evaluate_model(model, TEXTS_SET, heads=("dense",), query_instruction="", passage_instruction="")[
        "query_instruction"] == ""


# ---------------------------------------------------------------- CLI

def write_eval_jsonl(path):
    rows = [{"query": q, "pos": [TEXTS_SET.docs[int(d[1:])] for d in TEXTS_SET.qrels[qid]]}
            for qid, q in zip(TEXTS_SET.query_ids, TEXTS_SET.queries)]
    rows[0]["neg"] = [d for d in TEXTS_SET.docs if d not in rows[0]["pos"] + rows[1]["pos"] + rows[2]["pos"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_on_an_exported_model_and_its_reload_gives_identical_numbers(tiny_dir, tmp_path, capsys):
    torch.manual_seed(1)
    model = M3Model.from_pretrained(tiny_dir)
    exported = model.save_pretrained(tmp_path / "export")    # what the trainer's ExportModel writes
    assert heads_in_folder(exported) == ("dense", "sparse", "colbert")
    eval_path = write_eval_jsonl(tmp_path / "eval.jsonl")
    in_memory = evaluate_model(model, load_eval_set(eval_path))
    assert main(["eval", str(exported), str(eval_path), "--output", str(tmp_path / "a.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert all(row in out for row in ("dense", "sparse", "colbert", "ensemble", "nDCG@10"))
    reloaded = M3Model.from_pretrained(exported)
    again = evaluate_model(reloaded, load_eval_set(eval_path))
    from_cli = json.loads((tmp_path / "a.json").read_text())
    for head in ("dense", "sparse", "colbert", "ensemble"):
        assert in_memory[head] == again[head] == from_cli[head], head     # exactly equal, not approx
    assert from_cli["num_queries"] == 3 and from_cli["num_docs"] == 7 and from_cli["skipped_heads"] == []
    assert "per_query" not in from_cli
    assert main(["eval", str(exported), str(eval_path), "--output", str(tmp_path / "q.json"), "--no-progress",
                 "--per-query"]) == 0
    per_query = json.loads((tmp_path / "q.json").read_text())["per_query"]
    for head in ("dense", "sparse", "colbert", "ensemble"):
        assert len(per_query[head]) == 3                 # query ids of a JSONL eval set: file:line
        assert np.mean([m["ndcg@10"] for m in per_query[head].values()]) == pytest.approx(from_cli[head]["ndcg@10"])


def test_cli_on_a_plain_encoder_folder_evaluates_dense_only_and_says_so(tiny_dir, tmp_path, capsys):
    eval_path = write_eval_jsonl(tmp_path / "eval.jsonl")
    assert main(["eval", str(tiny_dir), str(eval_path), "--output", str(tmp_path / "m.json"),
                 "--no-progress", "--query-instruction", "q: ", "--weights", "1,0,0"]) == 0
    captured = capsys.readouterr()
    assert "skipping the sparse and colbert head(s)" in captured.err
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["heads"] == ["dense"] and result["skipped_heads"] == ["sparse", "colbert"]
    assert "sparse" not in result and "ensemble" not in result
    assert result["query_instruction"] == "q: " and result["passage_instruction"] == ""
    assert "dense" in format_table(result) and "colbert" not in format_table(result)


def test_cli_reports_bad_eval_sets_and_bad_flags(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x", "pos": ["y"]}\nnot json\n')
    assert main(["eval", str(tiny_dir), str(bad), "--no-progress"]) == 2
    assert "bad.jsonl:2: invalid_json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_dir), str(bad), "--weights", "1,2"])
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_dir), str(bad), "--heads", "sparse"])


class _Stderr:
    """A stand-in for sys.stderr that says whether it is a terminal and keeps what was written."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, []

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_cli_draws_progress_bars_when_stderr_is_a_terminal(tiny_dir, tmp_path, monkeypatch, capsys):
    eval_path = write_eval_jsonl(tmp_path / "eval.jsonl")
    stderr = _Stderr(tty=True)
    monkeypatch.setattr("sys.stderr", stderr)
    assert main(["eval", str(tiny_dir), str(eval_path)]) == 0
    drawn = "".join(stderr.text)
    assert "encode queries" in drawn and "encode corpus" in drawn, drawn
    assert "[eval] " in capsys.readouterr().out          # the report itself goes to stdout


@pytest.mark.parametrize("tty, flag, bars", [(True, None, True), (False, None, False),
                                             (True, False, False), (False, True, True)])
def test_progress_defaults_to_whether_stderr_is_a_terminal_and_the_flags_win(monkeypatch, tty, flag, bars):
    from m3composer.cli import build_parser
    from m3composer.retrieval.evaluate import show_progress

    monkeypatch.setattr("sys.stderr", _Stderr(tty))
    flags = {None: [], True: ["--progress"], False: ["--no-progress"]}[flag]
    args = build_parser("eval").parse_args(["eval", "MODEL", "EVAL", *flags])
    assert args.progress is flag and show_progress(args.progress) is bars


# ---------------------------------------------------------------- sparsity: counts, cost, threshold
def test_sparse_cost_and_threshold_equal_a_count_by_hand():
    """Sparse weights of the hand model: a = 1, b = 0, c = 3. Queries "a", "b": 1 and 0 non-zero terms;
    documents "a", "b", "c b": 1, 0, 1. Expected dot-product cost Σ_t p_q(t)·p_d(t) = p_q(a)·p_d(a) =
    1/2 · 1/3. A threshold of 2 drops a (1 < 2) and keeps c (3)."""
    model = hand_model()
    got = evaluate_model(model, HAND_SET, heads=("dense", "sparse"))
    assert got["sparse_cost"] == pytest.approx({"nonzero_per_query": 0.5, "nonzero_per_passage": 2 / 3,
                                                "expected_flops": 1 / 6})
    assert got["sparse_threshold"] == 0.0
    model.sparse_threshold = 2.0
    cut = evaluate_model(model, HAND_SET, heads=("dense", "sparse"))
    assert cut["sparse_cost"] == pytest.approx({"nonzero_per_query": 0.0, "nonzero_per_passage": 1 / 3,
                                                "expected_flops": 0.0})
    assert cut["sparse_threshold"] == 2.0
    assert "sparse: 0.0 non-zero terms per query, 0.3 per passage" in format_table(cut)
    assert "sparse_cost" not in evaluate_model(model, HAND_SET, heads=("dense",))


def test_cli_reports_the_counts_of_a_direct_count_and_applies_the_threshold(tiny_dir, tmp_path, capsys):
    torch.manual_seed(1)
    model = M3Model.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.5)            # most tokens get a positive weight
    exported = model.save_pretrained(tmp_path / "export")
    eval_path = write_eval_jsonl(tmp_path / "eval.jsonl")
    eval_set = load_eval_set(eval_path)

    def direct_counts(threshold: float) -> list[float]:
        counts = []
        for texts in (eval_set.queries, eval_set.docs):
            lexical = model.encode_texts(list(texts), return_dense=False, return_colbert_vecs=False)["lexical_weights"]
            counts.append(np.mean([sum(w >= threshold for w in vec.values()) for vec in lexical]))
        return counts

    model.eval()
    weights = sorted(w for vec in model.encode_texts(list(eval_set.docs))["lexical_weights"] for w in vec.values())
    threshold = weights[len(weights) // 2]                       # the median passage weight
    for flags, cut in (([], 0.0), (["--sparse-threshold", str(threshold)], threshold)):
        out_path = tmp_path / f"cut{cut}.json"
        assert main(["eval", str(exported), str(eval_path), "--output", str(out_path), "--no-progress", *flags]) == 0
        assert "non-zero terms per query" in capsys.readouterr().out
        result = json.loads(out_path.read_text())
        assert result["sparse_threshold"] == pytest.approx(cut)
        want_query, want_passage = direct_counts(cut)
        assert result["sparse_cost"]["nonzero_per_query"] == pytest.approx(want_query)
        assert result["sparse_cost"]["nonzero_per_passage"] == pytest.approx(want_passage)
        if cut == 0.0:
            full_passage, full_flops = want_passage, result["sparse_cost"]["expected_flops"]
    assert full_flops > 0                                       # queries and passages share terms
    assert want_passage < full_passage                          # the threshold removed terms
    assert result["sparse_cost"]["expected_flops"] < full_flops


def test_cli_refuses_a_negative_sparse_threshold(tiny_dir, tmp_path, capsys):
    eval_path = write_eval_jsonl(tmp_path / "eval.jsonl")
    assert main(["eval", str(tiny_dir), str(eval_path), "--sparse-threshold", "-0.5", "--no-progress"]) == 2
    assert "--sparse-threshold must be >= 0, got -0.5" in capsys.readouterr().err


# ---------------------------------------------------------------- Matryoshka sizes (`--dims`)

def _cut(x: np.ndarray, dim: int) -> np.ndarray:
    x = x[..., :dim]
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_each_matryoshka_size_ranks_with_the_cut_renormalised_vectors(tiny_dir):
    torch.manual_seed(1)                                 # random heads whose cut scores are well separated
    model = M3Model.from_pretrained(tiny_dir)            # normalises (CLS pooling), hidden = ColBERT size = 32
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.5)
    weights, dim = (0.4, 0.2, 0.4), 8
    q = model.encode_texts(TEXTS_SET.queries, batch_size=8, max_length=64)
    p = model.encode_texts(TEXTS_SET.docs, batch_size=8, max_length=512)
    full = reference_scores(model, TEXTS_SET, weights)
    dense = _cut(q["dense_vecs"], dim) @ _cut(p["dense_vecs"], dim).T
    colbert = np.array([[(_cut(qv, dim) @ _cut(pv, dim).T).max(axis=1).mean() for pv in p["colbert_vecs"]]
                        for qv in q["colbert_vecs"]])
    reference = {"dense": dense, "colbert": colbert, "ensemble": 0.4 * dense + 0.2 * full["sparse"] + 0.4 * colbert}
    for head, scores in reference.items():
        assert min_neighbour_gap(scores) > 10 * SCORE_TOL, head
        assert np.abs(scores - full[head]).max() > 1e-3, head    # the cut really changes the scores
    got = rank_corpus(model, TEXTS_SET, batch_size=3, top_k=7, weights=weights, progress=False, dims=(dim,))
    assert set(got) == {"dense", "sparse", "colbert", "ensemble", "dense@8", "colbert@8", "ensemble@8"}
    for head, scores in reference.items():
        for row, qid in enumerate(TEXTS_SET.query_ids):
            assert_ranked_by(got[f"{head}@{dim}"][qid], dict(zip(TEXTS_SET.doc_ids, scores[row].tolist())))
    # a size at or above a head's own leaves it whole; sparse is never cut; full-size results stay in place
    evaluated = evaluate_model(model, TEXTS_SET, weights=weights, dims=(64, dim))
    plain = evaluate_model(model, TEXTS_SET, weights=weights)
    assert list(evaluated["dims"]) == ["64", "8"]
    for head in ("dense", "sparse", "colbert", "ensemble"):
        assert evaluated[head] == plain[head] == evaluated["dims"]["64"][head], head
        expected = mean_metrics(got[f"{head}@{dim}" if head != "sparse" else head], TEXTS_SET.qrels)
        assert evaluated["dims"]["8"][head] == pytest.approx(expected), head
    assert "dims" not in plain and "ensemble@8" in format_table(evaluated)


def test_cli_evaluates_the_sizes_the_folder_records_unless_told_otherwise(tiny_dir, tmp_path, capsys):
    torch.manual_seed(1)
    model = M3Model.from_pretrained(tiny_dir)
    model.matryoshka = {"dense_dims": [16, 8], "colbert_dims": [8, 4]}     # what a Matryoshka run records
    exported = model.save_pretrained(tmp_path / "export")
    assert M3Model.from_pretrained(exported, load_tokenizer=False).matryoshka == model.matryoshka
    eval_path = write_eval_jsonl(tmp_path / "eval.jsonl")

    def cli(*flags) -> dict:
        assert main(["eval", str(exported), str(eval_path), "--output", str(tmp_path / "m.json"), "--no-progress",
                     *flags]) == 0
        return json.loads((tmp_path / "m.json").read_text())

    recorded = cli()
    assert list(recorded["dims"]) == ["16", "8", "4"]
    assert set(recorded["dims"]["4"]) == {"dense", "sparse", "colbert", "ensemble"}
    assert "colbert@4" in capsys.readouterr().out
    told = cli("--dims", "8,12", "--per-query")
    assert list(told["dims"]) == ["12", "8"] and "dense@12" in told["per_query"]
    assert told["dims"]["8"] == recorded["dims"]["8"]
    for head in ("dense", "sparse", "colbert", "ensemble"):
        assert told[head] == recorded[head]
    assert "dims" not in cli("--dims", "none")
    with pytest.raises(SystemExit):
        main(["eval", str(exported), str(eval_path), "--dims", "8,0"])
    assert "dims: a comma list of positive sizes" in capsys.readouterr().err
