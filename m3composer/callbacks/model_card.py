"""What a training run knows about itself at an export, gathered for the export's model card.

`ExportModel` calls `card_writer(state, run_facts)` on rank 0 and hands the result to
`M3Model.save_pretrained(..., extra_files=...)`, so the card is written into the export folder
before the folder is renamed into place (a crash leaves the old folder or the new one with its
card, never a folder without one). The writer puts three things into the folder:

* `training_run.json`: the facts (model/model_card.py renders them): `run_facts` from the trainer
  (base model, training data, the recipe's keys that differ from the defaults, the eval set), plus
  what the state says now: the heads trained (`loss.heads`) and those left fresh, steps, epoch,
  wall time (`timestamp.total_wct`, which a resume carries on), hardware, the last step's loss terms (Composer's rank-averaged `total_loss_dict`,
  the values `LossLog` writes) and the latest `metrics/<label>/<head>/<metric>` of `RetrievalEval`;
* `plots/losses.png` (and `plots/eval.png`): `write_plots` over the history the `Plots` logger
  recorded, up to this step;
* `README.md`: the card.

Without a `Plots` logger in the run there is no history: the card then has the last step's losses
but no plot and no held-out metrics.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Callable, Optional

import torch
from composer.core import State
from composer.utils import dist

from m3composer.callbacks.loss_log import finished_step_losses
from m3composer.callbacks.plots import EVAL_PREFIX, LOSS_PREFIX, Plots, write_plots
from m3composer.data.index import StreamEntry
from m3composer.model.inference import unwrap_m3
from m3composer.model.model_card import write_card


def flatten(tree: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (an empty dict stays a value)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_changes(settings: dict, defaults: dict) -> dict:
    """`{dotted key: value}` of every setting whose value differs from its default (both nested
    dicts: the run's config and the schema's defaults)."""
    defaults = flatten(defaults)
    return {key: value for key, value in flatten(settings).items() if key not in defaults or defaults[key] != value}


def training_facts(*, run_name: str, base_model: str, train_data: str, streams: list[StreamEntry],
                   settings: dict, defaults: dict, eval_data: Optional[str]) -> dict:
    """What the export's model card says about the run beyond the state: the `run_facts` that
    `ExportModel` is given (`run_facts_now` adds the state's)."""
    return {"run_name": run_name, "base_model": base_model, "data": data_summary(train_data, streams),
            "recipe_changes": recipe_changes(settings, defaults), "eval_data": eval_data}


def data_summary(train_data: str, streams: list[StreamEntry]) -> dict:
    """Tasks, buckets, rows and teacher scores of the training streams (from `m3_index.json`)."""
    return {"train_data": str(train_data), "rows": int(sum(s.rows for s in streams)),
            "streams": [{"task": s.task, "bucket": s.bucket, "rows": int(s.rows),
                         "has_teacher_scores": bool(s.has_teacher_scores), "is_parallel": bool(s.is_parallel)}
                        for s in streams]}


def hardware(state: State) -> dict:
    world = dist.get_world_size()
    if type(state.device).__name__ == "DeviceGPU" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        summary = f"{world} × GPU ({name})"
    else:
        name = platform.processor() or platform.machine()
        summary = f"{world} × CPU rank(s) ({name}, {os.cpu_count()} cores on the node)"
    return {"device": "gpu" if "GPU" in type(state.device).__name__ else "cpu", "world_size": world,
            "device_name": name, "torch": torch.__version__, "summary": f"{summary}, torch {torch.__version__}"}


def _plots_history(state: State) -> Optional[dict]:
    for callback in state.callbacks:
        if isinstance(callback, Plots):
            return callback.history
    return None


def latest_eval(history: dict, eval_data: Optional[str]) -> Optional[dict]:
    """The last logged retrieval evaluation: `{label, step, data, metrics: {head: {metric: value}}}`."""
    points = {name: pts for name, pts in history.items() if name.startswith(EVAL_PREFIX) and name.count("/") == 3 and pts}
    if not points:
        return None
    step = max(pts[-1][0] for pts in points.values())
    label, metrics = None, {}
    for name, pts in points.items():
        when, value = pts[-1]
        if when == step:
            _, label, head, metric = name.split("/")
            metrics.setdefault(head, {})[metric] = float(value)
    return {"label": label, "step": int(step), "data": eval_data, "metrics": metrics}


def run_facts_now(state: State, run_facts: Optional[dict], history: Optional[dict]) -> dict:
    """`run_facts` (static, from the trainer) + what the state says at this export."""
    m3 = unwrap_m3(state.model)
    facts = dict(run_facts or {})
    facts.setdefault("base_model", None)
    step, losses = finished_step_losses(state)
    wall = state.timestamp.total_wct
    facts.update({
        "steps": int(state.timestamp.batch), "epochs": int(state.timestamp.epoch),
        "wall_time_s": wall.total_seconds() if hasattr(wall, "total_seconds") else float(wall),
        "hardware": hardware(state),
        "pooling": m3.pooling, "normalize": m3.normalize,
        "query_instruction": m3.query_instruction, "passage_instruction": m3.passage_instruction,
        "colbert_dim": int(m3.colbert_linear.out_features),
        "trained_heads": None if m3.trained_heads is None else list(m3.trained_heads),
        "fresh_heads": list(m3.untrained_fresh_heads()),
        "matryoshka": m3.matryoshka,
        "final_losses": {name[len(LOSS_PREFIX):]: value for name, value in losses.items()
                         if name.startswith(LOSS_PREFIX)} or None,
        "final_losses_step": step if losses else None,
        "eval": latest_eval(history, facts.get("eval_data")) if history else None,
    })
    return facts


def card_writer(state: State, run_facts: Optional[dict]) -> Callable[[Path], None]:
    """A function writing the card files into a folder being built (call on rank 0)."""
    recorded = _plots_history(state)
    history = {name: list(points) for name, points in (recorded or {}).items()}
    step, losses = finished_step_losses(state)
    # At BATCH_END `Plots` (a logger, run after the callbacks) has not yet recorded this step.
    for name, value in losses.items():
        if name.startswith(LOSS_PREFIX) and (not history.get(name) or history[name][-1][0] < step):
            history.setdefault(name, []).append((step, value))
    facts = run_facts_now(state, run_facts, history if recorded is not None else None)

    def write(folder: Path) -> None:
        written = write_plots(folder, history) if recorded is not None and history else []
        facts["loss_plot"] = any(p.name == "losses.png" for p in written)
        write_card(folder, facts, "m3")

    return write
