"""Command-line options shared by `m3c eval`, `m3c score-teacher` and `m3c mine`: prefixes, pooling, batching,
weights, and the search (exact, or first stage + re-rank, with the faiss index's parameters, and the
on-disk corpus store)."""
from __future__ import annotations

import argparse
from typing import Optional

from m3composer.model.inference import DEVICES
from m3composer.model.m3 import INFERENCE_BATCH_SIZE, INFERENCE_PASSAGE_MAX_LEN, INFERENCE_QUERY_MAX_LEN
from m3composer.model.scores import HEADS, INFERENCE_ENSEMBLE_WEIGHTS
from m3composer.retrieval.corpus_store import CorpusCache
from m3composer.retrieval.first_stage import FIRST_STAGE_K, HNSW_M, HNSW_MIN_POOL, INDEXES, IVF_NPROBE, DenseIndex

SEARCH_MODES = ("exact", "rerank")


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


def add_encoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `m3c eval` and `m3c score-teacher`: how texts are prefixed, pooled, batched, cut."""
    add_instruction_arguments(parser)
    parser.add_argument("--pooling", choices=("cls", "mean"), default=None,
                        help="dense pooling (default: the folder's m3composer.json, else cls)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the model encodes (default auto: the GPU when there is one)")
    parser.add_argument("--batch-size", type=int, default=INFERENCE_BATCH_SIZE)
    parser.add_argument("--query-max-len", type=int, default=INFERENCE_QUERY_MAX_LEN)
    parser.add_argument("--passage-max-len", type=int, default=INFERENCE_PASSAGE_MAX_LEN)
    parser.add_argument("--weights", type=parse_weights, default=INFERENCE_ENSEMBLE_WEIGHTS,
                        help="ensemble weights dense,sparse,colbert (default: 0.4,0.2,0.4)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive whole number, got {text!r}")
    return value


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """--search exact|rerank, --first-stage-k and the faiss index (`first_stage.DenseIndex`), shared by
    `m3c eval` and `m3c mine` (docs/recipe.md §First stage and re-rank)."""
    parser.add_argument("--search", choices=SEARCH_MODES, default="exact",
                        help="exact: every document scored by every head (the reference); rerank: each head ranks "
                             "the union of a query's top --first-stage-k by dense (faiss) and by sparse (inverted "
                             "index), with the same scores")
    parser.add_argument("--first-stage-k", type=positive_int, default=FIRST_STAGE_K,
                        help=f"candidates per query from each first stage with --search rerank (default {FIRST_STAGE_K})")
    parser.add_argument("--index", choices=INDEXES, default="auto",
                        help="faiss index of dense search: flat (exact), hnsw or ivf (approximate); "
                             f"auto = hnsw from {HNSW_MIN_POOL:,} passages, else flat")
    parser.add_argument("--hnsw-m", type=positive_int, default=HNSW_M, help=f"HNSW links per node (default {HNSW_M})")
    parser.add_argument("--hnsw-ef-search", type=positive_int, default=None,
                        help="HNSW candidates kept while searching (default max(128, 2k))")
    parser.add_argument("--ivf-nlist", type=positive_int, default=None,
                        help="IVF cells (default min(4 sqrt(N), N/39)); k-means trains on a sample of the corpus")
    parser.add_argument("--ivf-nprobe", type=positive_int, default=IVF_NPROBE,
                        help=f"IVF cells searched per query (default {IVF_NPROBE}; nlist = flat's results)")
    parser.add_argument("--corpus-cache", default=None, metavar="DIR",
                        help="keep the corpus' dense vectors and lexical weights on disk under DIR (one folder per "
                             "model, settings and corpus), written in shards, resumed after a kill, and read by the next "
                             "run instead of encoding the corpus again (not for exact search with the ColBERT head)")


def search_from_args(args: argparse.Namespace) -> tuple[Optional[int], DenseIndex]:
    """`(first_stage_k or None for exact search, the faiss index)` from add_search_arguments' flags."""
    dense_index = DenseIndex(args.index, hnsw_m=args.hnsw_m, hnsw_ef_search=args.hnsw_ef_search,
                             ivf_nlist=args.ivf_nlist, ivf_nprobe=args.ivf_nprobe)
    return (args.first_stage_k if args.search == "rerank" else None), dense_index


def corpus_cache_from_args(args: argparse.Namespace) -> Optional[CorpusCache]:
    return None if args.corpus_cache is None else CorpusCache(args.corpus_cache)
