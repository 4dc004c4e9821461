"""Exact search over a corpus with every M3 head at once: the engine behind `m3c eval` and `m3c mine`.

`search_top_k` (and `rank_corpus`, its rankings as document ids) encodes the queries once, then streams the corpus batch by batch and keeps, per head
and for the ensemble, only a running top-k `(queries, k)`: never a `(queries, documents)` matrix
nor the corpus' vectors. Scores are BGE-M3's inference scores (no temperature; docs/recipe.md
§Scores, §ColBERT max-sim variants), with the rules of `model/scores.py`:

    dense     <e_q, e_d>
    sparse    Σ over tokens shared by q and d of w_q[t] · w_d[t]  (per-token max weights)
    colbert   mean over the query's vectors of the max inner product with the document's vectors
              (`colbert_maxsim` with padding masked: document padding excluded, unlike training)
    ensemble  w_dense·dense + w_sparse·sparse + w_colbert·colbert  (`ensemble_scores`; BGE-M3's hybrid
              weights 0.4/0.2/0.4, `INFERENCE_ENSEMBLE_WEIGHTS`)

Ties are broken by corpus order (the lower document index ranks first), so rankings are
deterministic. Memory: the query side (dense `(Nq, H)`, sparse as a torch sparse matrix over the
query vocabulary, ColBERT `Nq × Lq × D` floats: about 1.3 GB for 10,000 queries of 32 tokens at
D = 1024) and one corpus batch (sparse `(batch, V)`, ColBERT `(batch, Lp, D)`). The ColBERT max-sim
is chunked to stay under `colbert_max_elements` floats per block.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from m3composer.model.inference import unwrap_m3
from m3composer.model.m3 import INFERENCE_BATCH_SIZE, INFERENCE_PASSAGE_MAX_LEN, INFERENCE_QUERY_MAX_LEN
from m3composer.model.scores import (COLBERT_MAX_ELEMENTS, HEADS, INFERENCE_ENSEMBLE_WEIGHTS, LexicalCost, M3Reps,
                                     colbert_maxsim, ensemble_scores, truncate_reps)
from m3composer.padding import right_pad
from m3composer.retrieval.beir import EvalSet

TOKENIZE_CHUNK = 4096                 # texts tokenised (and length-sorted) at a time on the corpus side


def token_batches(texts: Sequence[str], tokenizer, instruction: Optional[str], max_length: int,
                   batch_size: int, chunk_size: int = TOKENIZE_CHUNK) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """`(text indices, input_ids, attention_mask)` batches, right-padded; within each chunk of
    `chunk_size` texts the batches are sorted by length (less padding), so only one chunk of token
    ids is ever held."""
    prefix = instruction or ""
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(texts), chunk_size):
        chunk = [prefix + t for t in texts[start:start + chunk_size]]
        ids = tokenizer(chunk, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            input_ids, attention_mask = right_pad([ids[r] for r in rows], pad_id)
            yield [start + int(r) for r in rows], input_ids, attention_mask


class QuerySide:
    """All query representations, kept in encoding order (row r is query `order[r]`)."""

    def __init__(self, model, tokenizer, queries: Sequence[str], heads: Sequence[str], instruction: Optional[str],
                 max_length: int, batch_size: int, device, progress: bool,
                 lexical_cost: Optional[LexicalCost] = None):
        from tqdm.auto import tqdm

        self.order: list[int] = []
        dense, sparse_rows, sparse_cols, sparse_vals = [], [], [], []
        self.colbert_blocks: list[tuple[torch.Tensor, torch.Tensor]] = []   # (vecs (n, L, D), mask (n, L))
        with_sparse, with_colbert = "sparse" in heads, "colbert" in heads
        bar = tqdm(total=len(queries), desc="encode queries", unit="q", disable=not progress)
        for indices, input_ids, attention_mask in token_batches(queries, tokenizer, instruction, max_length,
                                                                 batch_size, chunk_size=max(len(queries), 1)):
            reps = model.encode(input_ids.to(device), attention_mask.to(device),
                                with_sparse=with_sparse, with_colbert=with_colbert)
            row0 = len(self.order)
            self.order.extend(indices)
            dense.append(reps.dense.float())
            if with_sparse:
                if lexical_cost is not None:
                    lexical_cost.add("query", reps.sparse)
                nz = reps.sparse.float().nonzero(as_tuple=True)
                sparse_rows.append(nz[0] + row0)
                sparse_cols.append(nz[1])
                sparse_vals.append(reps.sparse.float()[nz])
            if with_colbert:
                self.colbert_blocks.append((reps.colbert.float(), reps.colbert_mask.bool()))
            bar.update(len(indices))
        bar.close()
        self.dense = torch.cat(dense)
        self.sparse = None
        if with_sparse:
            rows, cols, vals = torch.cat(sparse_rows), torch.cat(sparse_cols), torch.cat(sparse_vals)
            # Only the vocabulary the queries use can score; documents are cut to these columns.
            self.vocab, compact_cols = torch.unique(cols, return_inverse=True)
            self.sparse = torch.sparse_coo_tensor(torch.stack([rows, compact_cols]), vals,
                                                  (len(self.order), len(self.vocab))).coalesce()

    def __len__(self) -> int:
        return len(self.order)


def merge_top_k(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `k` of `(n, m)` candidate scores and their document indices, per row, best first;
    equal scores go to the lower index (so merging lists in any order gives one result)."""
    by_index = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_score = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_score), indices.gather(1, by_score)


class RunningTopK:
    """Best `k` (score, document index) per query over corpus batches; ties go to the lower index."""

    def __init__(self, num_queries: int, k: int, device):
        self.k = k
        self.values = torch.empty((num_queries, 0), device=device)
        self.indices = torch.empty((num_queries, 0), dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, doc_indices: torch.Tensor) -> None:
        values = torch.cat([self.values, scores.float()], dim=1)
        indices = torch.cat([self.indices, doc_indices.expand(scores.shape[0], -1)], dim=1)
        self.values, self.indices = merge_top_k(values, indices, self.k)


def encode_dense(model, texts: Sequence[str], tokenizer, instruction: Optional[str], max_length: int,
                 batch_size: int, progress: bool = True, desc: str = "encode") -> np.ndarray:
    """Dense vectors `(len(texts), H)` float32 in text order (for an index library)."""
    from tqdm.auto import tqdm

    model = unwrap_m3(model)
    device = next(model.parameters()).device
    out = None
    with inference_mode(model), tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for indices, input_ids, attention_mask in token_batches(texts, tokenizer, instruction, max_length, batch_size):
            dense = model.encode(input_ids.to(device), attention_mask.to(device),
                                 with_sparse=False, with_colbert=False).dense.float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), dense.shape[1]), dtype=np.float32)
            out[indices] = dense
            bar.update(len(indices))
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def _cut(reps: M3Reps, dim: int, normalize: bool) -> M3Reps:
    """Dense and ColBERT vectors in fp32, cut to `dim` (both heads at one size: `m3c eval --dims`)."""
    colbert = None if reps.colbert is None else reps.colbert.float()
    return truncate_reps(M3Reps(dense=reps.dense.float(), colbert=colbert, colbert_mask=reps.colbert_mask),
                         dim, dim, normalize)


@contextmanager
def inference_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def rank_corpus(model, eval_set: EvalSet, *, top_k: int = 10, **kwargs) -> dict[str, dict[str, list[str]]]:
    """`{head: {query id: [top_k document ids, best first]}}` for each head and the ensemble
    (`search_top_k`'s keyword arguments)."""
    tops = search_top_k(model, eval_set.queries, eval_set.docs, top_k=top_k, **kwargs)
    rankings: dict[str, dict[str, list[str]]] = {}
    for head, (_, indices) in tops.items():
        rankings[head] = {query_id: [eval_set.doc_ids[i] for i in row]
                          for query_id, row in zip(eval_set.query_ids, indices.tolist())}
    return rankings


def search_top_k(model, queries: Sequence[str], docs: Sequence[str], *, tokenizer=None,
                 query_instruction: Optional[str] = None, passage_instruction: Optional[str] = None,
                 batch_size: int = INFERENCE_BATCH_SIZE, query_max_len: int = INFERENCE_QUERY_MAX_LEN, passage_max_len: int = INFERENCE_PASSAGE_MAX_LEN,
                 weights: Sequence[float] = INFERENCE_ENSEMBLE_WEIGHTS, heads: Sequence[str] = HEADS, top_k: int = 10,
                 progress: bool = True, colbert_max_elements: int = COLBERT_MAX_ELEMENTS,
                 lexical_cost: Optional[LexicalCost] = None, dims: Sequence[int] = ()
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{head: (scores (Nq, k), document indices (Nq, k))}`, rows in query order, best first, for
    each head and the ensemble; `k = min(top_k, len(docs))`.

    Instructions are used verbatim (None or "" = none). The ensemble is computed when two or more
    heads are evaluated, as the weighted sum of those heads' scores. `lexical_cost`, when given and the
    sparse head is searched, counts the non-zero lexical terms of every query and document.

    `dims`: Matryoshka sizes (docs/recipe.md §Matryoshka). For each d, the keys `dense@d`,
    `colbert@d` (those heads evaluated) and `ensemble@d` rank with the dense and ColBERT vectors cut to
    their first d dims and re-normalised (`truncate_reps`; a head of d dims or fewer stays whole);
    the sparse scores are the same at every size. The vectors are encoded once.
    """
    model = unwrap_m3(model)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ValueError("search_top_k needs a tokenizer (none attached to the model)")
    unknown = set(heads) - set(HEADS)
    if unknown or "dense" not in heads:
        raise ValueError(f"heads must include dense and come from {HEADS}, got {list(heads)}")
    heads = tuple(h for h in HEADS if h in heads)
    with_ensemble = len(heads) > 1
    device = next(model.parameters()).device
    top_k = min(top_k, len(docs))

    from tqdm.auto import tqdm

    with inference_mode(model):
        q = QuerySide(model, tokenizer, queries, heads, query_instruction, query_max_len,
                       batch_size, device, progress, lexical_cost)
        scored = heads + (("ensemble",) if with_ensemble else ())
        tops = {h: RunningTopK(len(q), top_k, device) for h in scored}
        # the query side cut to each size once: (dense, ColBERT blocks)
        cut_queries = {dim: (_cut(M3Reps(dense=q.dense), dim, model.normalize).dense,
                             [(_cut(M3Reps(dense=q.dense, colbert=vecs), dim, model.normalize).colbert, mask)
                              for vecs, mask in q.colbert_blocks]) for dim in dims}
        tops.update({f"{h}@{dim}": RunningTopK(len(q), top_k, device) for dim in dims for h in scored if h != "sparse"})
        bar = tqdm(total=len(docs), desc="encode corpus", unit="doc", disable=not progress)
        for indices, input_ids, attention_mask in token_batches(docs, tokenizer, passage_instruction,
                                                                 passage_max_len, batch_size):
            d = model.encode(input_ids.to(device), attention_mask.to(device),
                             with_sparse="sparse" in heads, with_colbert="colbert" in heads)
            doc_indices = torch.tensor(indices, dtype=torch.long, device=device)
            sparse = None
            if "sparse" in heads:
                if lexical_cost is not None:
                    lexical_cost.add("passage", d.sparse)
                d_cols = d.sparse.float()[:, q.vocab.to(device)]                    # (batch, |query vocab|)
                sparse = torch.sparse.mm(q.sparse, d_cols.T.contiguous())
            at_size = [("", q.dense, q.colbert_blocks, d)]
            at_size += [(f"@{dim}", q_dense, q_blocks, _cut(d, dim, model.normalize))
                        for dim, (q_dense, q_blocks) in cut_queries.items()]
            for suffix, q_dense, q_blocks, docs_at in at_size:
                scores = {"dense": q_dense @ docs_at.dense.float().T}
                if "colbert" in heads:
                    d_vecs, d_mask = docs_at.colbert.float(), docs_at.colbert_mask.bool()
                    scores["colbert"] = torch.cat([colbert_maxsim(vecs, mask, d_vecs, d_mask, padding="masked",
                                                                  max_elements=colbert_max_elements)
                                                   for vecs, mask in q_blocks])
                if with_ensemble:
                    scores["ensemble"] = ensemble_scores(scores["dense"], sparse, scores.get("colbert"), weights)
                if sparse is not None and not suffix:
                    scores["sparse"] = sparse
                for head, head_scores in scores.items():
                    tops[head + suffix].update(head_scores, doc_indices)
            bar.update(len(indices))
        bar.close()

    # back to query order (QuerySide encodes length-sorted)
    back = torch.empty(len(q), dtype=torch.long)
    back[torch.tensor(q.order, dtype=torch.long)] = torch.arange(len(q))
    return {head: (top.values.cpu()[back], top.indices.cpu()[back]) for head, top in tops.items()}
