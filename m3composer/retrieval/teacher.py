"""Teacher scores for knowledge distillation: the `m3c score-teacher` command.

    m3c score-teacher INPUT.jsonl OUTPUT.jsonl --model DIR [--score dense|ensemble] [--scale 1.0]

Reads FlagEmbedding JSONL (`query`, `pos`, `neg`, any other fields), scores every positive and
negative against its query with a model folder as the teacher, and writes the same rows with
`pos_scores` / `neg_scores` added (existing ones replaced, other fields and line order kept). The
output is written to a temporary name and renamed, so a failure leaves no partial file. Every
line is validated as `m3c convert` does; the first bad line stops the run with its file:line.

Scale of the scores: raw BGE-M3 inference scores (no temperature; `mining.pair_score`), times `--scale`:

    dense     <e_q, e_p>, the cosine similarity for a normalising model: in [-1, 1]
    ensemble  0.4·dense + 0.2·sparse + 0.4·colbert (sparse is unbounded ≥ 0, ColBERT in [-1, 1])

The recipe's distillation target is `softmax(teacher_scores)` over the query's group with no
temperature (docs/recipe.md §m3_kd_loss), so cosine-range scores give an almost flat target. `--scale 50` (= 1/τ
for the recipe's τ = 0.02, the student's own score scale) gives a target as sharp as the student's
distribution; reranker logits, the usual teacher in FlagEmbedding, are already on a wide scale.

Under a launcher (`composer -n N -m m3composer.cli score-teacher …`, torchrun) each rank scores 1/N
of the rows and rank 0 alone writes the output (docs/operations.md §Evaluate, mine and score on N ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

from m3composer.distributed import launched_process_group, rank
from m3composer.fsutil import atomic_file
from m3composer.model.inference import load_model_for_inference, missing_heads, unwrap_m3
from m3composer.model.m3 import INFERENCE_BATCH_SIZE, INFERENCE_PASSAGE_MAX_LEN, INFERENCE_QUERY_MAX_LEN
from m3composer.model.scores import INFERENCE_ENSEMBLE_WEIGHTS
from m3composer.retrieval.cli_args import add_encoding_arguments, instructions_from_args
from m3composer.retrieval.mining import score_rows

SCORE_KINDS = ("dense", "ensemble")


def score_teacher(input_path: str | os.PathLike, output_path: str | os.PathLike, model, *, score: str = "dense",
                  batch_size: int = INFERENCE_BATCH_SIZE, query_instruction: Optional[str] = None,
                  passage_instruction: Optional[str] = None, query_max_len: int = INFERENCE_QUERY_MAX_LEN, passage_max_len: int = INFERENCE_PASSAGE_MAX_LEN,
                  weights: Sequence[float] = INFERENCE_ENSEMBLE_WEIGHTS, scale: float = 1.0, rows_per_chunk: int = 256,
                  progress: bool = True, across_ranks: bool = False) -> dict:
    """Write `output_path` = `input_path` with teacher `pos_scores`/`neg_scores`; returns counts.

    `model` is an `M3Model` (or a wrapper `unwrap_m3` opens). Instructions default (None) to the
    model's recorded ones; "" means none. Raises `ValueError("file:line: reason")` on a bad line.
    `across_ranks` (collective; docs/operations.md §Evaluate, mine and score on N ranks): every rank
    reads the input, scores its share of each chunk's rows (`mining.score_rows`), and rank 0 alone
    writes the output; every rank returns the counts.
    """
    from tqdm.auto import tqdm

    from m3composer.data.rows import RowError, iter_lines, parse_line

    if score not in SCORE_KINDS:
        raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}")
    m3 = unwrap_m3(model)
    q_inst = (m3.query_instruction or "") if query_instruction is None else query_instruction
    p_inst = (m3.passage_instruction or "") if passage_instruction is None else passage_instruction
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise ValueError(f"{output_path}: output must differ from the input")
    writes = not across_ranks or rank() == 0
    counts = {"rows": 0, "passages": 0}

    def flush(pending: list[tuple[dict, object]], out) -> None:
        if not pending:
            return
        scores = score_rows(m3, [row.query for _, row in pending], [row.pos + row.neg for _, row in pending], score,
                            weights=weights, batch_size=batch_size, query_instruction=q_inst,
                            passage_instruction=p_inst, query_max_len=query_max_len, passage_max_len=passage_max_len,
                            across_ranks=across_ranks)
        for (obj, row), values in zip(pending, scores):
            values = [v * scale for v in values]
            obj["pos_scores"], obj["neg_scores"] = values[:len(row.pos)], values[len(row.pos):]
            if out is not None:
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
            counts["rows"] += 1
            counts["passages"] += len(values)
        pending.clear()

    with (atomic_file(output_path) if writes else nullcontext()) as out, \
            tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True, desc="score-teacher",
                 disable=not progress or not writes) as bar:
        pending: list[tuple[dict, object]] = []
        position = 0
        for line_no, raw, end_offset in iter_lines(input_path):
            row = parse_line(raw, path=str(input_path), line_no=line_no)
            if isinstance(row, RowError):
                raise ValueError(str(row))
            # The teacher scores replace whatever scores the row had; validate the rest as convert does.
            pending.append((json.loads(raw), row))
            if len(pending) >= rows_per_chunk:
                flush(pending, out)
            bar.update(end_offset - position)
            position = end_offset
        flush(pending, out)
    return dict(counts, score=score, scale=scale, query_instruction=q_inst, passage_instruction=p_inst)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="FlagEmbedding JSONL (query, pos, neg), plain or .gz")
    parser.add_argument("output", help="where to write the rows with pos_scores/neg_scores")
    parser.add_argument("--model", required=True, help="teacher model folder, or asset:e5-small")
    parser.add_argument("--score", choices=SCORE_KINDS, default="dense",
                        help="dense inner product, or the 0.4/0.2/0.4 ensemble of all three heads (default: dense)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every score (default 1: raw scores; 50 = 1/τ of the recipe)")
    add_encoding_arguments(parser)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    with launched_process_group(args.device) as across_ranks:
        return _run(args, across_ranks)


def _run(args: argparse.Namespace, across_ranks: bool) -> int:
    missing = missing_heads(args.model)
    if args.score == "ensemble" and missing:
        print(f"m3c score-teacher: error: {args.model}: {'; '.join(f'{h}: {why}' for h, why in missing.items())}; "
              f"use --score dense", file=sys.stderr)
        return 2
    model = load_model_for_inference(args.model, pooling=args.pooling, device=args.device)
    query_instruction, passage_instruction = instructions_from_args(args)
    try:
        summary = score_teacher(args.input, args.output, model, score=args.score, batch_size=args.batch_size,
                                query_instruction=query_instruction, passage_instruction=passage_instruction,
                                query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
                                weights=args.weights, scale=args.scale, progress=not args.no_progress,
                                across_ranks=across_ranks)
    except (OSError, ValueError) as err:
        print(f"m3c score-teacher: error: {err}", file=sys.stderr)
        return 2
    if rank() != 0:
        return 0
    print(f"[score-teacher] {args.output}: {summary['rows']} rows, {summary['passages']} passages scored "
          f"({summary['score']}, scale {summary['scale']}, instructions q={summary['query_instruction']!r} "
          f"p={summary['passage_instruction']!r})")
    return 0
