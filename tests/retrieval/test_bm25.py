"""BM25 scores, ranking metrics and the BEIR reader, checked against hand-computed values."""
import itertools
import json
import math

import pytest

from m3composer.retrieval.bm25 import (BM25, evaluate_bm25_on_beir, load_beir, ndcg_at_k, random_expectation,
                                       recall_at_k, simple_tokenize)

# N = 3 documents, lengths 2, 3, 1 -> avgdl = 2; k1 = 1.2, b = 0.75.
DOCS = ["Cat sat", "cat cat dog", "bird"]


def test_tokenize_lowercases_and_splits_on_non_word_characters():
    assert simple_tokenize("Hello, wörld! x_y 42") == ["hello", "wörld", "x_y", "42"]


def test_single_term_scores_match_hand_computation():
    index = BM25(DOCS)
    idf_cat = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))        # 'cat' is in 2 of 3 documents
    assert index.idf("cat") == pytest.approx(idf_cat)
    # d0: tf 1, |d| = avgdl -> normaliser k1 = 1.2 -> 2.2 / 2.2 = 1
    # d1: tf 2, |d| = 3 -> normaliser 1.2 * (0.25 + 0.75 * 1.5) = 1.65 -> 4.4 / 3.65
    expected = [idf_cat * 1.0, idf_cat * 4.4 / 3.65, 0.0]
    assert index.scores("cat").tolist() == pytest.approx(expected)


def test_query_terms_add_up_and_repeats_count_and_unknown_terms_add_nothing():
    index = BM25(DOCS)
    idf_bird = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    bird_d2 = idf_bird * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 0.5))
    cat = index.scores("cat")
    assert index.scores("cat bird").tolist() == pytest.approx([cat[0], cat[1], bird_d2])
    assert index.scores("cat cat").tolist() == pytest.approx((2 * cat).tolist())
    assert index.scores("cat zebra").tolist() == pytest.approx(cat.tolist())


def test_top_k_orders_by_score_then_index():
    index = BM25(["a b", "a b", "c", "a a b"])
    ranked = index.top_k("a", 4)
    assert [i for i, _ in ranked][:3] == [3, 0, 1]   # doc 3 has tf 2; 0 and 1 tie -> lower index first
    assert ranked[-1] == (2, 0.0)


def test_recall_and_ndcg_by_hand():
    assert recall_at_k(["a", "b", "c"], {"b": 1}, 1) == 0.0
    assert recall_at_k(["a", "b", "c"], {"b": 1, "z": 1}, 2) == 0.5
    assert ndcg_at_k(["a", "b", "c"], {"b": 1}, 10) == pytest.approx(1 / math.log2(3))
    # graded: DCG = 1/log2(2) + 2/log2(4) = 2; IDCG = 2/log2(2) + 1/log2(3)
    assert ndcg_at_k(["c", "b", "a"], {"a": 2, "c": 1}, 10) == pytest.approx(2 / (2 + 1 / math.log2(3)))
    with pytest.raises(ValueError):
        ndcg_at_k(["a"], {"a": 0}, 10)


@pytest.mark.parametrize("num_docs,num_relevant,k", [(4, 1, 2), (5, 2, 3), (3, 1, 10)])
def test_random_expectation_equals_the_mean_over_all_rankings(num_docs, num_relevant, k):
    docs = [str(i) for i in range(num_docs)]
    relevant = {d: 1.0 for d in docs[:num_relevant]}
    perms = list(itertools.permutations(docs))
    mean_recall = sum(recall_at_k(p, relevant, k) for p in perms) / len(perms)
    mean_ndcg = sum(ndcg_at_k(p, relevant, k) for p in perms) / len(perms)
    expected = random_expectation(num_docs, num_relevant, k)
    assert expected["recall@k"] == pytest.approx(mean_recall)
    assert expected["ndcg@k"] == pytest.approx(mean_ndcg)


def _write_beir(folder, header="query-id\tcorpus-id\tscore"):
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": "d1", "title": "", "text": "parse a date string"},
            {"_id": "d2", "title": "", "text": "open a socket connection"},
            {"_id": "d3", "title": "", "text": "format a date for output"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": "q1", "text": "socket"}, {"_id": "q2", "text": "parse date"}]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text(f"{header}\nq1\td2\t1\nq2\td3\t1\n")


def test_evaluate_bm25_on_a_tiny_beir_folder(tmp_path):
    _write_beir(tmp_path)
    corpus, queries, qrels = load_beir(tmp_path)
    assert set(corpus) == {"d1", "d2", "d3"} and queries["q1"] == "socket"
    assert qrels == {"q1": {"d2": 1.0}, "q2": {"d3": 1.0}}
    result = evaluate_bm25_on_beir(tmp_path, k=1)
    # q1 'socket' -> d2 at rank 1; q2 'parse date' -> d1 (both terms) beats the relevant d3 (one term)
    assert result["recall"] == pytest.approx(0.5)
    assert result["ndcg"] == pytest.approx(0.5)
    assert result["random_recall"] == pytest.approx(1 / 3)


def test_bad_qrels_header_names_the_file(tmp_path):
    _write_beir(tmp_path, header="qid\tdocid\trel")
    with pytest.raises(ValueError, match=r"test\.tsv:1"):
        load_beir(tmp_path)
