"""Export the FlagEmbedding-compatible model folder at the end of training, and every N steps.

Rank 0 writes the folder (encoder safetensors + tokenizer + `colbert_linear.pt` +
`sparse_linear.pt` + `m3composer.json`, and the model card: `README.md`, `training_run.json`,
`plots/losses.png`, see callbacks/model_card.py) through the model's own `save_pretrained`, which
writes to a temporary name and renames, so a crash never leaves a half-written export. All ranks then
meet at a barrier so nobody exits (or starts the next step) before the folder exists.
Periodic exports go to `<export_dir>/step-<N>`; the final one to `<export_dir>` itself, which keeps
the `step-<N>` folders (the replaced folder is not simply deleted with them).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from composer.core import Callback, Event, State, Time
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from m3composer.callbacks.model_card import card_writer
from m3composer.callbacks.preemption import preempted
from m3composer.fsutil import publish_dir
from m3composer.model.inference import unwrap_m3

log = logging.getLogger(__name__)


PERIODIC_PREFIX = "step-"


def _save_keeping_periodic(m3, folder: Path, extra_files=None) -> None:
    """`m3.save_pretrained(folder)`, carrying the periodic `step-N` exports inside `folder` over.

    save_pretrained replaces the whole folder, which would delete the periodic exports written into
    it. So the new export is staged next to it (atomically, by save_pretrained), the `step-N`
    folders are moved into it (one rename each), and the staged folder takes the old one's place.
    """
    staged = Path(m3.save_pretrained(folder.parent / f".{folder.name}.staged-{os.getpid()}", extra_files=extra_files))
    moved: list[str] = []
    try:
        if folder.is_dir():
            for sub in sorted(folder.glob(f"{PERIODIC_PREFIX}*")):
                os.rename(sub, staged / sub.name)
                moved.append(sub.name)
        publish_dir(staged, folder)
    except BaseException:
        if folder.is_dir():     # give the periodic exports back before dropping the staged folder
            for name in moved:
                if (staged / name).exists():
                    os.rename(staged / name, folder / name)
        shutil.rmtree(staged, ignore_errors=True)
        raise


def export_model(state: State, out_dir: str | Path, *, keep_periodic: bool = False,
                 run_facts: Optional[dict] = None) -> None:
    """Save the M3Model inside `state.model` to `out_dir` on rank 0; barrier on every rank.

    Under FSDP every rank first joins `summon_full_params` (a collective) so rank 0 sees whole tensors.
    `keep_periodic`: keep the `step-N` exports inside `out_dir` (the final export of ExportModel).
    `run_facts`: what the trainer knows for the model card (base model, data, recipe changes).
    """

    m3 = unwrap_m3(state.model)
    full_params = contextlib.nullcontext()
    if state.fsdp_enabled:
        from torch.distributed.fsdp import FullyShardedDataParallel
        full_params = FullyShardedDataParallel.summon_full_params(state.model, writeback=False, rank0_only=True)
    with full_params:
        if dist.get_global_rank() == 0:
            card = card_writer(state, run_facts)
            if keep_periodic:
                _save_keeping_periodic(m3, Path(out_dir), card)
            else:
                m3.save_pretrained(out_dir, extra_files=card)
            log.info("exported the model to %s", out_dir)
    dist.barrier()


class ExportModel(Callback):
    def __init__(self, export_dir: str, export_interval: str | None, run_facts: Optional[dict] = None):
        """`export_interval`: `callbacks.export_interval`, also export every N to `export_dir/step-N`
        (None: at the end only); `run_facts`: the model card's static facts (`training_facts`)."""
        self.export_dir = Path(export_dir)
        self.run_facts = run_facts
        # Composer's own interval rule (as for checkpoints): `ba`/`sp`/`tok` intervals fire at
        # BATCH_END when a multiple is crossed, `ep` intervals at EPOCH_END.
        self.due = (create_interval_scheduler(Time.from_timestring(export_interval), include_end_of_training=False,
                                              checkpoint_events=False) if export_interval else None)

    def _periodic(self, state: State, event: Event) -> None:
        if self.due is not None and self.due(state, event):
            export_model(state, self.export_dir / f"{PERIODIC_PREFIX}{int(state.timestamp.batch)}",
                         run_facts=self.run_facts)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._periodic(state, Event.BATCH_END)

    def epoch_end(self, state: State, logger: Logger) -> None:
        self._periodic(state, Event.EPOCH_END)

    def fit_end(self, state: State, logger: Logger) -> None:
        if preempted(state):        # not the final model: the resumed run exports it
            return
        export_model(state, self.export_dir, keep_periodic=True, run_facts=self.run_facts)
