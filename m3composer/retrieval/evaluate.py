"""Retrieval metrics of an M3 model per head and for the ensemble; the `m3c eval` command.

    m3c eval MODEL_DIR EVAL_PATH [--split test] [--heads dense,sparse,colbert] [--dims 64,128]
             [--sparse-threshold 0.01] [--search exact|rerank [--first-stage-k 100] [--index ...] [--agreement]]
             [--corpus-cache DIR] [--output metrics.json]

`EVAL_PATH` is a BEIR folder or a FlagEmbedding JSONL (`beir.load_eval_set`). Queries get the
query instruction and corpus texts the passage instruction; both default to what the model folder
records in `m3composer.json` (e5 models: `query: ` / `passage: `), flags override them. The search
itself is `search.rank_corpus`; the metrics are `metrics.py`'s: recall@k for each k, MRR and nDCG
at the largest k. With the sparse head it also reports the lexical vectors' non-zero terms per
query and per passage and the expected cost of a sparse dot product (docs/recipe.md §Sparsity
control). With Matryoshka sizes (`--dims`; default: the sizes the folder's `m3composer.json`
records, docs/recipe.md §Matryoshka) every head is also evaluated with its dense and ColBERT vectors
cut to each size, under the result's `dims` key. `--search rerank` ranks with a first stage and a
re-rank instead of exact search (docs/recipe.md §First stage and re-rank); `--agreement` also runs
exact search and reports, per head, the recall of its top-10 among the re-ranked top-10.
`--corpus-cache DIR` reads the corpus' dense and sparse vectors from an on-disk store, written on the
first run (`corpus_store.py`, docs/recipe.md §Corpus store).

Under a launcher (`composer -n N -m m3composer.cli eval …`, torchrun) each rank encodes 1/N of the
queries and the corpus and rank 0 alone prints and writes the results (docs/operations.md §Evaluate,
mine and score on N ranks).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from m3composer.distributed import launched_process_group, rank, world_size
from m3composer.fsutil import write_json_atomic
from m3composer.model.folder_config import M3FolderConfig
from m3composer.model.inference import load_model_for_inference, missing_heads, unwrap_m3
from m3composer.model.m3 import INFERENCE_BATCH_SIZE, INFERENCE_PASSAGE_MAX_LEN, INFERENCE_QUERY_MAX_LEN
from m3composer.model.scores import HEADS, INFERENCE_ENSEMBLE_WEIGHTS, SCORE_NAMES, LexicalCost
from m3composer.retrieval.beir import EvalSet, load_eval_set
from m3composer.retrieval.cli_args import (add_encoding_arguments, add_search_arguments, corpus_cache_from_args,
                                           instructions_from_args, parse_heads, search_from_args)
from m3composer.retrieval.corpus_store import CorpusCache, describe
from m3composer.retrieval.first_stage import AGREEMENT_DEPTH, DenseIndex, agreement
from m3composer.retrieval.metrics import mean_metrics, metric_names, per_query_metrics
from m3composer.retrieval.search import rank_corpus

DEFAULT_K_VALUES = (1, 10)


def evaluate_model(model, eval_set: EvalSet, *, tokenizer=None, query_instruction: Optional[str] = None,
                   passage_instruction: Optional[str] = None, batch_size: int = INFERENCE_BATCH_SIZE, query_max_len: int = INFERENCE_QUERY_MAX_LEN,
                   passage_max_len: int = INFERENCE_PASSAGE_MAX_LEN, weights: Sequence[float] = INFERENCE_ENSEMBLE_WEIGHTS,
                   heads: Sequence[str] = HEADS, k_values: Sequence[int] = DEFAULT_K_VALUES,
                   progress: bool = False, per_query: bool = False, dims: Sequence[int] = (),
                   first_stage_k: Optional[int] = None, dense_index: DenseIndex = DenseIndex(),
                   with_agreement: bool = False, corpus_cache: Optional[CorpusCache] = None,
                   across_ranks: bool = False) -> dict:
    """Metrics per head and for the ensemble on `eval_set`.

    `model` is an `M3Model` or anything `unwrap_m3` opens (DDP, the Composer model). Instructions
    default (None) to the ones the model records; pass "" for none.

    Returns `{"dense": {"recall@1", "recall@10", "mrr@10", "ndcg@10"}, "sparse": ..., "colbert": ...,
    "ensemble": ..., "num_queries", "num_docs", "heads", "weights", "query_instruction",
    "passage_instruction", "sparse_threshold", "seconds"}` (heads not evaluated are absent), and
    with the sparse head `"sparse_cost": {"nonzero_per_query", "nonzero_per_passage",
    "expected_flops"}` (`scores.LexicalCost`: the lexical vectors' non-zero terms and the expected
    cost of a sparse dot product, on this set, after `model.sparse_threshold`); with `per_query`, also
    `"per_query": {head: {query id: metrics}}`, what `m3c compare` needs for paired intervals.

    `dims`: Matryoshka sizes; for each d, `"dims": {"d": {head: metrics}}` with the dense and ColBERT
    vectors cut to d and re-normalised, the ensemble over them, and the sparse head's full-size metrics
    (it is not cut); per-query rows (with `per_query`) under `"dense@d"`, `"colbert@d"`, `"ensemble@d"`.
    The full-size results stay where they are.

    `first_stage_k` None: exact search; K: first stage + re-rank (`search.search_top_k`), and
    `"search": {"mode", "first_stage_k", "index"}` says which. `with_agreement` (re-rank only) also
    runs exact search: `"agreement": {head: recall of the exact top-10 among the re-ranked top-10}`
    (`first_stage.agreement`, mean over queries; every key of the rankings, `dense@d` too) and
    `"search"["exact_seconds"]`, its time (`"seconds"` is the re-rank's; the exact search does not
    use `corpus_cache`).

    `corpus_cache`: the corpus' dense and sparse vectors from an on-disk store (`search.search_top_k`);
    `"corpus_cache": {"dir", "bytes", "reused", "shards_encoded", "shards_reused", "seconds"}` says
    which store, its size, and whether this run read it without encoding a passage (`"used": false`
    and why where the search could not use it).

    `across_ranks`: a collective; every rank encodes its share of the queries and the corpus and
    returns the same results (`search.search_top_k`; docs/operations.md §Evaluate, mine and score on N ranks).
    """
    m3 = unwrap_m3(model)
    if query_instruction is None:
        query_instruction = m3.query_instruction or ""
    if passage_instruction is None:
        passage_instruction = m3.passage_instruction or ""
    if len(weights) != 3:
        raise ValueError(f"weights are (dense, sparse, colbert), got {list(weights)}")
    if with_agreement and first_stage_k is None:
        raise ValueError("the agreement with exact search needs a re-rank (first_stage_k)")
    started = time.perf_counter()
    lexical_cost = LexicalCost() if "sparse" in heads else None
    search = dict(tokenizer=tokenizer, query_instruction=query_instruction, passage_instruction=passage_instruction,
                  batch_size=batch_size, query_max_len=query_max_len, passage_max_len=passage_max_len,
                  weights=weights, heads=heads, top_k=max(max(k_values), AGREEMENT_DEPTH if with_agreement else 0),
                  progress=progress, dims=dims, across_ranks=across_ranks)
    rankings = rank_corpus(m3, eval_set, lexical_cost=lexical_cost, first_stage_k=first_stage_k,
                           dense_index=dense_index, corpus_cache=corpus_cache, **search)
    metrics = {head: mean_metrics(ranked, eval_set.qrels, k_values) for head, ranked in rankings.items()}
    results: dict = {head: value for head, value in metrics.items() if "@" not in head}
    if lexical_cost is not None:
        results["sparse_cost"] = lexical_cost.summary()
    if dims:
        results["dims"] = {str(dim): {head: metrics[f"{head}@{dim}"] if f"{head}@{dim}" in metrics else metrics[head]
                                      for head in SCORE_NAMES if head in metrics} for dim in dims}
    if per_query:
        results["per_query"] = {head: per_query_metrics(ranked, eval_set.qrels, k_values)
                                for head, ranked in rankings.items()}
    seconds = round(time.perf_counter() - started, 3)
    results["search"] = ({"mode": "exact"} if first_stage_k is None else
                         {"mode": "rerank", "first_stage_k": max(first_stage_k, search["top_k"]),
                          "index": dense_index.kind_for(eval_set.num_docs)})
    if corpus_cache is not None:
        results["corpus_cache"] = (dict(corpus_cache.report, used=True) if corpus_cache.report is not None else
                                   {"dir": str(corpus_cache.root), "used": False,
                                    "why": "exact search with the ColBERT head encodes the corpus (ColBERT vectors "
                                           "are not stored)"})
    if with_agreement:
        exact_started = time.perf_counter()
        results["agreement"] = agreement(rank_corpus(m3, eval_set, **search), rankings)
        results["search"]["exact_seconds"] = round(time.perf_counter() - exact_started, 3)
    results.update(num_queries=eval_set.num_queries, num_docs=eval_set.num_docs,
                   heads=[h for h in HEADS if h in rankings], weights=dict(zip(HEADS, map(float, weights))),
                   query_instruction=query_instruction, passage_instruction=passage_instruction,
                   sparse_threshold=float(m3.sparse_threshold),
                   seconds=seconds)
    return results


def format_table(results: dict, k_values: Sequence[int] = DEFAULT_K_VALUES) -> str:
    """Rows dense/sparse/colbert/ensemble (those present), columns R@k…, MRR@K, nDCG@K."""
    names = metric_names(k_values)
    labels = [n.replace("recall@", "R@").replace("mrr@", "MRR@").replace("ndcg@", "nDCG@") for n in names]
    lines = [f"{'head':<10}" + "".join(f"{label:>9}" for label in labels)]
    for head in SCORE_NAMES:
        if head in results:
            lines.append(f"{head:<10}" + "".join(f"{results[head][n]:>9.4f}" for n in names))
    for dim, at in results.get("dims", {}).items():
        lines += [f"{head + '@' + dim:<10}" + "".join(f"{at[head][n]:>9.4f}" for n in names)
                  for head in SCORE_NAMES if head in at and head != "sparse"]
    if "agreement" in results:
        lines.append(f"agreement with exact search (recall of its top-{AGREEMENT_DEPTH} in the re-ranked "
                     f"top-{AGREEMENT_DEPTH}): " + ", ".join(f"{head} {value:.4f}"
                                                            for head, value in results["agreement"].items()))
    if "sparse_cost" in results:
        cost = results["sparse_cost"]
        lines.append(f"sparse: {cost['nonzero_per_query']:.1f} non-zero terms per query, "
                     f"{cost['nonzero_per_passage']:.1f} per passage, expected dot-product cost "
                     f"{cost['expected_flops']:.3f} (threshold {results.get('sparse_threshold', 0.0):g})")
    return "\n".join(lines)


def parse_dims(text: str) -> tuple[int, ...]:
    """`--dims 64,128` -> (128, 64), largest first; `""` or `none` -> () (full sizes only)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        dims = tuple(sorted({int(d) for d in text.split(",") if d.strip()}, reverse=True))
    except ValueError:
        dims = (0,)
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"dims: a comma list of positive sizes (or none), got {text!r}")
    return dims


def recorded_dims(model_dir) -> tuple[int, ...]:
    """The Matryoshka sizes a folder's `m3composer.json` records (dense and ColBERT together), largest first."""
    recorded = M3FolderConfig.from_folder(model_dir).matryoshka or {}
    return tuple(sorted(set(recorded.get("dense_dims", [])) | set(recorded.get("colbert_dims", [])), reverse=True))


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="model folder (m3composer / FlagEmbedding BGE-M3 layout, or a plain HF "
                                          "encoder), or asset:e5-small / asset:tiny-xlmr")
    parser.add_argument("eval_path", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or a query/pos JSONL")
    parser.add_argument("--split", default="test", help="qrels split of a BEIR folder (default: test)")
    add_encoding_arguments(parser)
    parser.add_argument("--heads", type=parse_heads, default=HEADS, help="heads to evaluate (default: all three)")
    parser.add_argument("--sparse-threshold", type=float, default=None,
                        help="drop lexical weights below this (default: what the folder's m3composer.json records, "
                             "else 0 = keep every positive weight)")
    parser.add_argument("--dims", type=parse_dims, default=None,
                        help="Matryoshka sizes: also evaluate every head with the dense and ColBERT vectors cut to "
                             "each (e.g. 64,128; 'none' = full sizes only; default: the sizes the folder records)")
    add_search_arguments(parser)
    parser.add_argument("--agreement", action="store_true",
                        help=f"with --search rerank: also run exact search and report, per head, the recall of its "
                             f"top-{AGREEMENT_DEPTH} among the re-ranked top-{AGREEMENT_DEPTH}")
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N queries")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here ('-' = stdout)")
    parser.add_argument("--per-query", action="store_true",
                        help="also write every query's metrics into --output (for `m3c compare`)")
    # Default: bars when a person watches (stderr is a terminal), none in logs and CI.
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: only when stderr is a terminal)")


def show_progress(flag: Optional[bool]) -> bool:
    """`--progress` / `--no-progress` as given; unset: whether stderr (where tqdm draws) is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def run(args: argparse.Namespace) -> int:
    with launched_process_group(args.device) as across_ranks:
        return _run(args, across_ranks)


def _run(args: argparse.Namespace, across_ranks: bool) -> int:
    if args.agreement and args.search != "rerank":
        print("m3c eval: error: --agreement compares a re-rank with exact search: add --search rerank", file=sys.stderr)
        return 2
    try:
        eval_set = load_eval_set(args.eval_path, split=args.split).first_queries(args.max_queries)
    except (OSError, ValueError) as err:
        print(f"m3c eval: error: {err}", file=sys.stderr)
        return 2
    for note in eval_set.notes:
        print(f"[eval] note: {note}", file=sys.stderr)
    missing = missing_heads(args.model_dir)
    heads = tuple(h for h in args.heads if h not in missing)
    skipped = [h for h in args.heads if h in missing]
    for reason in dict.fromkeys(missing[h] for h in skipped):
        names = [h for h in skipped if missing[h] == reason]
        print(f"[eval] {args.model_dir}: {reason}: skipping the {' and '.join(names)} head(s)"
              + (" and the ensemble" if len(heads) < 2 else f"; the ensemble is over {' and '.join(heads)}"),
              file=sys.stderr)
    model = load_model_for_inference(args.model_dir, pooling=args.pooling, device=args.device)
    if args.sparse_threshold is not None:
        if args.sparse_threshold < 0:
            print(f"m3c eval: error: --sparse-threshold must be >= 0, got {args.sparse_threshold}", file=sys.stderr)
            return 2
        model.sparse_threshold = args.sparse_threshold
    query_instruction, passage_instruction = instructions_from_args(args)
    first_stage_k, dense_index = search_from_args(args)
    results = evaluate_model(model, eval_set, query_instruction=query_instruction,
                             passage_instruction=passage_instruction, batch_size=args.batch_size,
                             query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
                             weights=args.weights, heads=heads, progress=show_progress(args.progress) and rank() == 0,
                             per_query=args.per_query, first_stage_k=first_stage_k, dense_index=dense_index,
                             with_agreement=args.agreement, corpus_cache=corpus_cache_from_args(args),
                             dims=recorded_dims(args.model_dir) if args.dims is None else args.dims,
                             across_ranks=across_ranks)
    if rank() != 0:         # every rank holds the results; rank 0 alone reports and writes them
        return 0
    results["model"] = str(args.model_dir)
    results["eval_set"] = str(args.eval_path)
    results["skipped_heads"] = skipped
    results["world_size"] = world_size()       # the ranks that shared the encoding (1: one process)
    # the heads its training run trained (loss.heads), for the quickstart's comparison; None: not recorded
    results["trained_heads"] = M3FolderConfig.from_folder(args.model_dir).trained_heads
    print(f"[eval] {args.model_dir} on {args.eval_path}: {results['num_queries']} queries, "
          f"{results['num_docs']} documents, instructions q={results['query_instruction']!r} "
          f"p={results['passage_instruction']!r}, {results['seconds']:.1f} s")
    print(format_table(results))
    if "corpus_cache" in results:
        cache = results["corpus_cache"]
        print("[eval] " + (describe(cache) if cache["used"] else f"corpus store {cache['dir']} not used: {cache['why']}"))
    if args.output == "-":
        print(json.dumps(results, indent=2))
    elif args.output:
        write_json_atomic(Path(args.output), results)
        print(f"[eval] wrote {args.output}")
    return 0
