"""A small BM25 baseline (pure Python + numpy), evaluated with the ranking metrics of `metrics.py`.

Used to mine lexically hard negatives and teacher scores for the sample data, and as the cheap
baseline the held-out BEIR split must beat. Nothing here knows about models or tokenizers.

Scoring (Okapi BM25, Lucene's non-negative idf):

    idf(t)      = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))
    score(q, d) = sum over query tokens t (repeats count) of
                  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))

Tokens are lower-cased `\\w+` runs (Unicode-aware, so accented and CJK text is split on word
characters; a CJK run becomes one token, which is fine for a lexical baseline).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# The metrics and the BEIR reader live in their own modules; re-exported here for existing callers.
from m3composer.retrieval.beir import load_beir  # noqa: F401
from m3composer.retrieval.metrics import ndcg_at_k, recall_at_k  # noqa: F401

_WORD = re.compile(r"\w+")


def simple_tokenize(text: str) -> list[str]:
    """Lower-cased word runs: the tokenizer BM25 uses unless told otherwise."""
    return _WORD.findall(text.lower())


class BM25:
    """An inverted index over `documents`; `scores(query)` gives one BM25 score per document."""

    def __init__(self, documents: Sequence[str], k1: float = 1.2, b: float = 0.75,
                 tokenize: Callable[[str], list[str]] = simple_tokenize):
        if not documents:
            raise ValueError("BM25 needs at least one document")
        self.k1, self.b, self.tokenize = k1, b, tokenize
        self.num_docs = len(documents)
        postings: dict[str, list[tuple[int, int]]] = {}
        lengths = np.zeros(self.num_docs, dtype=np.float64)
        for doc_id, text in enumerate(documents):
            counts = Counter(tokenize(text))
            lengths[doc_id] = sum(counts.values())
            for term, tf in counts.items():
                postings.setdefault(term, []).append((doc_id, tf))
        self.doc_lengths = lengths
        self.avg_doc_length = float(lengths.mean()) or 1.0  # all-empty corpus: avoid 0/0
        # Per-document length normaliser, computed once: k1 * (1 - b + b * |d| / avgdl).
        self._norm = k1 * (1.0 - b + b * lengths / self.avg_doc_length)
        self._postings = {
            term: (np.array([d for d, _ in pairs], dtype=np.int64),
                   np.array([tf for _, tf in pairs], dtype=np.float64))
            for term, pairs in postings.items()
        }

    def idf(self, term: str) -> float:
        n_t = len(self._postings[term][0]) if term in self._postings else 0
        return math.log(1.0 + (self.num_docs - n_t + 0.5) / (n_t + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of `query` against every document, shape (num_docs,)."""
        out = np.zeros(self.num_docs, dtype=np.float64)
        for term in self.tokenize(query):
            posting = self._postings.get(term)
            if posting is None:
                continue  # a term in no document adds 0 to every score
            doc_ids, tf = posting
            out[doc_ids] += self.idf(term) * tf * (self.k1 + 1.0) / (tf + self._norm[doc_ids])
        return out

    def top_k(self, query: str, k: int) -> list[tuple[int, float]]:
        """The k best (doc index, score), best first; ties broken by lower index (deterministic)."""
        scores = self.scores(query)
        order = np.lexsort((np.arange(self.num_docs), -scores))[:k]
        return [(int(i), float(scores[i])) for i in order]


# --- metrics (binary or graded relevance; `ranked` is best first) --------------------------------

def random_expectation(num_docs: int, num_relevant: int, k: int) -> dict[str, float]:
    """Expected recall@k and nDCG@k of a uniformly random ranking (binary relevance).

    Every rank holds a relevant document with probability R/N, so E[hits in top k] = k*R/N,
    E[recall@k] = min(k, N)/N, and E[DCG@k] = (R/N) * sum_{r<=k} 1/log2(r+1).
    """
    k_eff = min(k, num_docs)
    p = num_relevant / num_docs
    discounts = [1.0 / math.log2(r + 2) for r in range(k_eff)]
    idcg = sum(discounts[:min(num_relevant, k_eff)])
    return {"recall@k": k_eff / num_docs, "ndcg@k": p * sum(discounts) / idcg}


def evaluate_bm25_on_beir(folder: str | Path, k: int = 10, split: str = "test") -> dict:
    """BM25 (title + text) over a BEIR folder: mean recall@k and nDCG@k, next to random's."""
    corpus, queries, qrels = load_beir(folder, split)
    doc_ids = sorted(corpus)
    index = BM25([f"{corpus[d][0]} {corpus[d][1]}".strip() for d in doc_ids])
    recalls, ndcgs, randoms = [], [], []
    for qid in sorted(qrels):
        ranked = [doc_ids[i] for i, _ in index.top_k(queries[qid], k)]
        recalls.append(recall_at_k(ranked, qrels[qid], k))
        ndcgs.append(ndcg_at_k(ranked, qrels[qid], k))
        randoms.append(random_expectation(len(doc_ids), sum(r > 0 for r in qrels[qid].values()), k))
    n = len(recalls)
    return {"queries": n, "corpus": len(doc_ids), "k": k,
            "recall": sum(recalls) / n, "ndcg": sum(ndcgs) / n,
            "random_recall": sum(r["recall@k"] for r in randoms) / n,
            "random_ndcg": sum(r["ndcg@k"] for r in randoms) / n}
