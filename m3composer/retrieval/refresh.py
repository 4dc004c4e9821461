"""Mining a training set's own pool in token ids with the model being trained: the work
`callbacks.negative_refresh.NegativeRefresh` shares among ranks.

The sequences are the shards' token ids, prefixed and truncated as the collator does
(`collate.with_prefix`), so the model ranks exactly what it trains on. Ranking is `m3c mine`'s
(dense head, raw inner products of the normalised vectors, faiss `IndexFlatIP`) and so is the
selection (`mine.select_negatives`: ranks after excluding the row's positives and its own query
text, the positive-aware filter, a seeded draw); only the pool differs (the row's stream, see
data/negatives.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from m3composer.data.negatives import TrainingPool
from m3composer.data.plan import ROW_STREAM
from m3composer.model.inference import unwrap_m3
from m3composer.padding import right_pad
from m3composer.retrieval.mine import faiss_top_k, select_negatives
from m3composer.retrieval.search import inference_mode

REFRESH_STREAM = ROW_STREAM + 1     # the draw's purpose tag, after the plan's (1) and the rows' (2)


def encode_token_ids(model, sequences: Sequence[np.ndarray], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """Dense vectors `(len(sequences), H)` float32 of ready token ids, in input order (batches
    length-sorted, so little padding)."""
    m3 = unwrap_m3(model)
    device = next(m3.parameters()).device
    order = np.argsort([-len(s) for s in sequences], kind="stable")
    out = np.zeros((len(sequences), m3.encoder.config.hidden_size), dtype=np.float32)
    with inference_mode(m3):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = right_pad([sequences[r] for r in rows], pad_id)
            dense = m3.encode(ids.to(device), mask.to(device), with_sparse=False, with_colbert=False).dense
            out[rows] = dense.float().cpu().numpy()
    return out


def mine_rows(pool: TrainingPool, rows: np.ndarray, query_vecs: np.ndarray, pool_vecs: np.ndarray, *,
              rank_range: tuple[int, int], negatives: int, seed: int, version: int,
              max_score_ratio: Optional[float] = None, margin: Optional[float] = None) -> tuple[np.ndarray, dict]:
    """`(chosen (len(rows), negatives) pool ids padded with -1, counts)` for the pool rows `rows`
    (their query vectors `query_vecs`), each searched in its own stream's part of `pool_vecs`."""
    chosen = np.full((len(rows), negatives), -1, dtype=np.int64)
    counts = {"rows_with_fewer_negatives": 0, "rows_without_negatives": 0, "dropped_by_score": 0}
    need_pos = max_score_ratio is not None or margin is not None
    streams = pool.row_streams[rows]
    for stream in np.unique(streams):
        lo, hi = pool.stream_range(int(stream))
        mine_here = np.flatnonzero(streams == stream)
        k = min(hi - lo, rank_range[1] + max(len(pool.excluded[rows[i]]) for i in mine_here))
        if k <= 0:
            continue
        scores, indices = faiss_top_k(query_vecs[mine_here], pool_vecs[lo:hi], k, "flat")
        for j, i in enumerate(mine_here):
            row = int(rows[i])
            positive_score = (float((pool_vecs[pool.positives[row]] @ query_vecs[i]).min()) if need_pos else None)
            rng = np.random.default_rng([seed, REFRESH_STREAM, version, int(pool.row_ids[row])])
            local = np.where(indices[j] >= 0, indices[j] + lo, -1)
            picked, dropped = select_negatives(local, scores[j], pool.excluded[row], rank_range, negatives, rng,
                                               positive_score, max_score_ratio=max_score_ratio, margin=margin)
            counts["dropped_by_score"] += dropped
            counts["rows_with_fewer_negatives"] += len(picked) < negatives
            counts["rows_without_negatives"] += not picked
            chosen[i, :len(picked)] = [c for c, _ in picked]
    return chosen, counts

