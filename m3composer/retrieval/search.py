"""Search over a corpus with every M3 head at once: the engine behind `m3c eval` and `m3c mine`.
Exact by default; with `first_stage_k`, a first stage + re-rank (below, and docs/recipe.md §First
stage and re-rank) that ranks only each query's candidates with the same scores.

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

Re-rank (`_rerank_batches`): the corpus is encoded once with the dense and sparse heads into a faiss
index and an `InvertedIndex` (`first_stage.py`); each query's candidates are the union of its top K
of each; the candidate documents are then streamed through the same scoring as above, each batch
scored only for the queries that have a candidate in it and masked to their candidates.

Corpus store (`corpus_cache`, `corpus_store.py`): the documents' dense vectors and lexical weights
read from disk instead of encoded, for the re-rank's first stage and for exact search without ColBERT.

N ranks (`across_ranks`, docs/operations.md §Evaluate, mine and score on N ranks): each rank encodes
its share of the queries (gathered: `QuerySide.gather_ranks`) and of the corpus, and the ranks'
top-k lists are merged; every rank returns one process's result.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from m3composer.distributed import (gather_all, gather_rows, is_distributed, max_across_ranks, my_shard, rank, shard,
                                    sum_across_ranks, world_size)
from m3composer.model.inference import unwrap_m3
from m3composer.model.m3 import INFERENCE_BATCH_SIZE, INFERENCE_PASSAGE_MAX_LEN, INFERENCE_QUERY_MAX_LEN
from m3composer.model.scores import (COLBERT_MAX_ELEMENTS, HEADS, INFERENCE_ENSEMBLE_WEIGHTS, LexicalCost, M3Reps,
                                     colbert_maxsim, ensemble_scores, truncate_reps)
from m3composer.padding import right_pad
from m3composer.retrieval.beir import EvalSet
from m3composer.retrieval.corpus_store import CorpusCache, CorpusStore, count_passage_terms, store_settings
from m3composer.retrieval.first_stage import DenseIndex, InvertedIndex, concat_ranges

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
        self.with_colbert = with_colbert
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
        self.dense = torch.cat(dense) if dense else torch.zeros(0, model.encoder.config.hidden_size, device=device)
        self.sparse = None
        if with_sparse:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            self._set_sparse(*(torch.cat(x) if x else empty for x in (sparse_rows, sparse_cols)),
                             torch.cat(sparse_vals) if sparse_vals else empty.float())

    def _set_sparse(self, rows: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> None:
        # Only the vocabulary the queries use can score; documents are cut to these columns.
        self.vocab, compact_cols = torch.unique(tokens, return_inverse=True)
        self.sparse = torch.sparse_coo_tensor(torch.stack([rows, compact_cols]), values,
                                              (len(self.order), len(self.vocab))).coalesce()

    def __len__(self) -> int:
        return len(self.order)

    def gather_ranks(self, model, first: int, num_queries: int, size: int, batch_size: int) -> None:
        """Every rank's queries in place of this rank's own: each rank encoded its `distributed.shard`
        of the queries (`first`: its first query, `size`: the padded share). Rows in rank order, each
        rank's in its encoding order (`order` says which query a row is); the ColBERT vectors are
        zero-padded to the longest query of any rank (masked: the scores do not change) and held in
        blocks of `batch_size` rows. Collective."""
        device = self.dense.device
        local = len(self.order)
        self.order = gather_rows(np.asarray(self.order, dtype=np.int64) + first, num_queries, size, device).tolist()
        self.dense = torch.from_numpy(gather_rows(self.dense.cpu().numpy(), num_queries, size, device)).to(device)
        if self.sparse is not None:
            rows, cols = (x.cpu().numpy() for x in self.sparse.indices())    # coalesced: by row, then column
            counts = np.bincount(rows, minlength=local)
            at = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
            width = max_across_ranks(int(counts.max(initial=0)), device)
            tokens, values = np.zeros((local, width), dtype=np.int64), np.zeros((local, width), dtype=np.float32)
            tokens[rows, at] = self.vocab.cpu().numpy()[cols]
            values[rows, at] = self.sparse.values().cpu().numpy()
            counts, tokens, values = (gather_rows(x, num_queries, size, device) for x in (counts, tokens, values))
            kept = np.arange(width)[None, :] < counts[:, None]
            self._set_sparse(*(torch.from_numpy(x).to(device) for x in
                               (np.nonzero(kept)[0], tokens[kept], values[kept])))
        if self.with_colbert:
            longest = max_across_ranks(max((v.shape[1] for v, _ in self.colbert_blocks), default=0), device)
            vecs = np.zeros((local, longest, model.colbert_linear.out_features), dtype=np.float32)
            mask = np.zeros((local, longest), dtype=np.uint8)
            row = 0
            for block, block_mask in self.colbert_blocks:
                vecs[row:row + len(block), :block.shape[1]] = block.cpu().numpy()
                mask[row:row + len(block), :block.shape[1]] = block_mask.cpu().numpy()
                row += len(block)
            vecs, mask = (torch.from_numpy(gather_rows(x, num_queries, size, device)).to(device) for x in (vecs, mask))
            mask = mask.bool()
            self.colbert_blocks = [(vecs[b:b + batch_size], mask[b:b + batch_size])
                                   for b in range(0, num_queries, batch_size)]


def merge_top_k(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `k` of `(n, m)` candidate scores and their document indices, per row, best first;
    equal scores go to the lower index (so merging lists in any order gives one result)."""
    by_index = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_score = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_score), indices.gather(1, by_score)


class RunningTopK:
    """Best `k` (score, document index) per query over corpus batches; ties go to the lower index.
    Rows start as `k` entries of (-inf, -1): a query that sees fewer than `k` documents (a re-rank's
    candidates) keeps that padding at the end."""

    def __init__(self, num_queries: int, k: int, device):
        self.k = k
        self.values = torch.full((num_queries, k), float("-inf"), device=device)
        self.indices = torch.full((num_queries, k), -1, dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, doc_indices: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """Merge `scores (queries, batch)` of the documents `doc_indices`; `rows`: the query rows
        `scores` belongs to (default: all)."""
        kept = (self.values, self.indices) if rows is None else (self.values[rows], self.indices[rows])
        values = torch.cat([kept[0], scores.float()], dim=1)
        indices = torch.cat([kept[1], doc_indices.expand(scores.shape[0], -1)], dim=1)
        values, indices = merge_top_k(values, indices, self.k)
        if rows is None:
            self.values, self.indices = values, indices
        else:
            self.values[rows], self.indices[rows] = values, indices


def encode_dense(model, texts: Sequence[str], tokenizer, instruction: Optional[str], max_length: int,
                 batch_size: int, progress: bool = True, desc: str = "encode", across_ranks: bool = False) -> np.ndarray:
    """Dense vectors `(len(texts), H)` float32 in text order (for an index library). `across_ranks`
    (collective): each rank encodes its `distributed.shard` of the texts; every rank gets them all."""
    from tqdm.auto import tqdm

    model = unwrap_m3(model)
    device = next(model.parameters()).device
    first, last, size = my_shard(len(texts)) if across_ranks else (0, len(texts), len(texts))
    out = np.zeros((last - first, model.encoder.config.hidden_size), dtype=np.float32)
    with inference_mode(model), tqdm(total=last - first, desc=desc, unit="text", disable=not progress) as bar:
        for indices, input_ids, attention_mask in token_batches(texts[first:last], tokenizer, instruction, max_length,
                                                                batch_size):
            dense = model.encode(input_ids.to(device), attention_mask.to(device),
                                 with_sparse=False, with_colbert=False).dense.float().cpu().numpy()
            out[indices] = dense
            bar.update(len(indices))
    return gather_rows(out, len(texts), size, device) if across_ranks else out


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
    (`search_top_k`'s keyword arguments; a re-rank's list is shorter when a query has fewer candidates)."""
    tops = search_top_k(model, eval_set.queries, eval_set.docs, top_k=top_k, **kwargs)
    rankings: dict[str, dict[str, list[str]]] = {}
    for head, (_, indices) in tops.items():
        rankings[head] = {query_id: [eval_set.doc_ids[i] for i in row if i >= 0]
                          for query_id, row in zip(eval_set.query_ids, indices.tolist())}
    return rankings


def search_top_k(model, queries: Sequence[str], docs: Sequence[str], *, tokenizer=None,
                 query_instruction: Optional[str] = None, passage_instruction: Optional[str] = None,
                 batch_size: int = INFERENCE_BATCH_SIZE, query_max_len: int = INFERENCE_QUERY_MAX_LEN, passage_max_len: int = INFERENCE_PASSAGE_MAX_LEN,
                 weights: Sequence[float] = INFERENCE_ENSEMBLE_WEIGHTS, heads: Sequence[str] = HEADS, top_k: int = 10,
                 progress: bool = True, colbert_max_elements: int = COLBERT_MAX_ELEMENTS,
                 lexical_cost: Optional[LexicalCost] = None, dims: Sequence[int] = (),
                 first_stage_k: Optional[int] = None, dense_index: DenseIndex = DenseIndex(),
                 corpus_cache: Optional[CorpusCache] = None,
                 across_ranks: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{head: (scores (Nq, k), document indices (Nq, k))}`, rows in query order, best first, for
    each head and the ensemble; `k = min(top_k, len(docs))`.

    Instructions are used verbatim (None or "" = none). The ensemble is computed when two or more
    heads are evaluated, as the weighted sum of those heads' scores. `lexical_cost`, when given and the
    sparse head is searched, counts the non-zero lexical terms of every query and document.

    `dims`: Matryoshka sizes (docs/recipe.md §Matryoshka). For each d, the keys `dense@d`,
    `colbert@d` (those heads evaluated) and `ensemble@d` rank with the dense and ColBERT vectors cut to
    their first d dims and re-normalised (`truncate_reps`; a head of d dims or fewer stays whole);
    the sparse scores are the same at every size. The vectors are encoded once.

    `first_stage_k`: None = exact search (every document scored). A number K: first stage + re-rank
    (docs/recipe.md §First stage and re-rank): every head, at every size, ranks only the union of a
    query's top K by dense (`dense_index`) and, with the sparse head, by sparse (`InvertedIndex`),
    with the same scores as exact search; a query with fewer than `k` candidates is padded with
    (-inf, -1). K is raised to `top_k` when smaller. With K >= len(docs) the result is exact search's.

    `corpus_cache`: the documents' dense vectors and lexical weights come from an on-disk store
    (`corpus_store.py`, docs/recipe.md §Corpus store), encoded into it first where it lacks them: the
    re-rank's first stage always, and exact search without the ColBERT head (ColBERT vectors are not
    stored; with that head exact search encodes the corpus as without a cache).

    `across_ranks` (a collective: every rank calls it with the same arguments; docs/operations.md
    §Evaluate, mine and score on N ranks): each rank encodes its `distributed.shard` of the queries
    (then gathered: every rank holds every query's representations) and of the corpus (exact search:
    its documents; re-rank: its share of the first stage's vectors, gathered, then its share of the
    candidates), keeps a running top-k over its documents, and the top-k lists of every rank are
    merged (ties to the lower document, as on one process): every rank returns one process's result.
    The corpus store is shared among ranks as `CorpusCache.open` says. A no-op without several ranks.
    """
    model = unwrap_m3(model)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ValueError("search_top_k needs a tokenizer (none attached to the model)")
    unknown = set(heads) - set(HEADS)
    if unknown or "dense" not in heads:
        raise ValueError(f"heads must include dense and come from {HEADS}, got {list(heads)}")
    if first_stage_k is not None and first_stage_k < 1:
        raise ValueError(f"first_stage_k must be >= 1, got {first_stage_k}")
    heads = tuple(h for h in HEADS if h in heads)
    with_ensemble = len(heads) > 1
    device = next(model.parameters()).device
    top_k = min(top_k, len(docs))
    if corpus_cache is not None:
        corpus_cache.report = None              # set again when this search reads the store
    shared = across_ranks and is_distributed()
    encoding = dict(tokenizer=tokenizer, instruction=passage_instruction, max_length=passage_max_len,
                    batch_size=batch_size, with_sparse="sparse" in heads, progress=progress)

    with inference_mode(model):
        first, last, size = my_shard(len(queries)) if shared else (0, len(queries), len(queries))
        q = QuerySide(model, tokenizer, queries[first:last], heads, query_instruction, query_max_len,
                      batch_size, device, progress, lexical_cost)
        if shared:
            q.gather_ranks(model, first, len(queries), size, batch_size)
        scored = heads + (("ensemble",) if with_ensemble else ())
        tops = {h: RunningTopK(len(q), top_k, device) for h in scored}
        # the query side cut to each size once: (dense, ColBERT blocks)
        cut_queries = {dim: (_cut(M3Reps(dense=q.dense), dim, model.normalize).dense,
                             [(_cut(M3Reps(dense=q.dense, colbert=vecs), dim, model.normalize).colbert, mask)
                              for vecs, mask in q.colbert_blocks]) for dim in dims}
        tops.update({f"{h}@{dim}": RunningTopK(len(q), top_k, device) for dim in dims for h in scored if h != "sparse"})
        if first_stage_k is None and corpus_cache is not None and "colbert" not in heads:
            store = stored_corpus(model, docs, corpus_cache, across_ranks=shared, **encoding)
            own = range(*shard(store.num_shards, rank(), world_size())[:2]) if shared else None
            batches = ((indices, M3Reps(dense=dense, sparse=sparse), None, None)
                       for indices, dense, sparse in store.batches(batch_size, device, lexical_cost, own))
        elif first_stage_k is None:
            own_docs = np.arange(*my_shard(len(docs))[:2]) if shared else None
            batches = ((indices, d, None, None) for indices, d in encoded_batches(
                model, docs, with_colbert="colbert" in heads, lexical_cost=lexical_cost, desc="encode corpus",
                doc_indices=own_docs, **encoding))
        else:
            batches = _rerank_batches(model, q, docs, max(first_stage_k, top_k), dense_index, with_colbert="colbert" in heads,
                                      lexical_cost=lexical_cost, corpus_cache=corpus_cache, across_ranks=shared,
                                      **encoding)
        for indices, d, rows, mask in batches:
            doc_indices = torch.tensor(indices, dtype=torch.long, device=device)
            sparse = None
            if "sparse" in heads:
                d_cols = d.sparse.float()[:, q.vocab.to(device)]                    # (batch, |query vocab|)
                q_sparse = q.sparse if rows is None else q.sparse.index_select(0, rows)
                sparse = torch.sparse.mm(q_sparse, d_cols.T.contiguous())
            at_size = [("", q.dense, q.colbert_blocks, d)]
            at_size += [(f"@{dim}", q_dense, q_blocks, _cut(d, dim, model.normalize))
                        for dim, (q_dense, q_blocks) in cut_queries.items()]
            for suffix, q_dense, q_blocks, docs_at in at_size:
                if rows is not None:
                    q_dense, q_blocks = q_dense[rows], _block_rows(q_blocks, rows)
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
                    if mask is not None:
                        head_scores = head_scores.masked_fill(~mask, float("-inf"))
                    tops[head + suffix].update(head_scores, doc_indices, rows)

    if shared:          # every rank's top-k over its documents, merged
        for top in tops.values():
            top.values, top.indices = merge_top_k(torch.cat(gather_all(top.values), dim=1),
                                                  torch.cat(gather_all(top.indices), dim=1), top.k)
        if lexical_cost is not None:
            _sum_across_ranks(lexical_cost, model.vocab_size)
    # back to query order (QuerySide encodes length-sorted)
    back = torch.empty(len(q), dtype=torch.long)
    back[torch.tensor(q.order, dtype=torch.long)] = torch.arange(len(q))
    return {head: (top.values.cpu()[back], top.indices.cpu()[back]) for head, top in tops.items()}


def encoded_batches(model, docs: Sequence[str], *, tokenizer, instruction: Optional[str], max_length: int,
                    batch_size: int, with_sparse: bool, with_colbert: bool, progress: bool, desc: str,
                    lexical_cost: Optional[LexicalCost] = None, doc_indices: Optional[np.ndarray] = None
                    ) -> Iterator[tuple[list[int], M3Reps]]:
    """`(document indices, M3Reps)` per encoder batch of `docs` (of `docs[doc_indices]` when given:
    the indices are then `doc_indices`' values); `lexical_cost` counts the passages' lexical terms."""
    from tqdm.auto import tqdm

    texts = docs if doc_indices is None else [docs[i] for i in doc_indices]
    device = next(model.parameters()).device
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress) as bar:
        for indices, input_ids, attention_mask in token_batches(texts, tokenizer, instruction, max_length, batch_size):
            d = model.encode(input_ids.to(device), attention_mask.to(device),
                             with_sparse=with_sparse, with_colbert=with_colbert)
            if lexical_cost is not None and with_sparse:
                lexical_cost.add("passage", d.sparse)
            yield (indices if doc_indices is None else [int(doc_indices[i]) for i in indices]), d
            bar.update(len(indices))


def stored_corpus(model, docs: Sequence[str], corpus_cache: CorpusCache, *, tokenizer, instruction: Optional[str],
                  max_length: int, batch_size: int, with_sparse: bool, progress: bool,
                  across_ranks: bool = False) -> CorpusStore:
    """The store of `docs` under `corpus_cache` for this model and these settings (dense, and sparse
    with `with_sparse`), its missing shards encoded first (the model in eval mode; `across_ranks`:
    shared among the ranks, `CorpusCache.open`)."""
    settings = store_settings(model, tokenizer, docs, instruction=instruction, max_length=max_length,
                              with_sparse=with_sparse)

    def encode(doc_indices: np.ndarray):
        return encoded_batches(model, docs, tokenizer=tokenizer, instruction=instruction, max_length=max_length,
                               batch_size=batch_size, with_sparse=with_sparse, with_colbert=False, progress=progress,
                               desc="encode corpus into the store", doc_indices=doc_indices)
    with inference_mode(model):
        return corpus_cache.open(settings, encode, across_ranks)


def _sum_across_ranks(lexical_cost: LexicalCost, vocab_size: int) -> None:
    """`lexical_cost` of every rank's texts, in place of this rank's (each counted its own share). Collective."""
    for side in lexical_cost.SIDES:
        present = lexical_cost.present[side]
        present = sum_across_ranks(torch.zeros(vocab_size, dtype=torch.float64) if present is None else present)
        texts = int(sum_across_ranks(torch.tensor([lexical_cost.texts[side]])))
        lexical_cost.present[side], lexical_cost.texts[side] = (present if texts else None), texts


def _block_rows(blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """QuerySide's ColBERT blocks `(vecs, mask)` cut to the query rows `rows` (ascending), in row order."""
    out, start = [], 0
    for vecs, mask in blocks:
        local = rows[(rows >= start) & (rows < start + len(vecs))] - start
        if len(local):
            out.append((vecs[local], mask[local]))
        start += len(vecs)
    return out


def _kept_vectors(model, docs: Sequence[str], corpus_cache: Optional[CorpusCache], *, with_sparse: bool,
                  progress: bool, lexical_cost: Optional[LexicalCost], across_ranks: bool = False, **encoding
                  ) -> tuple[np.ndarray, Optional[InvertedIndex]]:
    """Every document's dense vector `(N, H)` and, with `with_sparse`, its lexical weights as an
    `InvertedIndex` (finished by the caller): read from the store with `corpus_cache`, else encoded.
    `across_ranks`: each rank encodes its share (and counts its share's lexical terms), every rank
    gets all of them."""
    num_docs = len(docs)
    inverted = InvertedIndex(num_docs, model.vocab_size) if with_sparse else None
    if corpus_cache is not None:
        store = stored_corpus(model, docs, corpus_cache, with_sparse=with_sparse, progress=progress,
                              across_ranks=across_ranks, **encoding)
        vocab_size = store.settings["vocab_size"]
        own = range(*shard(store.num_shards, rank(), world_size())[:2]) if across_ranks else range(store.num_shards)
        parts = []
        for shard_index, (start, arrays) in enumerate(store.shards()):
            parts.append(arrays["dense"])
            if inverted is not None:
                inverted.add_csr(start, arrays["sparse_indptr"], arrays["sparse_tokens"], arrays["sparse_weights"])
                if lexical_cost is not None and shard_index in own:
                    count_passage_terms(lexical_cost, arrays, vocab_size)
        return np.concatenate(parts), inverted
    first, last, size = my_shard(num_docs) if across_ranks else (0, num_docs, num_docs)
    dense = np.zeros((last - first, model.encoder.config.hidden_size), dtype=np.float32)
    for indices, d in encoded_batches(model, docs, with_sparse=with_sparse, with_colbert=False, progress=progress,
                                      lexical_cost=lexical_cost, desc="encode corpus",
                                      doc_indices=np.arange(first, last), **encoding):
        dense[np.asarray(indices) - first] = d.dense.float().cpu().numpy()
        if inverted is not None:
            inverted.add(indices, d.sparse)
    if across_ranks:
        device = next(model.parameters()).device
        dense = gather_rows(dense, num_docs, size, device)
        if inverted is not None:
            inverted.gather_ranks(device)
    return dense, inverted


def _rerank_batches(model, q: QuerySide, docs: Sequence[str], first_stage_k: int, dense_index: DenseIndex, *,
                    with_sparse: bool, with_colbert: bool, lexical_cost: Optional[LexicalCost], progress: bool,
                    corpus_cache: Optional[CorpusCache] = None, across_ranks: bool = False, **encoding
                    ) -> Iterator[tuple[list[int], M3Reps, Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """The batches a re-rank scores: `(document indices, M3Reps, query rows, (rows, batch) candidate
    mask)`, over the union of every query's first-stage candidates (rows and mask None where a batch
    concerns every query as a candidate of every document: exact search's computation).

    The corpus is encoded once with the dense and sparse heads, keeping every document's dense
    vector (`N × H` float32, plus the faiss index's own copy) and lexical weights (`InvertedIndex`,
    16 bytes per non-zero weight); ColBERT vectors are not kept. When ColBERT is scored the candidate
    documents are encoded a second time, all heads at once (so up to twice the encoder's work of
    exact search when the candidates cover the corpus); without ColBERT their kept vectors are
    scored. With `corpus_cache` the kept vectors are read from the store (`stored_corpus`). The
    ColBERT max-sim of a batch runs for every query with a candidate in it against the whole batch
    (then masked); candidates come in corpus order, so with K >= the corpus size the batches, and
    the scores, are exact search's. `across_ranks`: every rank holds every document's kept vectors
    (`_kept_vectors`) and computes the same candidates; it scores its `distributed.shard` of them.
    """
    device = next(model.parameters()).device
    num_docs = len(docs)
    if not num_docs:
        return
    dense, inverted = _kept_vectors(model, docs, corpus_cache, with_sparse=with_sparse, progress=progress,
                                    lexical_cost=lexical_cost, across_ranks=across_ranks, **encoding)
    k = min(first_stage_k, num_docs)
    _, dense_top = dense_index.search(q.dense.cpu().numpy(), dense, k)
    pair_rows = [np.repeat(np.arange(len(q)), k)]
    pair_docs = [dense_top.reshape(-1)]
    if inverted is not None:
        inverted.finish()
        indices = q.sparse.indices().cpu().numpy()                 # coalesced: by row, then column
        tokens, weights = q.vocab.cpu().numpy()[indices[1]], q.sparse.values().cpu().numpy()
        ptr = np.searchsorted(indices[0], np.arange(len(q) + 1))
        for row in range(len(q)):
            _, top = inverted.search(tokens[ptr[row]:ptr[row + 1]], weights[ptr[row]:ptr[row + 1]], k)
            pair_rows.append(np.full(len(top), row))
            pair_docs.append(top)
    # (query row, document) pairs, once each, sorted by document; faiss's -1 padding dropped
    keys = np.unique(np.concatenate(pair_docs).astype(np.int64) * len(q) + np.concatenate(pair_rows))
    keys = keys[keys >= 0]
    candidate_docs, candidate_rows = keys // len(q), keys % len(q)
    union, first = np.unique(candidate_docs, return_index=True)
    ptr = np.append(first, len(keys))
    own = union[slice(*my_shard(len(union))[:2])] if across_ranks else union

    if with_colbert:
        batches = encoded_batches(model, docs, with_sparse=with_sparse, with_colbert=True, progress=progress,
                                  desc="re-rank candidates", doc_indices=own, **encoding)
    else:
        step = encoding["batch_size"]
        batches = ((chunk.tolist(), M3Reps(dense=torch.from_numpy(dense[chunk]).to(device),
                                           sparse=None if inverted is None else inverted.rows(chunk).to(device)))
                   for chunk in (own[b:b + step] for b in range(0, len(own), step)))
    for indices, d in batches:
        at = np.searchsorted(union, indices)
        counts = ptr[at + 1] - ptr[at]
        rows_of_pairs = candidate_rows[concat_ranges(ptr[at], counts)]
        rows, inverse = np.unique(rows_of_pairs, return_inverse=True)
        mask = np.zeros((len(rows), len(indices)), dtype=bool)
        mask[inverse, np.repeat(np.arange(len(indices)), counts)] = True
        if mask.all() and len(rows) == len(q):
            yield indices, d, None, None
        else:
            yield indices, d, torch.from_numpy(rows).to(device), torch.from_numpy(mask).to(device)
