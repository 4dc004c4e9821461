"""NegativeRefresh's sparse, ColBERT and ensemble mining (m3composer/retrieval/refresh.py): the pool
stays sharded over ranks, the queries' representations are gathered, and every rank's top-k is
merged. On the tiny model over real text (Python's `pydoc_data` topics, two streams):

* one process: each stream's top-k scores are those of the full query × passage score matrix
  computed directly (M3Model.encode of everything at once, BGE-M3's inference scores), and every
  returned pool id carries its own score there;
* two gloo ranks, each encoding half of the pool and of the queries, in chunks smaller than a
  stream: every rank ends with the same choice, and the merged top-k is the one-process top-k
  (scores to 1e-5, every id's one-process score equal to its merged score: the same list up to
  exact ties); chosen negatives are from the row's stream, never its positives or query.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from m3composer.data.negatives import TrainingPool
from m3composer.model.m3 import M3Model
from m3composer.model.scores import colbert_maxsim
from m3composer.padding import right_pad
from m3composer.retrieval.refresh import mine_rows_sharded_pool, sharded_top_k
from tests.test_distributed import WORLD, gloo_group, spawn_ranks

HEADS = ("sparse", "colbert", "ensemble")
ROWS = (7, 5)              # rows per stream; the query chunk (3) is smaller than both
CHUNK, BATCH, NEGATIVES, RANGE = 3, 4, 3, (2, 8)


def tiny_model() -> M3Model:
    """The tiny model with the same fresh heads in every process: ColBERT as drawn from seed 0, the
    sparse head weighing every token (a positive bias) by a varying amount (PyTorch's default
    init would weigh most tokens 0)."""
    from m3composer.assets.build import ensure_assets

    torch.manual_seed(0)
    model = M3Model.from_pretrained(ensure_assets(log=lambda *a: None)["tiny-xlmr"])
    with torch.no_grad():
        model.sparse_linear.weight.normal_(0.0, 0.05)
        model.sparse_linear.bias.fill_(0.2)
    return model


def topics_pool(tokenizer) -> TrainingPool:
    """Stream s: ROWS[s] rows (a topic's name -> its text) and two unrelated topics' texts per row
    as negatives; identical passages once; token ids truncated to 40."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    ids = lambda text: np.asarray(tokenizer(text, truncation=True, max_length=40)["input_ids"], dtype=np.int32)
    passages, stream_offsets, row_ids, row_streams, queries, positives = [], [0], [], [], [], []
    used = 0
    for s, n in enumerate(ROWS):
        names_here, extra = names[used:used + n], names[used + n:used + 2 * n]
        used += 2 * n
        start = len(passages)
        passages += [ids(" ".join(topics[t].split())[:400]) for t in names_here + extra]
        for j, name in enumerate(names_here):
            row_ids.append(100 * s + j)
            row_streams.append(s)
            queries.append(ids(f"python {name.replace('-', ' ')}"))
            positives.append(np.array([start + j], dtype=np.int64))
        stream_offsets.append(len(passages))
    return TrainingPool(passages, np.asarray(stream_offsets), np.asarray(row_ids), np.asarray(row_streams), queries,
                        positives, [frozenset(p.tolist()) for p in positives])


def mine_every_head(model: M3Model, pool: TrainingPool, share: range) -> dict:
    """Per head: the chosen negatives (with a margin filter on the ensemble) and each stream's top-k."""
    pad = model.tokenizer.pad_token_id
    passages = {p: pool.passages[p] for p in share}
    out = {}
    for head in HEADS:
        filters = {"margin": 0.05} if head == "ensemble" else {}
        chosen, counts = mine_rows_sharded_pool(model, pool, pool.queries, passages, head=head, rank_range=RANGE,
                                                negatives=NEGATIVES, seed=5, version=1, pad_id=pad,
                                                batch_size=BATCH, query_chunk=CHUNK, **filters)
        out[head] = {"chosen": torch.from_numpy(chosen), "counts": torch.tensor([counts[k] for k in sorted(counts)])}
        for s in range(len(ROWS)):
            lo, hi = pool.stream_range(s)
            rows = np.flatnonzero(pool.row_streams == s)
            scores, indices, lowest = sharded_top_k(
                model, pool, rows, [pool.queries[r] for r in rows], {p: q for p, q in passages.items() if lo <= p < hi},
                head=head, k=hi - lo, pad_id=pad, batch_size=BATCH)
            out[head][f"scores{s}"], out[head][f"indices{s}"] = torch.from_numpy(scores), torch.from_numpy(indices)
            out[head][f"lowest{s}"] = torch.from_numpy(lowest)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port):
        model = tiny_model()
        pool = topics_pool(model.tokenizer)
        size = -(-len(pool.passages) // WORLD)
        share = range(rank * size, min(len(pool.passages), (rank + 1) * size))
        torch.save(mine_every_head(model, pool, share), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    pool = topics_pool(model.tokenizer)
    return model, pool, mine_every_head(model, pool, range(len(pool.passages)))


def direct_scores(model: M3Model, pool: TrainingPool, s: int, head: str) -> np.ndarray:
    """The stream's full (rows, passages) inference-score matrix, everything encoded at once."""
    lo, hi = pool.stream_range(s)
    rows = np.flatnonzero(pool.row_streams == s)
    pad = model.tokenizer.pad_token_id
    model.eval()
    with torch.no_grad():
        q = model.encode(*right_pad([pool.queries[r] for r in rows], pad))
        p = model.encode(*right_pad(pool.passages[lo:hi], pad))
    dense = q.dense @ p.dense.T
    sparse = q.sparse @ p.sparse.T
    colbert = colbert_maxsim(q.colbert, q.colbert_mask.bool(), p.colbert, p.colbert_mask.bool())
    return {"sparse": sparse, "colbert": colbert, "ensemble": 0.4 * dense + 0.2 * sparse + 0.4 * colbert}[head].numpy()


@pytest.mark.parametrize("head", HEADS)
def test_one_process_top_k_is_the_full_score_matrix_top_k(setup, head):
    model, pool, result = setup
    for s in range(len(ROWS)):
        full = direct_scores(model, pool, s, head)
        lo, _ = pool.stream_range(s)
        scores, indices = result[head][f"scores{s}"].numpy(), result[head][f"indices{s}"].numpy()
        np.testing.assert_allclose(scores, -np.sort(-full, axis=1), rtol=1e-5, atol=1e-5)
        assert (indices >= lo).all() and sorted(indices[0].tolist()) == list(range(lo, lo + full.shape[1]))
        np.testing.assert_allclose(np.take_along_axis(full, indices - lo, axis=1), scores, rtol=1e-5, atol=1e-5)
        rows = np.flatnonzero(pool.row_streams == s)
        positives = [pool.positives[r][0] - lo for r in rows]
        np.testing.assert_allclose(result[head][f"lowest{s}"].numpy(), full[np.arange(len(rows)), positives],
                                   rtol=1e-5, atol=1e-5)
        assert np.ptp(full) > 1e-3                          # the scores are not all alike


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("refresh-heads"))


@pytest.mark.parametrize("head", HEADS)
def test_two_ranks_each_holding_half_the_pool_merge_to_the_one_process_result(setup, two_ranks, head):
    model, pool, alone = setup
    first, second = (r[head] for r in two_ranks)
    assert all(torch.equal(first[k], second[k]) for k in first)          # one result on every rank
    for s in range(len(ROWS)):
        scores, indices = first[f"scores{s}"].numpy(), first[f"indices{s}"].numpy()
        np.testing.assert_allclose(scores, alone[head][f"scores{s}"].numpy(), rtol=1e-5, atol=1e-5)
        full = direct_scores(model, pool, s, head)
        lo, _ = pool.stream_range(s)
        np.testing.assert_allclose(np.take_along_axis(full, indices - lo, axis=1), scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(first[f"lowest{s}"].numpy(), alone[head][f"lowest{s}"].numpy(), rtol=1e-5,
                                   atol=1e-5)
    chosen = first["chosen"].numpy()
    for r in range(len(pool.row_ids)):
        lo, hi = pool.stream_range(int(pool.row_streams[r]))
        picked = chosen[r][chosen[r] >= 0].tolist()
        assert all(lo <= c < hi and c not in pool.excluded[r] for c in picked) and len(set(picked)) == len(picked)
        if head != "ensemble":                             # no filter: the range holds enough candidates
            assert len(picked) == NEGATIVES
