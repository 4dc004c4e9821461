"""RetrievalEval: run `m3c eval`'s evaluation on the in-memory model during training, and log it.

Every `interval` (a Composer time string: `"100ba"`, `"1ep"`, ...) and once at the end of fit, the
callback evaluates the model on a fixed set (a BEIR folder or FlagEmbedding JSONL, optionally cut
to its first `max_queries` queries) with `m3composer.retrieval.evaluate.evaluate_model`, and logs

    metrics/<label>/<head>/<metric>      e.g. metrics/eval/dense/ndcg@10

for head in dense, sparse, colbert, ensemble and metric in recall@1, recall@10, mrr@10, ndcg@10,
through Composer's loggers (so MLflow, W&B, the console and `InMemoryLogger` all see them). A fresh
head that `loss.heads` leaves out (random weights: `M3Model.untrained_fresh_heads`) is not evaluated,
and the ensemble is over the others (docs/recipe.md §Choosing the heads).

Only rank 0 evaluates, on the unwrapped `M3Model` (encoder forward only: no collective call
inside), while the other ranks wait at a barrier; the eval set is read once, lazily, on rank 0.
The model goes back to training mode afterwards. Nothing is stored across a resume: the schedule
is derived from `state.timestamp`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

from m3composer.callbacks.preemption import preempted
from m3composer.model.inference import unwrap_m3
from m3composer.model.scores import HEADS, SCORE_NAMES
from m3composer.retrieval.beir import EvalSet, load_eval_set
from m3composer.retrieval.evaluate import evaluate_model

log = logging.getLogger(__name__)

EVAL_KWARGS = {"query_instruction", "passage_instruction", "batch_size", "query_max_len", "passage_max_len",
               "weights", "heads", "k_values"}


def eval_metrics_to_log(results: dict, label: str = "eval") -> dict[str, float]:
    """`evaluate_model` results -> `{"metrics/<label>/<head>/<metric>": value}`."""
    return {f"metrics/{label}/{head}/{name}": float(value)
            for head in SCORE_NAMES if head in results
            for name, value in results[head].items()}


class RetrievalEval(Callback):
    """Evaluate retrieval every `interval` and at fit end; see the module doc.

    Args:
        eval_path: BEIR folder or FlagEmbedding JSONL.
        interval: Composer time string (`"100ba"`, `"1ep"`), or None for fit end only.
        at_fit_end: also evaluate when training ends (skipped if the last step was just evaluated).
        max_queries: evaluate the first N queries only (the whole corpus is always used).
        split: qrels split of a BEIR folder.
        label: the `<label>` in the metric names.
        **eval_kwargs: passed to `evaluate_model` (query_instruction, passage_instruction, batch_size,
            query_max_len, passage_max_len, weights, heads, k_values).
    """

    def __init__(self, eval_path: str | os.PathLike, *, interval: Optional[str], max_queries: Optional[int],
                 at_fit_end: bool = True, split: str = "test", label: str = "eval", **eval_kwargs: Any):
        unknown = set(eval_kwargs) - EVAL_KWARGS
        if unknown:
            raise TypeError(f"RetrievalEval: unknown evaluation argument(s) {sorted(unknown)}; "
                            f"allowed: {sorted(EVAL_KWARGS)}")
        self.eval_path = eval_path
        self.interval = interval
        self.at_fit_end = at_fit_end
        self.max_queries = max_queries
        self.split = split
        self.label = label
        self.eval_kwargs = eval_kwargs
        self._due = (create_interval_scheduler(interval, include_end_of_training=False, checkpoint_events=False)
                     if interval else None)
        self._eval_set: Optional[EvalSet] = None
        self._last_evaluated_batch: Optional[int] = None
        self.history: list[tuple[int, dict]] = []     # (batch, results) on rank 0, for callers and tests

    def _load(self) -> EvalSet:
        if self._eval_set is None:
            self._eval_set = load_eval_set(self.eval_path, self.split).first_queries(self.max_queries)
        return self._eval_set

    def evaluate(self, state: State, logger: Logger) -> None:
        """Evaluate now (rank 0) and log; every rank meets at a barrier afterwards."""
        batch = int(state.timestamp.batch)
        if batch == self._last_evaluated_batch:
            return
        self._last_evaluated_batch = batch
        if dist.get_global_rank() == 0:
            kwargs = dict(self.eval_kwargs)
            skip = unwrap_m3(state.model).untrained_fresh_heads()
            kwargs["heads"] = tuple(h for h in kwargs.get("heads", HEADS) if h not in skip)
            results = evaluate_model(state.model, self._load(), **kwargs)
            self.history.append((batch, results))
            logger.log_metrics(eval_metrics_to_log(results, self.label))
            log.info("retrieval eval at batch %d: %s", batch,
                     {h: round(results[h].get("ndcg@10", float("nan")), 4) for h in SCORE_NAMES
                      if h in results})
        dist.barrier()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._due is not None and self._due(state, Event.BATCH_END):
            self.evaluate(state, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self._due is not None and self._due(state, Event.EPOCH_END):
            self.evaluate(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.at_fit_end and not preempted(state):     # a preempted run is not at its end
            self.evaluate(state, logger)
