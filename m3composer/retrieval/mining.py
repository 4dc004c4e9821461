"""The rules of hard-negative mining, as a library: what `m3c mine` (retrieval/mine.py, the command)
and NegativeRefresh (retrieval/refresh.py, for callbacks/negative_refresh.py) both call.

- `pair_score`: one (query, passage) score of any head from `M3Model.encode_texts` items, BGE-M3's
  inference scores (no temperature), with the rules of `model/scores.py`; `m3c score-teacher`
  scores its pairs with it too.
- `score_rows`: every row's (query, passage) `pair_score`s, the texts encoded once, shared among
  ranks when asked (`m3c score-teacher`, and `m3c mine`'s positive scores).
- `select_negatives`: which of a query's ranked candidates become its negatives (ranks after the
  exclusions, the positive-aware filter, a seeded draw; docs/recipe.md §Negative refresh).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from m3composer.distributed import gather_rows, my_shard
from m3composer.model.scores import INFERENCE_ENSEMBLE_WEIGHTS, SCORE_NAMES, colbert_maxsim, ensemble_scores

# what `m3c mine` and `callbacks.negative_refresh` draw unless told otherwise
MINE_HEAD = "dense"
MINE_RANK_RANGE = (10, 100)      # 1-based, inclusive
MINE_NEGATIVES = 7
MINE_SEED = 42                   # `m3c mine`'s draws (NegativeRefresh draws from the run's seed)


def lexical_match(q_weights: dict, p_weights: dict) -> float:
    """Σ over tokens in both of `w_q[t] · w_p[t]` (BGE-M3's lexical matching score)."""
    if len(p_weights) < len(q_weights):
        q_weights, p_weights = p_weights, q_weights
    return float(sum(w * p_weights[t] for t, w in q_weights.items() if t in p_weights))


def colbert_match(q_vecs: np.ndarray, p_vecs: np.ndarray) -> float:
    """Mean over the query's vectors of the max inner product with the passage's vectors: one
    unpadded text each, `colbert_maxsim` of a batch of one."""
    q, p = torch.as_tensor(q_vecs)[None], torch.as_tensor(p_vecs)[None]
    return float(colbert_maxsim(q, torch.ones(q.shape[:2]), p, padding="kept")[0, 0])


def pair_score(query: dict, passage: dict, head: str,
               weights: Sequence[float] = INFERENCE_ENSEMBLE_WEIGHTS) -> float:
    """One (query, passage) score of `head` (a name of `SCORE_NAMES`), from `M3Model.encode_texts`
    items: search.py's scores, one pair at a time."""
    if head not in SCORE_NAMES:
        raise ValueError(f"head must be one of {SCORE_NAMES}, got {head!r}")
    dense = float(np.dot(query["dense_vecs"], passage["dense_vecs"]))
    if head == "dense":
        return dense
    sparse = lexical_match(query["lexical_weights"], passage["lexical_weights"]) if head != "colbert" else None
    colbert = colbert_match(query["colbert_vecs"], passage["colbert_vecs"]) if head != "sparse" else None
    if head == "sparse":
        return sparse
    if head == "colbert":
        return colbert
    return ensemble_scores(dense, sparse, colbert, weights)


def score_rows(m3, queries: Sequence[str], passages: Sequence[Sequence[str]], head: str, *,
               weights: Sequence[float], batch_size: int, query_instruction: str, passage_instruction: str,
               query_max_len: int, passage_max_len: int, across_ranks: bool = False) -> list[list[float]]:
    """`[[pair_score(queries[i], p, head) for p in passages[i]] for every row i]`, each distinct text
    encoded once with `M3Model.encode_texts` (lexical weights and ColBERT vectors too unless `head` is
    dense). `across_ranks` (collective; docs/operations.md §Evaluate, mine and score on N ranks):
    each rank encodes and scores its `distributed.shard` of the rows; every rank gets every row's scores."""
    full = head != "dense"
    first, last, size = my_shard(len(queries)) if across_ranks else (0, len(queries), len(queries))

    def encode(texts: list[str], instruction: str, max_length: int) -> dict[str, dict]:
        texts = list(dict.fromkeys(texts))
        if not texts:
            return {}
        out = m3.encode_texts(texts, batch_size=batch_size, max_length=max_length, instruction=instruction,
                              return_dense=True, return_sparse=full, return_colbert_vecs=full)
        return {t: {key: (v[i] if v is not None else None) for key, v in out.items()} for i, t in enumerate(texts)}

    q_enc = encode(list(queries[first:last]), query_instruction, query_max_len)
    p_enc = encode([t for texts in passages[first:last] for t in texts], passage_instruction, passage_max_len)
    local = [[pair_score(q_enc[q], p_enc[t], head, weights) for t in texts]
             for q, texts in zip(queries[first:last], passages[first:last])]
    if not across_ranks:
        return local
    padded = np.zeros((len(local), max((len(t) for t in passages), default=0)), dtype=np.float64)
    for row, values in enumerate(local):
        padded[row, :len(values)] = values
    gathered = gather_rows(padded, len(queries), size, next(m3.parameters()).device)
    return [row[:len(texts)].tolist() for row, texts in zip(gathered, passages)]


def select_negatives(top_indices: Sequence[int], top_scores: Sequence[float], excluded: set[int] | frozenset,
                     rank_range: tuple[int, int], negatives: int, rng: np.random.Generator,
                     positive_score: Optional[float] = None, *, max_score_ratio: Optional[float] = None,
                     margin: Optional[float] = None) -> tuple[list[tuple[int, float]], int]:
    """One query's negatives: `(chosen (pool index, score) in rank order, candidates dropped by the
    score filter)`.

    `top_indices`/`top_scores` are the query's best candidates, best first (faiss's -1 padding is
    skipped). The `excluded` pool indices (the row's positives, its own query text, ...) do not
    count as ranks; the candidates at ranks `rank_range` (1-based, inclusive) are kept unless they
    score above `max_score_ratio · positive_score` or above `positive_score − margin`
    (NV-Retriever's positive-aware filter; `positive_score` is the lowest score of the row's
    positives); then `negatives` of them are drawn with `rng`, uniformly without replacement.
    """
    first, last = rank_range
    candidates = [(int(c), float(s)) for c, s in zip(top_indices, top_scores)
                  if c >= 0 and int(c) not in excluded][first - 1:last]
    dropped = 0
    if positive_score is not None and (max_score_ratio is not None or margin is not None):
        limits = [positive_score * max_score_ratio] if max_score_ratio is not None else []
        limits += [positive_score - margin] if margin is not None else []
        limit = min(limits)
        kept = [(c, s) for c, s in candidates if s <= limit]
        dropped, candidates = len(candidates) - len(kept), kept
    chosen = sorted(rng.choice(len(candidates), size=min(negatives, len(candidates)), replace=False).tolist())
    return [candidates[j] for j in chosen], dropped
