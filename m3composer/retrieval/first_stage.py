"""First stages for corpora too large for exact search: a faiss index over the dense vectors and an
inverted index over the lexical weights, each giving a query's top-K candidates for `search.py`'s
re-rank (docs/recipe.md §First stage and re-rank); and the agreement of two searches' top-10s.

- `DenseIndex`: which faiss index ranks dense vectors by inner product, with its parameters:
  `flat` (`IndexFlatIP`, exact), `hnsw` (`IndexHNSWFlat`: M links per node, efSearch candidates
  kept while searching) or `ivf` (`IndexIVFFlat`: nlist k-means cells trained on a sample of the
  corpus vectors, nprobe cells searched); `auto` is flat up to `HNSW_MIN_POOL` vectors, then HNSW.
  `faiss_top_k` searches with one.
- `InvertedIndex`: the corpus' lexical weights as postings, token id -> (documents, weights), in
  CSR arrays; a query's scores are accumulated over its tokens' postings only (never a
  documents × vocabulary matrix), the same sums as `search.py`'s sparse scores.
- `agreement`: per head, the recall of one search's top-10 among another's (mean over queries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from m3composer.distributed import gather_ragged
from m3composer.seeds import IVF_TRAIN_STREAM

INDEXES = ("auto", "flat", "hnsw", "ivf")
HNSW_MIN_POOL = 1_000_000     # flat search of 10k queries over 1M e5-small vectors is ~1 min on 2 cores
HNSW_M = 32
IVF_NPROBE = 32
IVF_TRAIN_PER_LIST = 256      # k-means training vectors per IVF cell (faiss's own cap per centroid)
IVF_MIN_PER_LIST = 39         # fewer training vectors per cell than this and faiss warns
FIRST_STAGE_K = 100           # candidates per query from each first stage
AGREEMENT_DEPTH = 10


@dataclass(frozen=True)
class DenseIndex:
    """A faiss index over dense vectors, by inner product (module doc). `hnsw_ef_search` None:
    max(128, 2k) for a search of k; `ivf_nlist` None: min(4·√N, N / 39), at least 1; `ivf_nprobe`
    is capped at nlist (nprobe = nlist searches every cell: flat's results)."""
    kind: str = "auto"
    hnsw_m: int = HNSW_M
    hnsw_ef_search: Optional[int] = None
    ivf_nlist: Optional[int] = None
    ivf_nprobe: int = IVF_NPROBE

    def __post_init__(self):
        if self.kind not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {self.kind!r}")
        for name in ("hnsw_m", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def kind_for(self, num_vectors: int) -> str:
        """The index `auto` means for a pool of `num_vectors` (other kinds are themselves)."""
        if self.kind != "auto":
            return self.kind
        return "hnsw" if num_vectors >= HNSW_MIN_POOL else "flat"

    def nlist_for(self, num_vectors: int) -> int:
        if self.ivf_nlist is not None:
            return min(self.ivf_nlist, max(1, num_vectors))
        return max(1, min(int(4 * np.sqrt(num_vectors)), num_vectors // IVF_MIN_PER_LIST))

    def search(self, queries: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores, indices)` `(len(queries), k)` of the best inner products, best first; a query
        with fewer than `k` results (HNSW, IVF) is padded with index -1."""
        import faiss

        pool = np.ascontiguousarray(pool, dtype=np.float32)
        num, dim = pool.shape
        kind = self.kind_for(num)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.hnsw_ef_search or max(128, 2 * k)
        else:
            nlist = self.nlist_for(num)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng([0, IVF_TRAIN_STREAM]).permutation(num)[:IVF_TRAIN_PER_LIST * nlist]
            index.train(pool[np.sort(sample)])
            index.nprobe = min(self.ivf_nprobe, nlist)
        index.add(pool)
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def faiss_top_k(queries: np.ndarray, pool: np.ndarray, k: int,
                index: str | DenseIndex = "auto") -> tuple[np.ndarray, np.ndarray]:
    """`DenseIndex.search` with an index given by its kind (default parameters) or in full."""
    return (index if isinstance(index, DenseIndex) else DenseIndex(index)).search(queries, pool, k)


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`, without the loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.repeat(np.asarray(starts, dtype=np.int64) - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


def top_k_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the `k` largest `scores`, best first; equal scores go to the lower position."""
    if k < len(scores):
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        above = np.flatnonzero(scores > kth)
        picked = np.concatenate([above, np.flatnonzero(scores == kth)[:k - len(above)]])
    else:
        picked = np.arange(len(scores))
    return picked[np.lexsort((picked, -scores[picked]))]


class InvertedIndex:
    """Lexical weights of `num_docs` documents over a vocabulary of `vocab_size` ids, as postings.

    `add` takes encoder batches `(doc indices, (batch, V) weights)` in any order; `finish` sorts the
    non-zero entries by token (postings: `token_ptr`, `post_docs`, `post_weights`) and keeps the
    permutation back to document order (`doc_ptr`, `by_doc`) so a document's weights can be
    rebuilt. Memory: 16 bytes per non-zero weight (int32 document, float32 weight, int64
    permutation) plus the pointers.
    """

    def __init__(self, num_docs: int, vocab_size: int):
        self.num_docs, self.vocab_size = num_docs, vocab_size
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, doc_indices: Sequence[int], weights: torch.Tensor) -> None:
        rows, tokens = weights.nonzero(as_tuple=True)
        values = weights[rows, tokens].float().cpu().numpy()
        docs = np.asarray(doc_indices, dtype=np.int32)[rows.cpu().numpy()]
        self._parts.append((docs, tokens.cpu().numpy().astype(np.int32), values))

    def add_csr(self, first_doc: int, indptr: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> None:
        """Documents `first_doc, first_doc + 1, …` given as CSR rows (`corpus_store`'s shards)."""
        docs = np.repeat(np.arange(first_doc, first_doc + len(indptr) - 1, dtype=np.int32), np.diff(indptr))
        self._parts.append((docs, tokens.astype(np.int32), weights.astype(np.float32)))

    def _entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(documents, tokens, weights)` of every part added so far, concatenated in order."""
        return tuple(np.concatenate([p[i] for p in self._parts]) if self._parts else np.zeros(0, dtype=dtype)
                     for i, dtype in enumerate((np.int32, np.int32, np.float32)))

    def gather_ranks(self, device) -> "InvertedIndex":
        """Every rank's added weights in place of this rank's own (each rank added its share of the
        documents; `finish` sorts, so the result is one process's). Collective; `device`: where it runs."""
        self._parts = [tuple(gather_ragged(x, device) for x in self._entries())]
        return self

    def finish(self) -> "InvertedIndex":
        docs, tokens, values = self._entries()
        self._parts = []
        by_token = np.lexsort((docs, tokens))
        self.post_docs, self.post_weights = docs[by_token], values[by_token]
        self.token_ptr = np.searchsorted(tokens[by_token], np.arange(self.vocab_size + 1))
        self.by_doc = np.lexsort((tokens[by_token], self.post_docs))        # positions in the postings
        self.doc_ptr = np.searchsorted(self.post_docs[self.by_doc], np.arange(self.num_docs + 1))
        return self

    def scores(self, tokens: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(documents, scores)`: Σ over the query's tokens of `w_q[t] · w_d[t]`, for every document
        sharing a token with the query (ascending documents); the others score 0."""
        starts, ends = self.token_ptr[tokens], self.token_ptr[np.asarray(tokens) + 1]
        entries = concat_ranges(starts, ends - starts)
        products = self.post_weights[entries].astype(np.float64) * np.repeat(weights, ends - starts)
        docs, inverse = np.unique(self.post_docs[entries], return_inverse=True)
        return docs, np.bincount(inverse, weights=products, minlength=len(docs))

    def search(self, tokens: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores, documents)` of the query's top `k` among the documents it shares a token with,
        best first; equal scores go to the lower document."""
        docs, scores = self.scores(tokens, weights)
        top = top_k_positions(scores, k)
        return scores[top], docs[top]

    def rows(self, doc_indices: Sequence[int]) -> torch.Tensor:
        """The documents' lexical weights `(len(doc_indices), V)` as the encoder gave them."""
        doc_indices = np.asarray(doc_indices, dtype=np.int64)
        counts = self.doc_ptr[doc_indices + 1] - self.doc_ptr[doc_indices]
        entries = self.by_doc[concat_ranges(self.doc_ptr[doc_indices], counts)]
        tokens = np.searchsorted(self.token_ptr, entries, side="right") - 1
        out = torch.zeros(len(doc_indices), self.vocab_size)
        out[torch.from_numpy(np.repeat(np.arange(len(doc_indices)), counts)), torch.from_numpy(tokens)] = \
            torch.from_numpy(self.post_weights[entries])
        return out


def agreement(reference: Mapping[str, Mapping[str, Sequence[str]]], other: Mapping[str, Mapping[str, Sequence[str]]],
              depth: int = AGREEMENT_DEPTH) -> dict[str, float]:
    """`{head: mean over queries of |reference top-depth ∩ other top-depth| / |reference top-depth|}`
    for the heads both rankings (`{head: {query id: document ids, best first}}`) have: the recall of
    exact search's top-10 among the re-ranked top-10 (a query with an empty reference counts 1)."""
    out = {}
    for head in (h for h in reference if h in other):
        recalls = [len(set(ranked[:depth]) & set(other[head].get(query, [])[:depth])) / len(ranked[:depth])
                   if ranked else 1.0 for query, ranked in reference[head].items()]
        out[head] = float(np.mean(recalls)) if recalls else 1.0
    return out
