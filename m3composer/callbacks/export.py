"""Export the FlagEmbedding-compatible model folder at the end of training, and every N steps.

Rank 0 writes the folder (encoder safetensors + tokenizer + `colbert_linear.pt` +
`sparse_linear.pt` + `m3composer.json`) through the model's own `save_pretrained`, which writes
to a temporary name and renames, so a crash never leaves a half-written export. All ranks then
meet at a barrier so nobody exits (or starts the next step) before the folder exists.
Periodic exports go to `<export_dir>/step-<N>`; the final one to `<export_dir>` itself.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from composer.core import Callback, State, Time
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)


def export_model(state: State, out_dir: str | Path) -> None:
    """Save the M3Model inside `state.model` to `out_dir` on rank 0; barrier on every rank.

    Under FSDP every rank first joins `summon_full_params` (a collective) so rank 0 sees whole tensors.
    """
    from m3composer.retrieval.evaluate import unwrap_m3

    m3 = unwrap_m3(state.model)
    full_params = contextlib.nullcontext()
    if state.fsdp_enabled:
        from torch.distributed.fsdp import FullyShardedDataParallel
        full_params = FullyShardedDataParallel.summon_full_params(state.model, writeback=False, rank0_only=True)
    with full_params:
        if dist.get_global_rank() == 0:
            m3.save_pretrained(out_dir)
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
