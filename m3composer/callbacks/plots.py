"""PNG plots of a run: per-head training losses and retrieval metrics over steps.

    RUN_DIR/plots/losses.png   loss/train/<term> (dense, sparse, colbert, ensemble, self_distill,
                               bidirectional, masked_negatives (a count), sparsity, total), raw per step plus a moving average,
                               then the heads' diagnostics: a grid of at most 5 rows, filled down the columns
    RUN_DIR/plots/eval.png     metrics/<label>/<head>/<metric> (what RetrievalEval logs): one panel
                               per metric, one line per head

`write_plots(run_dir, history)` is the plain function; `history` maps a metric name to its
`(step, value)` points, or is an `InMemoryLogger.data` dict (points `(Timestamp, value)`). The
`Plots` logger destination records the loss terms at every BATCH_END (from the same values as
`LossLog`) and the retrieval metrics as they are logged, and writes the plots at fit end on rank 0. Put it in `Trainer(loggers=[...])`; placed in `callbacks=[...]` it adds itself to the
loggers at `Event.INIT`. Files are written under a temporary name and renamed; matplotlib runs
with the Agg backend (no display needed).
"""
from __future__ import annotations

import io
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from m3composer.callbacks.loss_log import finished_step_losses
from m3composer.fsutil import atomic_file
from m3composer.model.composer_model import LOSS_KEYS
from m3composer.model.scores import SCORE_NAMES

LOSS_PREFIX = "loss/train/"
EVAL_PREFIX = "metrics/"
# HeadDiagnostics' per-step numbers: drawn under the loss terms, so a dead head shows in the same figure
DIAGNOSTIC_SERIES = ("heads/sparse/shared_token_weight", "heads/sparse/zero_weight_share", "grad_norm/sparse_head",
                     "grad_norm/clip_scale")
HEAD_ORDER = SCORE_NAMES
# The loss terms in the order ComposerM3 logs them; unknown terms go just before "total".
LOSS_ORDER = LOSS_KEYS
# losses.png is a grid of at most LOSS_MAX_ROWS rows (1,210 px at the 110 dpi of _png), filled
# down the columns, so that the twelve panels of a full run fit a screen (3 x 4: 1,815 x 968 px):
# 1 column of 8 in, or columns of 5.5 in
LOSS_MAX_ROWS = 5
LOSS_PANEL_HEIGHT_IN = 2.2
LOSS_COLUMN_WIDTH_IN = (8.0, 5.5)


def loss_grid(panels: int) -> tuple[int, int]:
    """(rows, columns) of losses.png: one column up to LOSS_MAX_ROWS panels, then as many columns as
    needed, with the rows spread evenly over them."""
    cols = -(-panels // LOSS_MAX_ROWS)
    return -(-panels // cols), cols


def _step_of(when: Any) -> int:
    # InMemoryLogger stores a Timestamp; our own recorder stores the int step.
    batch = getattr(when, "batch", None)
    return int(batch.value if hasattr(batch, "value") else batch) if batch is not None else int(when)


def normalize_history(history: Mapping[str, Sequence[tuple[Any, Any]]]) -> dict[str, list[tuple[int, float]]]:
    """`{name: [(step, float value)]}` from our history or an `InMemoryLogger.data` dict."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, points in history.items():
        clean = []
        for when, value in points:
            try:
                clean.append((_step_of(when), float(value.item() if hasattr(value, "item") else value)))
            except (TypeError, ValueError):
                continue   # non-numeric entries (text, images) are not plotted
        if clean:
            out[name] = clean
    return out


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _eval_series(history: dict[str, list[tuple[int, float]]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """`{metric: {"<label>/<head>" or "<head>": points}}` from `metrics/<label>/<head>/<metric>` keys."""
    panels: dict[str, dict[str, list]] = defaultdict(dict)
    labels = {name.split("/")[1] for name in history if name.startswith(EVAL_PREFIX) and name.count("/") == 3}
    for name, points in history.items():
        parts = name.split("/")
        if name.startswith(EVAL_PREFIX) and len(parts) == 4:
            _, label, head, metric = parts
            panels[metric][head if len(labels) == 1 else f"{label}/{head}"] = points
    return panels


def _metric_order(metric: str) -> tuple:
    """recall@1, recall@10, ..., then mrr@k, ndcg@k, then anything else by name."""
    name, _, k = metric.partition("@")
    rank = {"recall": 0, "mrr": 1, "ndcg": 2}.get(name, 3)
    return rank, int(k) if k.isdigit() else 0, metric


def write_plots(run_dir: str | os.PathLike, history: Mapping[str, Sequence[tuple[Any, Any]]],
                smoothing_window: int = 10) -> list[Path]:
    """Write `plots/losses.png` and `plots/eval.png` under `run_dir` (each only when it has data);
    returns the paths written."""
    history = normalize_history(history)
    key = (smoothing_window, sorted((name, tuple(points)) for name, points in history.items()))
    if _LAST_RENDER.get("key") != key:
        # at fit end the export's card and `Plots` draw the same history: draw it once
        _LAST_RENDER.update(key=key, pngs=_render(history, smoothing_window))
    written = []
    for name, png in _LAST_RENDER["pngs"].items():
        path = Path(run_dir) / "plots" / name
        with atomic_file(path, "wb") as handle:
            handle.write(png)
        written.append(path)
    return written


_LAST_RENDER: dict[str, Any] = {}


def _render(history: dict[str, list[tuple[int, float]]], smoothing_window: int) -> dict[str, bytes]:
    """`{"losses.png": bytes, "eval.png": bytes}`, each only when it has data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = {}

    losses = {name[len(LOSS_PREFIX):]: pts for name, pts in history.items() if name.startswith(LOSS_PREFIX)}
    # Terms that stayed exactly zero (switched off for the whole run) only clutter the figure.
    losses = {term: pts for term, pts in losses.items() if any(v != 0 for _, v in pts)}
    if losses:
        terms = sorted(losses, key=lambda t: (LOSS_ORDER.index(t) if t in LOSS_ORDER else len(LOSS_ORDER) - 1, t))
        for name in DIAGNOSTIC_SERIES:
            if history.get(name):
                losses[name] = history[name]
                terms.append(name)
        rows, cols = loss_grid(len(terms))
        fig, axes = plt.subplots(rows, cols, figsize=(LOSS_COLUMN_WIDTH_IN[min(cols, 2) - 1] * cols,
                                                      LOSS_PANEL_HEIGHT_IN * rows), sharex=True, squeeze=False)
        # down the columns: the loss terms in their order, then the diagnostics
        cells = [axes[i % rows, i // rows] for i in range(len(terms))]
        for ax, term in zip(cells, terms):
            steps, values = zip(*sorted(losses[term]))
            ax.plot(steps, values, lw=0.8, alpha=0.45, label="per step")
            if len(values) > 2:
                ax.plot(steps, _moving_average(list(values), smoothing_window), lw=1.6,
                        label=f"trailing mean of {smoothing_window}")
            ax.set_title(term, fontsize=9, loc="left")    # a title, not a y label: the diagnostics' names are long
            ax.grid(alpha=0.3)
        for ax in axes.flat:
            ax.set_visible(ax in cells)
        for col in range(cols):          # the lowest drawn panel of each column carries the step axis
            bottom = [ax for ax in axes[:, col] if ax in cells][-1]
            bottom.xaxis.set_tick_params(labelbottom=True)
            bottom.set_xlabel("step (batch)")
        fig.suptitle("training loss terms (loss/train/*), then the heads' diagnostics")
        cells[0].legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        pngs["losses.png"] = _png(fig)
        plt.close(fig)

    panels = _eval_series(history)
    if panels:
        metrics = sorted(panels, key=_metric_order)
        cols = min(2, len(metrics))
        rows = (len(metrics) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.4 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            series = panels[metric]
            order = sorted(series, key=lambda h: (HEAD_ORDER.index(h.split("/")[-1])
                                                  if h.split("/")[-1] in HEAD_ORDER else 9, h))
            for head in order:
                steps, values = zip(*sorted(series[head]))
                ax.plot(steps, values, marker="o", ms=3, label=head)
            ax.set_title(metric)
            ax.set_xlabel("step (batch)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(metrics):]:
            ax.set_visible(False)
        fig.suptitle("retrieval evaluation (metrics/<label>/<head>/<metric>)")
        fig.tight_layout()
        pngs["eval.png"] = _png(fig)
        plt.close(fig)
    return pngs


class Plots(LoggerDestination):
    """Records the loss terms of every step (as `LossLog` does) and the `metrics/*` retrieval
    evaluations as they are logged; writes the plots at fit end."""

    def __init__(self, run_dir: str | os.PathLike, smoothing_window: int = 10):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.smoothing_window = smoothing_window
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.written: list[Path] = []

    def init(self, state: State, logger: Logger) -> None:
        # Given as a callback rather than a logger: join the destinations so log_metrics reaches us.
        if not any(d is self for d in logger.destinations):
            logger.destinations = (*logger.destinations, self)

    def batch_end(self, state: State, logger: Logger) -> None:
        step, losses = finished_step_losses(state)
        for name, value in losses.items():
            if name.startswith(LOSS_PREFIX):
                self.history[name].append((step, value))

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        for name, value in metrics.items():
            if name.startswith(EVAL_PREFIX) or name in DIAGNOSTIC_SERIES:
                try:
                    self.history[name].append((int(step or 0), float(value)))
                except (TypeError, ValueError):
                    continue

    def fit_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self.written = write_plots(self.run_dir, self.history, self.smoothing_window)
