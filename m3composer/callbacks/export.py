"""Export the FlagEmbedding-compatible model folder at the end of training, and every N steps.

Rank 0 writes the folder (encoder safetensors + tokenizer + `colbert_linear.pt` +
`sparse_linear.pt` + `m3composer.json`) through the model's own `save_pretrained`, which writes
to a temporary name and renames, so a crash never leaves a half-written export. All ranks then
meet at a barrier so nobody exits (or starts the next step) before the folder exists.
Periodic exports go to `<export_dir>/step-<N>`; the final one to `<export_dir>` itself.
"""
from __future__ import annotations

import logging
from pathlib import Path

from composer.core import Callback, State, Time
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)


def export_model(state: State, out_dir: str | Path) -> None:
    """Save the unwrapped model of `state` to `out_dir` on rank 0; barrier on every rank."""
    model = getattr(state.model, "module", state.model)
    if dist.get_global_rank() == 0:
        model.save_pretrained(out_dir)
        log.info("exported the model to %s", out_dir)
    dist.barrier()


class ExportModel(Callback):
    def __init__(self, export_dir: str, export_interval: str | None = None):
        self.export_dir = Path(export_dir)
        self.interval = Time.from_timestring(export_interval) if export_interval else None

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.interval is None:
            return
        now = state.timestamp.get(self.interval.unit).value
        if now > 0 and now % self.interval.value == 0:
            export_model(state, self.export_dir / f"step-{int(state.timestamp.batch)}")

    def fit_end(self, state: State, logger: Logger) -> None:
        export_model(state, self.export_dir)
