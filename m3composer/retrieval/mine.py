"""Hard-negative mining: the `m3c mine` command.

    m3c mine IN.jsonl OUT.jsonl --model DIR|asset:NAME [--corpus CORPUS.jsonl|DIR]
             --head dense|sparse|colbert|ensemble --range 10-100 --negatives 7
             [--max-score-ratio 0.95] [--margin M] [--exclude-positives-of-query] [--scores]

For every FlagEmbedding row (`query`, `pos`, `neg`, any other fields):

1. the candidate pool is every positive and negative text of the input, or `--corpus` (a BEIR
   folder or a JSONL of `{"title"?, "text"}`), identical texts merged (first appearance order);
2. the query's top `range end + excluded` candidates are retrieved with the chosen head (raw
   BGE-M3 inference scores, no temperature: `search.py`'s definitions);
3. excluded: the row's own positives, the query text itself, and with
   `--exclude-positives-of-query` every positive the same query text has on any line (data with
   one (query, positive) pair per line); ranks are counted after these exclusions, 1-based;
4. the candidates at ranks `--range A-B` (inclusive) are kept unless they score above
   `ratio · s_pos` (`--max-score-ratio`, NV-Retriever's positive-aware filter) or above
   `s_pos − margin` (`--margin`), with `s_pos` the lowest score of the row's positives;
5. `--negatives N` of the kept ones are drawn uniformly without replacement (seeded by `--seed`
   and the line number, so a rerun gives the same file) and written in rank order as `neg`.

Every input field is kept and `neg` is replaced; with `--scores` `pos_scores`/`neg_scores` of the
same head are written (for `loss.knowledge_distillation`; `--scale` as in `m3c score-teacher`),
without it a row's old `pos_scores`/`neg_scores` are removed (they scored the old negatives) and
counted.
A row with fewer than N candidates left keeps what is left (maybe none) and is counted in the
summary; no row is dropped. Bad lines stop the run with `file:line: reason` (the checks of
`m3c convert`); the output is written to a temporary name and renamed.

Search: dense uses faiss (`first_stage.DenseIndex`, `--index`: `IndexFlatIP`, exact, up to
`HNSW_MIN_POOL` passages; above it `IndexHNSWFlat`, approximate; or IVF), with either `--search`;
sparse, ColBERT and the ensemble use `search.py`: exact brute force (every query against every
passage, the pool encoded once; cost in BENCHMARKS.md §Mining) or, with `--search rerank`, a first
stage (dense by faiss, sparse by an inverted index; top `--first-stage-k`, at least the ranks
needed) re-ranked by the head (docs/recipe.md §First stage and re-rank). Steps 3-5 are
`mining.select_negatives`, the rule NegativeRefresh uses too; this module is the command around it.
`--corpus-cache DIR`: the pool's dense (and, for the other heads, sparse) vectors come from an on-disk
store written on the first run (`corpus_store.py`, docs/recipe.md §Corpus store).
Under a launcher (`composer -n N -m m3composer.cli mine …`, torchrun) each rank encodes 1/N of the
queries and the pool and rank 0 alone writes the output (docs/operations.md §Evaluate, mine and
score on N ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from m3composer.data.negatives import parse_rank_range
from m3composer.distributed import gather_rows, launched_process_group, my_shard, rank
from m3composer.fsutil import atomic_file
from m3composer.model.inference import load_model_for_inference, missing_heads, unwrap_m3
from m3composer.model.m3 import INFERENCE_BATCH_SIZE, INFERENCE_PASSAGE_MAX_LEN, INFERENCE_QUERY_MAX_LEN
from m3composer.model.scores import HEADS, INFERENCE_ENSEMBLE_WEIGHTS, SCORE_NAMES
from m3composer.retrieval.beir import load_corpus_texts
from m3composer.retrieval.cli_args import (add_encoding_arguments, add_search_arguments, corpus_cache_from_args,
                                           instructions_from_args, search_from_args)
from m3composer.retrieval.corpus_store import CorpusCache, describe
from m3composer.retrieval.first_stage import DenseIndex, faiss_top_k
from m3composer.retrieval.mining import (MINE_HEAD, MINE_NEGATIVES, MINE_RANK_RANGE, MINE_SEED, score_rows,
                                        select_negatives)
from m3composer.retrieval.search import encode_dense, search_top_k, stored_corpus


def parse_range(text: str) -> tuple[int, int]:
    try:
        return parse_rank_range(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


@dataclass
class MineRow:
    line_no: int
    obj: dict          # the JSON object as read: every field is written back
    query: str
    pos: list[str]
    neg: list[str]     # the input's negatives (part of the default pool)


def read_rows(path: Path) -> list[MineRow]:
    """Every line validated as `m3c convert` does; the first bad one raises `file:line: reason`."""
    from m3composer.data.rows import RowError, iter_lines, parse_line

    rows = []
    for line_no, raw, _ in iter_lines(path):
        row = parse_line(raw, path=str(path), line_no=line_no)
        if isinstance(row, RowError):
            raise ValueError(str(row))
        rows.append(MineRow(line_no, json.loads(raw), row.query, list(row.pos), list(row.neg)))
    return rows


def input_pool(rows: Sequence[MineRow]) -> list[str]:
    """Every positive and negative text of the input, identical texts once, first appearance order."""
    return list(dict.fromkeys(t for r in rows for t in r.pos + r.neg))


def mine(input_path: str | os.PathLike, output_path: str | os.PathLike, model, *, head: str = MINE_HEAD,
         rank_range: tuple[int, int] = MINE_RANK_RANGE, negatives: int = MINE_NEGATIVES, corpus: Optional[str | os.PathLike] = None,
         max_score_ratio: Optional[float] = None, margin: Optional[float] = None,
         exclude_positives_of_query: bool = False, with_scores: bool = False, scale: float = 1.0,
         dense_index: DenseIndex = DenseIndex(), first_stage_k: Optional[int] = None, seed: int = MINE_SEED, batch_size: int = INFERENCE_BATCH_SIZE, query_instruction: Optional[str] = None,
         passage_instruction: Optional[str] = None, query_max_len: int = INFERENCE_QUERY_MAX_LEN, passage_max_len: int = INFERENCE_PASSAGE_MAX_LEN,
         weights: Sequence[float] = INFERENCE_ENSEMBLE_WEIGHTS, progress: bool = True,
         corpus_cache: Optional[CorpusCache] = None, across_ranks: bool = False) -> dict:
    """Write `output_path` = `input_path` with mined `neg` (module doc); returns the summary counts.

    `model` is an `M3Model` (or a wrapper). Instructions default (None) to the model's recorded
    ones; "" means none. `dense_index`: the faiss index of the dense head (and of the dense first
    stage); `first_stage_k` None: the other heads search exactly, K: first stage + re-rank.
    `corpus_cache`: the pool's vectors from an on-disk store (`corpus_store.py`): the dense head reads
    its dense vectors, the others as `search.search_top_k` does; the summary's `corpus_cache` is its report.
    `across_ranks` (collective; docs/operations.md §Evaluate, mine and score on N ranks): each rank
    encodes its share of the queries and the pool (dense: the vectors are gathered and each rank
    searches its share of the rows, the results gathered; other heads: `search.search_top_k`), every
    rank selects the same negatives, and rank 0 alone writes the output.
    """
    if head not in SCORE_NAMES:
        raise ValueError(f"head must be one of {SCORE_NAMES}, got {head!r}")
    if negatives < 0:
        raise ValueError(f"negatives must be >= 0, got {negatives}")
    m3 = unwrap_m3(model)
    q_inst = (m3.query_instruction or "") if query_instruction is None else query_instruction
    p_inst = (m3.passage_instruction or "") if passage_instruction is None else passage_instruction
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise ValueError(f"{output_path}: output must differ from the input")
    started = time.perf_counter()
    rows = read_rows(input_path)
    # identical texts once, so excluding a positive's text excludes every copy of it
    pool = list(dict.fromkeys(load_corpus_texts(corpus))) if corpus is not None else input_pool(rows)
    pool_index = {text: i for i, text in enumerate(pool)}
    positives_of_query: dict[str, set[str]] = {}
    if exclude_positives_of_query:
        for r in rows:
            positives_of_query.setdefault(r.query, set()).update(r.pos)

    def excluded_of(r: MineRow) -> set[int]:
        texts = set(r.pos) | {r.query} | positives_of_query.get(r.query, set())
        return {pool_index[t] for t in texts if t in pool_index}

    excluded = [excluded_of(r) for r in rows]
    last = rank_range[1]
    k = min(len(pool), last + max((len(e) for e in excluded), default=0))
    queries = [r.query for r in rows]
    writes = not across_ranks or rank() == 0
    common = dict(batch_size=batch_size, progress=progress and writes)
    encoded_at = time.perf_counter()
    if head == "dense":
        tokenizer = m3.tokenizer
        q_vecs = encode_dense(m3, queries, tokenizer, q_inst, query_max_len, desc="encode queries",
                              across_ranks=across_ranks, **common)
        queries_at = time.perf_counter()
        if corpus_cache is None:
            p_vecs = encode_dense(m3, pool, tokenizer, p_inst, passage_max_len, desc="encode pool",
                                  across_ranks=across_ranks, **common)
        else:
            p_vecs = stored_corpus(m3, pool, corpus_cache, tokenizer=tokenizer, instruction=p_inst,
                                   max_length=passage_max_len, with_sparse=False, across_ranks=across_ranks,
                                   **common).dense()
        search_at = time.perf_counter()
        # each rank searches its share of the rows
        q_first, q_last, q_size = my_shard(len(queries)) if across_ranks else (0, len(queries), len(queries))
        top_scores, top_indices = faiss_top_k(q_vecs[q_first:q_last], p_vecs, k, dense_index)
        if across_ranks:
            device = next(m3.parameters()).device
            top_scores, top_indices = (gather_rows(x, len(queries), q_size, device) for x in (top_scores, top_indices))
        used_index = dense_index.kind_for(len(pool))
    else:
        heads = ("dense", head) if head in ("sparse", "colbert") else HEADS
        tops = search_top_k(m3, queries, pool, query_instruction=q_inst, passage_instruction=p_inst,
                            query_max_len=query_max_len, passage_max_len=passage_max_len, weights=weights,
                            heads=heads, top_k=k, first_stage_k=first_stage_k, dense_index=dense_index,
                            corpus_cache=corpus_cache, across_ranks=across_ranks, **common)
        search_at = queries_at = time.perf_counter()    # encoding and search are interleaved here
        top_scores, top_indices = (t.numpy() for t in tops[head])
        used_index = ("exact brute force (search.py)" if first_stage_k is None else
                      f"re-rank of the first stage's top {min(max(first_stage_k, k), len(pool))} (dense {dense_index.kind_for(len(pool))}"
                      + (", sparse inverted index)" if "sparse" in heads else ")"))
    searched_at = time.perf_counter()

    # The positives' own scores (filters and pos_scores) with the same head.
    need_pos = with_scores or max_score_ratio is not None or margin is not None
    pos_scores: list[list[float]] = [[] for _ in rows]
    if need_pos and head == "dense":
        # the vectors are at hand: positives in the pool are not encoded again
        missing = list(dict.fromkeys(t for r in rows for t in r.pos if t not in pool_index))
        extra = encode_dense(m3, missing, m3.tokenizer, p_inst, passage_max_len, batch_size, progress=False,
                             across_ranks=across_ranks)
        vector_of = {t: extra[j] for j, t in enumerate(missing)}
        pos_scores = [[float(q_vecs[i] @ (vector_of[t] if t in vector_of else p_vecs[pool_index[t]])) for t in r.pos]
                      for i, r in enumerate(rows)]
    elif need_pos:
        pos_scores = score_rows(m3, queries, [r.pos for r in rows], head, weights=weights, batch_size=batch_size,
                                query_instruction=q_inst, passage_instruction=p_inst, query_max_len=query_max_len,
                                passage_max_len=passage_max_len, across_ranks=across_ranks)

    counts = {"rows": len(rows), "pool": len(pool), "rows_with_fewer_negatives": 0, "rows_without_negatives": 0,
              "dropped_by_score": 0, "negatives_written": 0, "rows_with_scores_dropped": 0}
    with atomic_file(output_path) if writes else nullcontext() as out:
        for i, r in enumerate(rows):
            chosen, dropped = select_negatives(
                top_indices[i], top_scores[i], excluded[i], rank_range, negatives,
                np.random.default_rng([seed, r.line_no]), min(pos_scores[i]) if need_pos else None,
                max_score_ratio=max_score_ratio, margin=margin)
            counts["dropped_by_score"] += dropped
            if len(chosen) < negatives:
                counts["rows_with_fewer_negatives"] += 1
                counts["rows_without_negatives"] += not chosen
            r.obj["neg"] = [pool[c] for c, _ in chosen]
            if with_scores:
                r.obj["pos_scores"] = [s * scale for s in pos_scores[i]]
                r.obj["neg_scores"] = [s * scale for _, s in chosen]
            elif "neg_scores" in r.obj or "pos_scores" in r.obj:
                # they scored the old negatives: kept, they would no longer match `neg`
                r.obj.pop("pos_scores", None)
                r.obj.pop("neg_scores", None)
                counts["rows_with_scores_dropped"] += 1
            counts["negatives_written"] += len(chosen)
            if out is not None:
                out.write(json.dumps(r.obj, ensure_ascii=False) + "\n")
    done = time.perf_counter()
    seconds = {"total": done - started, "encode_and_search": searched_at - encoded_at,
               "encode_queries": queries_at - encoded_at if head == "dense" else None,
               "encode_pool": search_at - queries_at if head == "dense" else None,
               "search_only": searched_at - search_at}
    return dict(counts, head=head, index=used_index, k=k, seconds=seconds,
                query_instruction=q_inst, passage_instruction=p_inst,
                corpus_cache=None if corpus_cache is None else corpus_cache.report)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="FlagEmbedding JSONL (query, pos, neg?), plain or .gz")
    parser.add_argument("output", help="where to write the rows with mined neg")
    parser.add_argument("--model", required=True, help="model folder, or asset:e5-small")
    parser.add_argument("--corpus", default=None,
                        help="candidate pool: a BEIR folder or a JSONL of {title?, text} (default: the input's "
                             "positives and negatives, deduplicated)")
    parser.add_argument("--head", choices=SCORE_NAMES, default=MINE_HEAD,
                        help=f"the score that ranks (default: {MINE_HEAD})")
    parser.add_argument("--range", dest="rank_range", type=parse_range, default=MINE_RANK_RANGE,
                        help="ranks to sample from, 1-based and inclusive, after removing the positives (default %d-%d)"
                             % MINE_RANK_RANGE)
    parser.add_argument("--negatives", type=int, default=MINE_NEGATIVES,
                        help=f"negatives per row (default {MINE_NEGATIVES})")
    parser.add_argument("--max-score-ratio", type=float, default=None,
                        help="drop candidates scoring above RATIO x the positive's score (e.g. 0.95)")
    parser.add_argument("--margin", type=float, default=None,
                        help="drop candidates scoring above the positive's score minus MARGIN")
    parser.add_argument("--exclude-positives-of-query", action="store_true",
                        help="also exclude every positive the same query text has on other lines")
    parser.add_argument("--scores", action="store_true",
                        help="also write pos_scores/neg_scores of the same head (knowledge distillation)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the written scores (default 1)")
    parser.add_argument("--seed", type=int, default=MINE_SEED)
    add_encoding_arguments(parser)
    add_search_arguments(parser)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    with launched_process_group(args.device) as across_ranks:
        return _run(args, across_ranks)


def _run(args: argparse.Namespace, across_ranks: bool) -> int:
    missing = missing_heads(args.model)
    if args.head != "dense" and missing:
        print(f"m3c mine: error: {args.model}: {'; '.join(f'{h}: {why}' for h, why in missing.items())}; "
              "use --head dense", file=sys.stderr)
        return 2
    model = load_model_for_inference(args.model, pooling=args.pooling, device=args.device)
    query_instruction, passage_instruction = instructions_from_args(args)
    first_stage_k, dense_index = search_from_args(args)
    try:
        summary = mine(args.input, args.output, model, head=args.head, rank_range=args.rank_range,
                       negatives=args.negatives, corpus=args.corpus, max_score_ratio=args.max_score_ratio,
                       margin=args.margin, exclude_positives_of_query=args.exclude_positives_of_query,
                       with_scores=args.scores, scale=args.scale, dense_index=dense_index,
                       first_stage_k=first_stage_k, seed=args.seed,
                       batch_size=args.batch_size, query_instruction=query_instruction,
                       passage_instruction=passage_instruction, query_max_len=args.query_max_len,
                       passage_max_len=args.passage_max_len, weights=args.weights, progress=not args.no_progress,
                       corpus_cache=corpus_cache_from_args(args), across_ranks=across_ranks)
    except (OSError, ValueError) as err:
        print(f"m3c mine: error: {err}", file=sys.stderr)
        return 2
    if rank() != 0:
        return 0
    s = summary
    print(f"[mine] {args.output}: {s['rows']} rows, {s['negatives_written']} negatives from a pool of {s['pool']} "
          f"({s['head']}, {s['index']}, top {s['k']}); {s['rows_with_fewer_negatives']} rows with fewer than "
          f"{args.negatives} (of which {s['rows_without_negatives']} with none), {s['dropped_by_score']} candidates "
          f"dropped by the score filter; {s['rows_with_scores_dropped']} rows lost their old teacher scores; "
          f"{s['seconds']['total']:.1f} s")
    if s["corpus_cache"] is not None:
        print(f"[mine] {describe(s['corpus_cache'])}")
    return 0
