"""Retrieval evaluation of an M3 model per head and for the ensemble; the `m3c eval` command.

    m3c eval MODEL_DIR EVAL_PATH [--split test] [--heads dense,sparse,colbert] [--output metrics.json]

`EVAL_PATH` is a BEIR folder or a FlagEmbedding JSONL (`beir.load_eval_set`). Queries get the
query instruction and corpus texts the passage instruction; both default to what the model folder
records in `m3composer.json` (e5 models: `query: ` / `passage: `), flags override them.

Scores are BGE-M3's inference scores (no temperature; docs/recipe.md §Scores, §ColBERT max-sim variants):

    dense     <e_q, e_d>
    sparse    Σ over tokens shared by q and d of w_q[t] · w_d[t]  (per-token max weights)
    colbert   mean over the query's vectors of the max inner product with the document's vectors
              (document padding excluded)
    ensemble  w_dense·dense + w_sparse·sparse + w_colbert·colbert  (BGE-M3's hybrid weights 0.4/0.2/0.4)

Metrics (`metrics.py`): recall@k for each k, MRR and nDCG at the largest k. Ties are broken by
corpus order (the lower document index ranks first), so rankings are deterministic.

Memory: the corpus is encoded one batch at a time and scored against all queries at once; per
head only the running top-k `(queries, k)` is kept, never a `(queries, documents)` matrix nor the
corpus' vectors. What stays in memory is the corpus text (from the eval set), the query side
(dense `(Nq, H)`, sparse as a torch sparse matrix, ColBERT `Nq × Lq × D` floats: about 1.3 GB for
10,000 queries of 32 tokens at D = 1024), and one corpus batch (sparse `(batch, V)`, ColBERT
`(batch, Lp, D)`). The ColBERT max-sim is chunked over queries to stay under
`colbert_max_elements` floats per block.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from m3composer.retrieval.beir import EvalSet, load_eval_set
from m3composer.retrieval.metrics import mean_metrics, metric_names

log = logging.getLogger(__name__)

HEADS = ("dense", "sparse", "colbert")
DEFAULT_WEIGHTS = (0.4, 0.2, 0.4)     # (dense, sparse, colbert): BGE-M3's README hybrid weights
DEFAULT_K_VALUES = (1, 10)
COLBERT_BLOCK_ELEMENTS = 2 ** 25      # floats in one (queries × Lq × docs × Lp) max-sim block: 128 MiB
TOKENIZE_CHUNK = 4096                 # texts tokenised (and length-sorted) at a time on the corpus side


def unwrap_m3(obj):
    """The `M3Model` inside `obj`: itself, a DDP/FSDP `.module`, or a wrapper's `.m3` / `.model`."""
    from m3composer.model.m3 import M3Model

    seen = obj
    for _ in range(4):
        if isinstance(seen, M3Model):
            return seen
        for attr in ("module", "m3", "model"):
            inner = getattr(seen, attr, None)
            if isinstance(inner, torch.nn.Module):
                seen = inner
                break
        else:
            break
    raise TypeError(f"no M3Model found in {type(obj).__name__} (looked at .module, .m3, .model)")


def heads_in_folder(folder: str | os.PathLike) -> tuple[str, ...]:
    """The heads a model folder really has: all three when both head files exist, else dense only."""
    from m3composer.model.m3 import COLBERT_FILE, SPARSE_FILE

    folder = Path(folder)
    if (folder / COLBERT_FILE).is_file() and (folder / SPARSE_FILE).is_file():
        return HEADS
    return ("dense",)


# ---------------------------------------------------------------------------------------- encoding

def _token_batches(texts: Sequence[str], tokenizer, instruction: Optional[str], max_length: int,
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
            longest = max(len(ids[r]) for r in rows)
            input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, :len(ids[r])] = torch.tensor(ids[r], dtype=torch.long)
                attention_mask[i, :len(ids[r])] = 1
            yield [start + int(r) for r in rows], input_ids, attention_mask


class _QuerySide:
    """All query representations, kept in encoding order (row r is query `order[r]`)."""

    def __init__(self, model, tokenizer, queries: Sequence[str], heads: Sequence[str], instruction: Optional[str],
                 max_length: int, batch_size: int, device, progress: bool):
        from tqdm.auto import tqdm

        self.order: list[int] = []
        dense, sparse_rows, sparse_cols, sparse_vals = [], [], [], []
        self.colbert_blocks: list[tuple[torch.Tensor, torch.Tensor]] = []   # (vecs (n, L, D), mask (n, L))
        with_sparse, with_colbert = "sparse" in heads, "colbert" in heads
        bar = tqdm(total=len(queries), desc="encode queries", unit="q", disable=not progress)
        for indices, input_ids, attention_mask in _token_batches(queries, tokenizer, instruction, max_length,
                                                                 batch_size, chunk_size=max(len(queries), 1)):
            reps = model.encode(input_ids.to(device), attention_mask.to(device),
                                with_sparse=with_sparse, with_colbert=with_colbert)
            row0 = len(self.order)
            self.order.extend(indices)
            dense.append(reps.dense.float())
            if with_sparse:
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


def colbert_maxsim(q_vecs: torch.Tensor, q_mask: torch.Tensor, d_vecs: torch.Tensor, d_mask: torch.Tensor,
                   max_elements: int = COLBERT_BLOCK_ELEMENTS) -> torch.Tensor:
    """`(Nq, Lq, D) × (Nd, Ld, D) -> (Nq, Nd)`: mean over each query's vectors of the max over the
    document's vectors, padding excluded on both sides (BGE-M3's `colbert_score`). Chunked over
    queries so no block exceeds `max_elements` floats."""
    n_q, len_q = q_vecs.shape[:2]
    n_d, len_d = d_vecs.shape[:2]
    step = max(1, max_elements // max(1, len_q * n_d * len_d))
    pad = ~d_mask.bool()
    out = []
    for s in range(0, n_q, step):
        tokens = torch.einsum("qin,djn->qidj", q_vecs[s:s + step], d_vecs)
        best = tokens.masked_fill(pad[None, None], float("-inf")).amax(dim=-1)         # (q, Lq, Nd)
        mask = q_mask[s:s + step].to(best.dtype)
        best = torch.where(mask[..., None] > 0, best, torch.zeros_like(best))
        out.append(best.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1))
    return torch.cat(out)


class _RunningTopK:
    """Best `k` (score, document index) per query over corpus batches; ties go to the lower index."""

    def __init__(self, num_queries: int, k: int, device):
        self.k = k
        self.values = torch.empty((num_queries, 0), device=device)
        self.indices = torch.empty((num_queries, 0), dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, doc_indices: torch.Tensor) -> None:
        values = torch.cat([self.values, scores.float()], dim=1)
        indices = torch.cat([self.indices, doc_indices.expand(scores.shape[0], -1)], dim=1)
        # Sort by index, then stable-sort by score: equal scores stay in index order.
        by_index = indices.argsort(dim=1)
        values, indices = values.gather(1, by_index), indices.gather(1, by_index)
        by_score = values.argsort(dim=1, descending=True, stable=True)[:, :self.k]
        self.values, self.indices = values.gather(1, by_score), indices.gather(1, by_score)


@contextmanager
def _inference(model):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def rank_corpus(model, eval_set: EvalSet, *, tokenizer=None, query_instruction: Optional[str] = None,
                passage_instruction: Optional[str] = None, batch_size: int = 32, query_max_len: int = 64,
                passage_max_len: int = 512, weights: Sequence[float] = DEFAULT_WEIGHTS,
                heads: Sequence[str] = HEADS, top_k: int = 10, progress: bool = True,
                colbert_max_elements: int = COLBERT_BLOCK_ELEMENTS) -> dict[str, dict[str, list[str]]]:
    """`{head: {query id: [top_k document ids, best first]}}` for each head and the ensemble.

    Instructions are used verbatim (None or "" = none). The ensemble is computed when two or more
    heads are evaluated, as the weighted sum of those heads' scores.
    """
    model = unwrap_m3(model)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ValueError("rank_corpus needs a tokenizer (none attached to the model)")
    unknown = set(heads) - set(HEADS)
    if unknown or "dense" not in heads:
        raise ValueError(f"heads must include dense and come from {HEADS}, got {list(heads)}")
    heads = tuple(h for h in HEADS if h in heads)
    weight_of = dict(zip(HEADS, weights))
    with_ensemble = len(heads) > 1
    device = next(model.parameters()).device
    top_k = min(top_k, eval_set.num_docs)

    from tqdm.auto import tqdm

    with _inference(model):
        q = _QuerySide(model, tokenizer, eval_set.queries, heads, query_instruction, query_max_len,
                       batch_size, device, progress)
        tops = {h: _RunningTopK(len(q), top_k, device) for h in heads + (("ensemble",) if with_ensemble else ())}
        bar = tqdm(total=eval_set.num_docs, desc="encode corpus", unit="doc", disable=not progress)
        for indices, input_ids, attention_mask in _token_batches(eval_set.docs, tokenizer, passage_instruction,
                                                                 passage_max_len, batch_size):
            d = model.encode(input_ids.to(device), attention_mask.to(device),
                             with_sparse="sparse" in heads, with_colbert="colbert" in heads)
            doc_indices = torch.tensor(indices, dtype=torch.long, device=device)
            scores = {"dense": q.dense @ d.dense.float().T}
            if "sparse" in heads:
                d_cols = d.sparse.float()[:, q.vocab.to(device)]                    # (batch, |query vocab|)
                scores["sparse"] = torch.sparse.mm(q.sparse, d_cols.T.contiguous())
            if "colbert" in heads:
                d_vecs, d_mask = d.colbert.float(), d.colbert_mask.bool()
                scores["colbert"] = torch.cat([colbert_maxsim(vecs, mask, d_vecs, d_mask, colbert_max_elements)
                                               for vecs, mask in q.colbert_blocks])
            if with_ensemble:
                scores["ensemble"] = sum(weight_of[h] * scores[h] for h in heads)
            for head, head_scores in scores.items():
                tops[head].update(head_scores, doc_indices)
            bar.update(len(indices))
        bar.close()

    rankings: dict[str, dict[str, list[str]]] = {}
    for head, top in tops.items():
        indices = top.indices.cpu().tolist()
        rankings[head] = {eval_set.query_ids[q.order[row]]: [eval_set.doc_ids[i] for i in indices[row]]
                          for row in range(len(q))}
    return rankings


def evaluate_model(model, eval_set: EvalSet, *, tokenizer=None, query_instruction: Optional[str] = None,
                   passage_instruction: Optional[str] = None, batch_size: int = 32, query_max_len: int = 64,
                   passage_max_len: int = 512, weights: Sequence[float] = DEFAULT_WEIGHTS,
                   heads: Sequence[str] = HEADS, k_values: Sequence[int] = DEFAULT_K_VALUES,
                   progress: bool = False) -> dict:
    """Metrics per head and for the ensemble on `eval_set`.

    `model` is an `M3Model` or anything `unwrap_m3` opens (DDP, the Composer model). Instructions
    default (None) to the ones the model records; pass "" for none.

    Returns `{"dense": {"recall@1", "recall@10", "mrr@10", "ndcg@10"}, "sparse": ..., "colbert": ...,
    "ensemble": ..., "num_queries", "num_docs", "heads", "weights", "query_instruction",
    "passage_instruction", "seconds"}` (heads not evaluated are absent).
    """
    m3 = unwrap_m3(model)
    if query_instruction is None:
        query_instruction = m3.query_instruction or ""
    if passage_instruction is None:
        passage_instruction = m3.passage_instruction or ""
    if len(weights) != 3:
        raise ValueError(f"weights are (dense, sparse, colbert), got {list(weights)}")
    started = time.perf_counter()
    rankings = rank_corpus(m3, eval_set, tokenizer=tokenizer, query_instruction=query_instruction,
                           passage_instruction=passage_instruction, batch_size=batch_size,
                           query_max_len=query_max_len, passage_max_len=passage_max_len, weights=weights,
                           heads=heads, top_k=max(k_values), progress=progress)
    results: dict = {head: mean_metrics(ranked, eval_set.qrels, k_values) for head, ranked in rankings.items()}
    results.update(num_queries=eval_set.num_queries, num_docs=eval_set.num_docs,
                   heads=[h for h in HEADS if h in rankings], weights=dict(zip(HEADS, map(float, weights))),
                   query_instruction=query_instruction, passage_instruction=passage_instruction,
                   seconds=round(time.perf_counter() - started, 3))
    return results


def format_table(results: dict, k_values: Sequence[int] = DEFAULT_K_VALUES) -> str:
    """Rows dense/sparse/colbert/ensemble (those present), columns R@k…, MRR@K, nDCG@K."""
    names = metric_names(k_values)
    labels = [n.replace("recall@", "R@").replace("mrr@", "MRR@").replace("ndcg@", "nDCG@") for n in names]
    lines = [f"{'head':<10}" + "".join(f"{label:>9}" for label in labels)]
    for head in HEADS + ("ensemble",):
        if head in results:
            lines.append(f"{head:<10}" + "".join(f"{results[head][n]:>9.4f}" for n in names))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI

def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_weights(text: str) -> tuple[float, float, float]:
    try:
        weights = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be three numbers like 0.4,0.2,0.4, got {text!r}") from None
    if len(weights) != 3:
        raise argparse.ArgumentTypeError(f"weights are dense,sparse,colbert (three numbers), got {text!r}")
    return weights


def parse_heads(text: str) -> tuple[str, ...]:
    heads = tuple(h.strip() for h in text.split(",") if h.strip())
    if not heads or set(heads) - set(HEADS) or "dense" not in heads:
        raise argparse.ArgumentTypeError(f"heads: a comma list from {','.join(HEADS)} including dense, got {text!r}")
    return heads


def add_instruction_arguments(parser: argparse.ArgumentParser) -> None:
    """--query-instruction / --passage-instruction / --no-instructions (shared with score-teacher)."""
    parser.add_argument("--query-instruction", default=None,
                        help="prefix for queries (default: what the model folder records, e.g. 'query: ')")
    parser.add_argument("--passage-instruction", default=None,
                        help="prefix for passages (default: what the model folder records, e.g. 'passage: ')")
    parser.add_argument("--no-instructions", action="store_true", help="use no prefixes at all")


def instructions_from_args(args: argparse.Namespace) -> tuple[Optional[str], Optional[str]]:
    if args.no_instructions:
        return "", ""
    return args.query_instruction, args.passage_instruction


def load_model_for_inference(folder: str | os.PathLike, pooling: Optional[str] = None):
    """`M3Model.from_pretrained` without its fresh-heads warning when the folder has no heads (the
    caller reports those heads as skipped instead)."""
    from m3composer.model.m3 import M3Model

    m3_log = logging.getLogger("m3composer.model.m3")
    previous = m3_log.level
    if heads_in_folder(folder) != HEADS:
        m3_log.setLevel(logging.ERROR)
    try:
        return M3Model.from_pretrained(folder, pooling=pooling)
    finally:
        m3_log.setLevel(previous)


def add_encoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `m3c eval` and `m3c score-teacher`: how texts are prefixed, pooled, batched, cut."""
    add_instruction_arguments(parser)
    parser.add_argument("--pooling", choices=("cls", "mean"), default=None,
                        help="dense pooling (default: the folder's m3composer.json, else cls)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--query-max-len", type=int, default=64)
    parser.add_argument("--passage-max-len", type=int, default=512)
    parser.add_argument("--weights", type=parse_weights, default=DEFAULT_WEIGHTS,
                        help="ensemble weights dense,sparse,colbert (default: 0.4,0.2,0.4)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="model folder (m3composer / FlagEmbedding BGE-M3 layout, or a plain HF "
                                          "encoder), or asset:e5-small / asset:tiny-xlmr")
    parser.add_argument("eval_path", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or a query/pos JSONL")
    parser.add_argument("--split", default="test", help="qrels split of a BEIR folder (default: test)")
    add_encoding_arguments(parser)
    parser.add_argument("--heads", type=parse_heads, default=HEADS, help="heads to evaluate (default: all three)")
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N queries")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here ('-' = stdout)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from m3composer.assets.build import resolve_model_dir
    try:
        args.model_dir = resolve_model_dir(args.model_dir)
        eval_set = load_eval_set(args.eval_path, split=args.split).first_queries(args.max_queries)
    except (OSError, ValueError) as err:
        print(f"m3c eval: error: {err}", file=sys.stderr)
        return 2
    for note in eval_set.notes:
        print(f"[eval] note: {note}", file=sys.stderr)
    available = heads_in_folder(args.model_dir)
    heads = tuple(h for h in args.heads if h in available)
    skipped = [h for h in args.heads if h not in available]
    if skipped:
        print(f"[eval] {args.model_dir} has no colbert_linear.pt/sparse_linear.pt: "
              f"skipping the {' and '.join(skipped)} head(s) and the ensemble", file=sys.stderr)
    model = load_model_for_inference(args.model_dir, pooling=args.pooling)
    query_instruction, passage_instruction = instructions_from_args(args)
    results = evaluate_model(model, eval_set, query_instruction=query_instruction,
                             passage_instruction=passage_instruction, batch_size=args.batch_size,
                             query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
                             weights=args.weights, heads=heads, progress=not args.no_progress)
    results["model"] = str(args.model_dir)
    results["eval_set"] = str(args.eval_path)
    results["skipped_heads"] = skipped
    print(f"[eval] {args.model_dir} on {args.eval_path}: {results['num_queries']} queries, "
          f"{results['num_docs']} documents, instructions q={results['query_instruction']!r} "
          f"p={results['passage_instruction']!r}, {results['seconds']:.1f} s")
    print(format_table(results))
    if args.output == "-":
        print(json.dumps(results, indent=2))
    elif args.output:
        _write_json_atomic(Path(args.output), results)
        print(f"[eval] wrote {args.output}")
    return 0
