"""Command-line options shared by `m3c eval`, `m3c score-teacher` and `m3c mine`: prefixes, pooling, batching, weights."""
from __future__ import annotations

import argparse
from typing import Optional

from m3composer.model.inference import DEVICES
from m3composer.model.m3 import INFERENCE_BATCH_SIZE, INFERENCE_PASSAGE_MAX_LEN, INFERENCE_QUERY_MAX_LEN
from m3composer.model.scores import HEADS, INFERENCE_ENSEMBLE_WEIGHTS


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
