"""Ranking metrics for retrieval evaluation: recall@k, MRR@k, nDCG@k, per query and averaged.

A ranking is a list of document ids, best first. Relevance comes from qrels (`{doc id: grade}`);
a document is *relevant* when its grade is > 0. Grades are used as linear gains in nDCG, as BEIR's
pytrec_eval does:

    recall@k = |relevant ∩ top k| / |relevant|
    MRR@k    = 1 / rank of the first relevant document in the top k (ranks from 1), else 0
    DCG@k    = Σ_{rank r ≤ k} grade(doc_r) / log2(r + 1)
    nDCG@k   = DCG@k / IDCG@k, IDCG from the query's own grades sorted descending

A query without any relevant document has no defined value; callers drop such queries (see
`beir.load_eval_set`) and these functions raise if one gets through.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence


def _relevant(relevant: Mapping[str, float], what: str) -> set[str]:
    wanted = {d for d, grade in relevant.items() if grade > 0}
    if not wanted:
        raise ValueError(f"{what} is undefined for a query without relevant documents")
    return wanted


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """Share of the relevant documents (grade > 0) found in the first k."""
    wanted = _relevant(relevant, "recall")
    return len(wanted.intersection(ranked[:k])) / len(wanted)


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """Reciprocal rank of the first relevant document within the first k, 0 when there is none."""
    wanted = _relevant(relevant, "MRR")
    for rank, doc_id in enumerate(ranked[:k], start=1):
        if doc_id in wanted:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """nDCG@k with linear gain grade / log2(rank + 1), as BEIR's pytrec_eval computes it."""
    dcg = sum(max(relevant.get(d, 0.0), 0.0) / math.log2(rank + 2) for rank, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in relevant.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(rank + 2) for rank, r in enumerate(ideal))
    if idcg == 0:
        raise ValueError("nDCG is undefined for a query without relevant documents")
    return dcg / idcg


def metric_names(k_values: Sequence[int]) -> list[str]:
    """The keys `mean_metrics` returns: recall@k for every k, then MRR and nDCG at the largest k."""
    top = max(k_values)
    return [f"recall@{k}" for k in sorted(set(k_values))] + [f"mrr@{top}", f"ndcg@{top}"]


def query_metrics(ranked: Sequence[str], relevant: Mapping[str, float], k_values: Sequence[int] = (1, 10)) -> dict[str, float]:
    """recall@k (each k), MRR@K and nDCG@K (K = max k) of one query."""
    if not k_values or min(k_values) < 1:
        raise ValueError(f"k_values must be positive integers, got {k_values}")
    top = max(k_values)
    values = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in sorted(set(k_values))}
    values[f"mrr@{top}"] = mrr_at_k(ranked, relevant, top)
    values[f"ndcg@{top}"] = ndcg_at_k(ranked, relevant, top)
    return values


def per_query_metrics(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
                      k_values: Sequence[int] = (1, 10)) -> dict[str, dict[str, float]]:
    """`{query id: query_metrics}`: what paired comparisons between two models need."""
    return {query_id: query_metrics(ranked, qrels[query_id], k_values) for query_id, ranked in rankings.items()}


def mean_metrics(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
                 k_values: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Mean over the queries of `rankings` of recall@k (each k), MRR@K and nDCG@K (K = max k)."""
    if not rankings:
        raise ValueError("no queries to average over")
    per_query = per_query_metrics(rankings, qrels, k_values)
    return {name: sum(q[name] for q in per_query.values()) / len(per_query) for name in metric_names(k_values)}
