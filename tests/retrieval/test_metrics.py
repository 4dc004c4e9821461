"""recall@k, MRR@k, nDCG@k and their mean, against values worked out by hand."""
import math

import pytest

from m3composer.retrieval.metrics import mean_metrics, metric_names, mrr_at_k, ndcg_at_k, recall_at_k

# q1: one relevant document at rank 2.  q2: graded, x (2) at rank 1, w (1) at rank 4, v (1) never retrieved.
RANKINGS = {"q1": ["a", "b", "c"], "q2": ["x", "y", "z", "w"]}
QRELS = {"q1": {"b": 1, "c": 0}, "q2": {"x": 2, "w": 1, "v": 1}}


def test_recall_counts_relevant_documents_in_the_top_k():
    assert recall_at_k(RANKINGS["q1"], QRELS["q1"], 1) == 0.0
    assert recall_at_k(RANKINGS["q1"], QRELS["q1"], 2) == 1.0
    assert recall_at_k(RANKINGS["q2"], QRELS["q2"], 1) == pytest.approx(1 / 3)
    assert recall_at_k(RANKINGS["q2"], QRELS["q2"], 10) == pytest.approx(2 / 3)   # v is never retrieved


def test_mrr_is_the_reciprocal_rank_of_the_first_relevant_within_k():
    assert mrr_at_k(RANKINGS["q1"], QRELS["q1"], 10) == 0.5
    assert mrr_at_k(RANKINGS["q1"], QRELS["q1"], 1) == 0.0          # the hit at rank 2 is past k
    assert mrr_at_k(RANKINGS["q2"], QRELS["q2"], 10) == 1.0
    assert mrr_at_k(["c", "a"], QRELS["q1"], 10) == 0.0             # grade 0 is not relevant


def test_ndcg_uses_graded_gains_and_the_ideal_order_of_the_querys_own_qrels():
    # q1: DCG = 1/log2(3); ideal = 1/log2(2) = 1.
    assert ndcg_at_k(RANKINGS["q1"], QRELS["q1"], 10) == pytest.approx(1 / math.log2(3))
    # q2: DCG = 2/log2(2) + 1/log2(5); IDCG = 2/log2(2) + 1/log2(3) + 1/log2(4).
    expected = (2 + 1 / math.log2(5)) / (2 + 1 / math.log2(3) + 0.5)
    assert ndcg_at_k(RANKINGS["q2"], QRELS["q2"], 10) == pytest.approx(expected)
    # k = 1: DCG = 2, IDCG = 2.
    assert ndcg_at_k(RANKINGS["q2"], QRELS["q2"], 1) == pytest.approx(1.0)


def test_mean_metrics_average_over_queries_with_mrr_and_ndcg_at_the_largest_k():
    got = mean_metrics(RANKINGS, QRELS, k_values=(1, 10))
    assert list(got) == metric_names((1, 10)) == ["recall@1", "recall@10", "mrr@10", "ndcg@10"]
    assert got["recall@1"] == pytest.approx((0 + 1 / 3) / 2)
    assert got["recall@10"] == pytest.approx((1 + 2 / 3) / 2)
    assert got["mrr@10"] == pytest.approx((0.5 + 1) / 2)
    q2 = (2 + 1 / math.log2(5)) / (2.5 + 1 / math.log2(3))
    assert got["ndcg@10"] == pytest.approx((1 / math.log2(3) + q2) / 2)


def test_queries_without_relevant_documents_are_refused():
    with pytest.raises(ValueError, match="without relevant"):
        recall_at_k(["a"], {"a": 0}, 1)
    with pytest.raises(ValueError, match="without relevant"):
        mrr_at_k(["a"], {}, 1)
    with pytest.raises(ValueError, match="without relevant"):
        ndcg_at_k(["a"], {"a": 0}, 1)
    with pytest.raises(ValueError, match="no queries"):
        mean_metrics({}, {})
