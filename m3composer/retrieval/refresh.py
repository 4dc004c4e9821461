"""Mining a training set's own pool in token ids with the model being trained: the work
`callbacks.negative_refresh.NegativeRefresh` shares among ranks.

The sequences are the shards' token ids, prefixed and truncated as the collator does
(`collate.with_prefix`), so the model ranks exactly what it trains on. Scores are `m3c mine`'s
(BGE-M3's inference scores, no temperature: `search.py`'s definitions), and so is the selection
(`mining.select_negatives`: ranks after excluding the row's positives and its own query text, the
positive-aware filter, a seeded draw); only the pool differs (the row's stream, see
data/negatives.py). Two ways of sharing the work, by head:

* **dense** (`mine_rows`): every rank encodes 1/W of the pool; the vectors are gathered onto every
  rank (`H` floats per passage) and each rank searches its 1/W of the rows with faiss
  (`IndexFlatIP`, exact).
* **sparse, colbert, ensemble** (`mine_rows_sharded_pool`): the pool stays sharded, because its
  ColBERT vectors (`L × D` floats per passage) and sparse weights would not fit on every rank.
  Per stream and per chunk of up to `query_chunk` of its rows, every rank encodes 1/W of the
  chunk's queries and the chunk's query representations are gathered (dense `H`, sparse as up to
  `L` (token id, weight) pairs, ColBERT `L × D`); each rank then streams its own share of the
  stream's passages through the encoder, keeps a running top-k per query (ties to the lower pool
  id) and the scores of the rows' positives it holds; the W top-k lists are gathered and merged
  (same tie rule) and the positives' scores reduced to their minimum, so every rank holds the
  one result and selects every row's negatives the same way. A stream with more rows than
  `query_chunk` encodes its passages once per chunk. Brute force, exact: the cost of the
  ColBERT max-sim is `rows × passages × Lq × Lp × D` per stream (BENCHMARKS.md §Negative refresh).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from m3composer.data.negatives import TrainingPool
from m3composer.distributed import gather_all, gather_rows, my_shard
from m3composer.model.inference import unwrap_m3
from m3composer.model.scores import INFERENCE_ENSEMBLE_WEIGHTS, colbert_maxsim, ensemble_scores
from m3composer.padding import right_pad
from m3composer.retrieval.first_stage import faiss_top_k
from m3composer.retrieval.mining import select_negatives
from m3composer.retrieval.search import RunningTopK, inference_mode, merge_top_k
from m3composer.seeds import REFRESH_STREAM

REFRESH_BATCH_SIZE = 64             # texts per no-grad encoder forward (`callbacks.negative_refresh.batch_size`)
QUERY_CHUNK = 8192                  # rows whose query representations are held at once (sharded-pool heads)


# ---- encoding token ids ------------------------------------------------------------------------------
def token_id_batches(sequences: Sequence[np.ndarray], pad_id: int, batch_size: int
                     ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """`(positions in sequences, input_ids, attention_mask)`, longest first, so little padding."""
    order = np.argsort([-len(s) for s in sequences], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = right_pad([sequences[r] for r in rows], pad_id)
        yield rows, ids, mask


def encode_token_ids(model, sequences: Sequence[np.ndarray], pad_id: int,
                     batch_size: int = REFRESH_BATCH_SIZE) -> np.ndarray:
    """Dense vectors `(len(sequences), H)` float32 of ready token ids, in input order."""
    m3 = unwrap_m3(model)
    device = next(m3.parameters()).device
    out = np.zeros((len(sequences), m3.encoder.config.hidden_size), dtype=np.float32)
    with inference_mode(m3):
        for rows, ids, mask in token_id_batches(sequences, pad_id, batch_size):
            dense = m3.encode(ids.to(device), mask.to(device), with_sparse=False, with_colbert=False).dense
            out[rows] = dense.float().cpu().numpy()
    return out


def _select(pool: TrainingPool, row: int, top_indices, top_scores, positive_score, *, rank_range, negatives, seed,
            version, max_score_ratio, margin) -> tuple[list[int], int]:
    """`mining.select_negatives` for pool row `row`, seeded by (seed, REFRESH_STREAM, version, row id)."""
    rng = np.random.default_rng([seed, REFRESH_STREAM, version, int(pool.row_ids[row])])
    picked, dropped = select_negatives(top_indices, top_scores, pool.excluded[row], rank_range, negatives, rng,
                                       positive_score, max_score_ratio=max_score_ratio, margin=margin)
    return [c for c, _ in picked], dropped


def _new_counts() -> dict:
    return {"rows_with_fewer_negatives": 0, "rows_without_negatives": 0, "dropped_by_score": 0}


def _count(counts: dict, picked: list, dropped: int, negatives: int) -> None:
    counts["dropped_by_score"] += dropped
    counts["rows_with_fewer_negatives"] += len(picked) < negatives
    counts["rows_without_negatives"] += not picked


def mine_rows(pool: TrainingPool, rows: np.ndarray, query_vecs: np.ndarray, pool_vecs: np.ndarray, *,
              rank_range: tuple[int, int], negatives: int, seed: int, version: int,
              max_score_ratio: Optional[float] = None, margin: Optional[float] = None) -> tuple[np.ndarray, dict]:
    """Dense: `(chosen (len(rows), negatives) pool ids padded with -1, counts)` for the pool rows
    `rows` (their query vectors `query_vecs`), each searched in its own stream's part of `pool_vecs`."""
    chosen = np.full((len(rows), negatives), -1, dtype=np.int64)
    counts = _new_counts()
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
            local = np.where(indices[j] >= 0, indices[j] + lo, -1)
            picked, dropped = _select(pool, row, local, scores[j], positive_score, rank_range=rank_range,
                                      negatives=negatives, seed=seed, version=version,
                                      max_score_ratio=max_score_ratio, margin=margin)
            _count(counts, picked, dropped, negatives)
            chosen[i, :len(picked)] = picked
    return chosen, counts


# ---- heads other than dense: the pool stays sharded --------------------------------------------------
@dataclass
class QueryReps:
    """One chunk's query representations, every rank's share gathered, on the scoring device."""
    dense: torch.Tensor                 # (n, H)
    sparse_ids: Optional[torch.Tensor]  # (n, W) token ids of the query's nonzero weights, 0-padded
    sparse_weights: Optional[torch.Tensor]   # (n, W), 0 at padding
    colbert: Optional[torch.Tensor]     # (n, W-1, D), 0 at padding
    colbert_mask: Optional[torch.Tensor]     # (n, W-1) bool


def _uses(head: str) -> tuple[bool, bool]:
    """(sparse scores needed, ColBERT scores needed) for `head`."""
    return head in ("sparse", "ensemble"), head in ("colbert", "ensemble")


def encode_query_reps(model, sequences: Sequence[np.ndarray], pad_id: int, batch_size: int, head: str,
                      width: int) -> dict[str, np.ndarray]:
    """This rank's queries, as fixed-width numpy arrays (`width` ≥ the longest sequence) to gather."""
    m3 = unwrap_m3(model)
    device = next(m3.parameters()).device
    with_sparse, with_colbert = _uses(head)
    n, hidden = len(sequences), m3.encoder.config.hidden_size
    out = {"dense": np.zeros((n, hidden), dtype=np.float32)}
    if with_sparse:
        out["sparse_ids"] = np.zeros((n, width), dtype=np.int64)
        out["sparse_weights"] = np.zeros((n, width), dtype=np.float32)
    if with_colbert:
        out["colbert"] = np.zeros((n, width - 1, m3.colbert_linear.out_features), dtype=np.float32)
        out["colbert_mask"] = np.zeros((n, width - 1), dtype=np.uint8)
    with inference_mode(m3):
        for rows, ids, mask in token_id_batches(sequences, pad_id, batch_size):
            reps = m3.encode(ids.to(device), mask.to(device), with_sparse=with_sparse, with_colbert=with_colbert)
            out["dense"][rows] = reps.dense.float().cpu().numpy()
            if with_sparse:
                weights = reps.sparse.float()
                for j, r in enumerate(rows):
                    (nz,) = weights[j].nonzero(as_tuple=True)
                    out["sparse_ids"][r, :len(nz)] = nz.cpu().numpy()
                    out["sparse_weights"][r, :len(nz)] = weights[j, nz].cpu().numpy()
            if with_colbert:
                vecs = reps.colbert.float().cpu().numpy()
                out["colbert"][rows, :vecs.shape[1]] = vecs
                out["colbert_mask"][rows, :vecs.shape[1]] = reps.colbert_mask.cpu().numpy()
    return out


def gather_query_reps(model, sequences: Sequence[np.ndarray], pad_id: int, batch_size: int, head: str,
                      device) -> QueryReps:
    """Every rank encodes its 1/W of `sequences` (the same list on every rank); all of them, gathered."""
    lo, hi, size = my_shard(len(sequences))
    width = max(2, max(len(s) for s in sequences))
    local = encode_query_reps(model, sequences[lo:hi], pad_id, batch_size, head, width)
    full = {key: torch.from_numpy(gather_rows(value, len(sequences), size, device)).to(device)
            for key, value in local.items()}
    return QueryReps(full["dense"], full.get("sparse_ids"), full.get("sparse_weights"), full.get("colbert"),
                     full["colbert_mask"].bool() if "colbert_mask" in full else None)


def head_scores(head: str, q: QueryReps, reps, weights: Sequence[float] = INFERENCE_ENSEMBLE_WEIGHTS) -> torch.Tensor:
    """`(queries, passages)` inference scores of `head` (search.py's definitions) between gathered
    queries and an encoded passage batch `reps` (M3Reps)."""
    with_sparse, with_colbert = _uses(head)
    parts = {"dense": q.dense @ reps.dense.float().T} if head == "ensemble" else {}
    if with_sparse:
        columns = reps.sparse.float()[:, q.sparse_ids]                               # (b, n, W)
        parts["sparse"] = torch.einsum("bnw,nw->nb", columns, q.sparse_weights)
    if with_colbert:
        parts["colbert"] = colbert_maxsim(q.colbert, q.colbert_mask, reps.colbert.float(), reps.colbert_mask.bool(),
                                          padding="masked")
    if head != "ensemble":
        return parts[head]
    return ensemble_scores(parts["dense"], parts["sparse"], parts["colbert"], weights)


def sharded_top_k(model, pool: TrainingPool, rows: np.ndarray, query_sequences: Sequence[np.ndarray],
                  passage_sequences: dict[int, np.ndarray], *, head: str, k: int, pad_id: int, batch_size: int,
                  weights: Sequence[float] = INFERENCE_ENSEMBLE_WEIGHTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For `rows` (pool rows of one stream, the same on every rank) with their prepared queries:
    `(scores (n, k), pool ids (n, k) with -1 padding, lowest positive score (n,))` over the whole
    stream, from every rank's share of it (`passage_sequences`: this rank's pool ids of the stream ->
    prepared token ids). Collective: every rank calls it with the same rows and k."""
    m3 = unwrap_m3(model)
    device = next(m3.parameters()).device
    q = gather_query_reps(model, query_sequences, pad_id, batch_size, head, device)
    n = len(rows)
    top = RunningTopK(n, k, device)
    lowest_positive = torch.full((n,), float("inf"), device=device)
    # (row in chunk, pool id) of every positive: the scores the positive-aware filter compares with
    pos_rows = np.concatenate([np.full(len(pool.positives[r]), j) for j, r in enumerate(rows)]).astype(np.int64)
    pos_ids = np.concatenate([pool.positives[r] for r in rows]).astype(np.int64)
    local_ids = np.fromiter(passage_sequences, dtype=np.int64, count=len(passage_sequences))
    local_seqs = [passage_sequences[int(i)] for i in local_ids]
    with_sparse, with_colbert = _uses(head)
    with inference_mode(m3):
        for batch, ids, mask in token_id_batches(local_seqs, pad_id, batch_size):
            reps = m3.encode(ids.to(device), mask.to(device), with_sparse=with_sparse, with_colbert=with_colbert)
            scores = head_scores(head, q, reps, weights)
            pool_ids = local_ids[batch]
            top.update(scores, torch.as_tensor(pool_ids, device=device))
            column_of = {int(p): c for c, p in enumerate(pool_ids)}
            here = np.flatnonzero(np.isin(pos_ids, pool_ids))
            if len(here):
                cols = torch.as_tensor([column_of[int(p)] for p in pos_ids[here]], device=device)
                at = torch.as_tensor(pos_rows[here], device=device)
                lowest_positive.scatter_reduce_(0, at, scores[at, cols].float(), reduce="amin")
    # every rank's top-k (padded to k: a rank may hold fewer of the stream's passages), merged
    values = torch.full((n, k), float("-inf"), device=device)
    indices = torch.full((n, k), -1, dtype=torch.long, device=device)
    values[:, :top.values.shape[1]], indices[:, :top.indices.shape[1]] = top.values, top.indices
    merged_values, merged_indices = merge_top_k(torch.cat(gather_all(values), dim=1),
                                                torch.cat(gather_all(indices), dim=1), k)
    lowest = torch.stack(gather_all(lowest_positive)).amin(dim=0)
    return merged_values.cpu().numpy(), merged_indices.cpu().numpy(), lowest.cpu().numpy()


def mine_rows_sharded_pool(model, pool: TrainingPool, query_sequences: Sequence[np.ndarray],
                           passage_share: dict[int, np.ndarray], *, head: str, rank_range: tuple[int, int],
                           negatives: int, seed: int, version: int, pad_id: int, batch_size: int = REFRESH_BATCH_SIZE,
                           max_score_ratio: Optional[float] = None, margin: Optional[float] = None,
                           query_chunk: int = QUERY_CHUNK, weights: Sequence[float] = INFERENCE_ENSEMBLE_WEIGHTS
                           ) -> tuple[np.ndarray, dict]:
    """Sparse, ColBERT or ensemble: `(chosen (rows, negatives) pool ids padded with -1, counts)` for
    every pool row, the same on every rank (module doc). `query_sequences[r]` is row r's prepared
    query; `passage_share` maps this rank's pool ids to their prepared token ids."""
    chosen = np.full((len(pool.row_ids), negatives), -1, dtype=np.int64)
    counts = _new_counts()
    need_pos = max_score_ratio is not None or margin is not None
    for stream in np.unique(pool.row_streams):
        lo, hi = pool.stream_range(int(stream))
        stream_rows = np.flatnonzero(pool.row_streams == stream)
        share = {p: s for p, s in passage_share.items() if lo <= p < hi}
        for start in range(0, len(stream_rows), query_chunk):
            rows = stream_rows[start:start + query_chunk]
            k = min(hi - lo, rank_range[1] + max(len(pool.excluded[r]) for r in rows))
            if k <= 0:
                continue
            scores, indices, lowest = sharded_top_k(model, pool, rows, [query_sequences[r] for r in rows], share,
                                                    head=head, k=k, pad_id=pad_id, batch_size=batch_size,
                                                    weights=weights)
            for j, row in enumerate(rows):
                positive_score = float(lowest[j]) if need_pos else None
                picked, dropped = _select(pool, int(row), indices[j], scores[j], positive_score,
                                          rank_range=rank_range, negatives=negatives, seed=seed, version=version,
                                          max_score_ratio=max_score_ratio, margin=margin)
                _count(counts, picked, dropped, negatives)
                chosen[row, :len(picked)] = picked
    return chosen, counts
