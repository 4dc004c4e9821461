"""Per-step training losses as JSON lines, for comparing runs step by step (and resumes).

`LossLog(path)` appends, on rank 0, one line per optimizer step:

    {"step": 7, "epoch": 0, "loss/train/dense": ..., ..., "loss/train/total": ...,
     "lr-AdamW/group0": 2.9e-05, "self_distill_on": true}

* `step` is the 0-based optimizer step (Composer's `timestamp.batch` before the step), the same
  `step` Composer gives the `loss/train/*` metrics;
* the losses are Composer's own logged values: each term averaged over the ranks;
* `lr-<Optimizer>/group<i>` is the learning rate that step used (read at BATCH_START, before the
  scheduler steps; LRMonitor logs the next step's rate at BATCH_END);
* `self_distill_on` is the model switch the step ran with.

Each fit also writes `{"event": "fit_start", "step": N}` first, N = the step it starts at (0, or
the checkpoint's step after a resume), so a log shared by a killed run and its restart can be
split. Lines are flushed as they are written (a SIGKILL loses at most the step in flight). Floats
are written with `repr` precision (json), so two runs can be compared to 1e-12, not to the 4
digits of the console logger.
"""
from __future__ import annotations

import json
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


def finished_step_losses(state: State) -> tuple[int, dict[str, float]]:
    """At BATCH_END: `(step, {"loss/train/<term>": value})` of the step that just finished, the
    rank-averaged terms Composer logs, with the 0-based step it logs them at (`timestamp.batch` has
    already moved past the finished step). `Plots` records its loss curves from the same values."""
    return int(state.timestamp.batch) - 1, {k: float(v) for k, v in (state.total_loss_dict or {}).items()}


class LossLog(Callback):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lrs: dict[str, float] = {}
        self._self_distill_on: bool | None = None
        self._file = None

    def _write(self, record: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self._write({"event": "fit_start", "step": int(state.timestamp.batch)})

    def batch_start(self, state: State, logger: Logger) -> None:
        # The rate this step uses: the scheduler steps after the batch, before BATCH_END.
        self._lrs = {f"lr-{type(opt).__name__}/group{i}": float(group["lr"])
                     for opt in state.optimizers for i, group in enumerate(opt.param_groups)}
        model = getattr(state.model, "module", state.model)
        on = getattr(model, "self_distill_on", None)
        self._self_distill_on = None if on is None else bool(on)

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        step, losses = finished_step_losses(state)
        record = {"step": step, "epoch": int(state.timestamp.epoch), **losses}
        record.update(self._lrs)
        if self._self_distill_on is not None:
            record["self_distill_on"] = self._self_distill_on
        self._write(record)

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
