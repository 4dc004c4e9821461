"""Preemption: SIGTERM or SIGUSR1 on any rank makes every rank save a checkpoint at the next step
boundary, and `Trainer.fit` return, so the process exits 0 and the same command resumes exactly.

Cloud schedulers send SIGTERM some seconds before they take a node; Slurm sends the signal that
`--signal=USR1@90` names. Without this, Composer's own SIGTERM handler exits with 143 at once and
everything since the last `save_interval` is lost.

How (docs/operations.md §Preemption and elastic resume):

* `Preemption` installs handlers for the signals at FIT_START (Python runs them in the main
  thread) that only record the signal: the step in flight finishes untouched. It puts the
  previous handlers back at `post_close`, once Composer has waited for the checkpoint uploads.
* At every BATCH_END the ranks agree on it: an all-reduce MAX of the recorded signal (one integer on
  the training device: gloo on CPU, NCCL on GPU). So a signal that reached one rank only (one node
  of many) stops all of them at the same step, and no rank waits in a collective for another.
* Once agreed it calls `State.stop_training()` (Composer sets `max_duration` to the current step;
  `max_duration` is not in the checkpoint, so the restart trains to the configured one), and
  `save_interval(...)`, the CheckpointSaver's interval, saves at this BATCH_CHECKPOINT. The
  checkpoint is an ordinary mid-epoch one (timestamp, optimizer, schedule, dataset position), the
  kind every resume test restores exactly.
* `preempted(state)` tells fit-end work (the final export, the final retrieval eval) to skip: the
  run is not finished, and the grace period is short.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption(Callback):
    """Checkpoint and stop at the next step boundary after SIGTERM/SIGUSR1 on any rank."""

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS):
        self.signals = tuple(signals)
        self.received = 0           # the signal number this process got (0: none)
        self.stopping = False       # the ranks agreed to stop: this step's checkpoint is the last
        self._previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        # A handler does as little as possible: the training loop acts at the next step boundary.
        self.received = int(signum)

    def fit_start(self, state: State, logger: Logger) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: fit() runs outside the main thread; SIGTERM/SIGUSR1 keep their handlers")
            return
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._record)

    def batch_end(self, state: State, logger: Logger) -> None:
        flag = state.device.tensor_to_device(torch.tensor([self.received], dtype=torch.int32))
        dist.all_reduce(flag, reduce_operation="MAX")
        agreed = int(flag.item())
        if agreed and not self.stopping:
            self.stopping = True
            log.warning("preemption: %s (on %s) after step %d: saving a checkpoint and stopping; the same "
                        "command resumes", signal.Signals(agreed).name,
                        "this rank" if self.received else "another rank", int(state.timestamp.batch))
            state.stop_training()

    def save_interval(self, interval: str) -> Callable[[State, Event], bool]:
        """The CheckpointSaver's `save_interval`: Composer's own rule for `interval`, and the step
        the ranks agreed to stop at."""
        every = create_interval_scheduler(interval)

        def due(state: State, event: Event) -> bool:
            return every(state, event) or (self.stopping and event == Event.BATCH_CHECKPOINT)

        return due

    def post_close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def preempted(state: State) -> bool:
    """Whether this fit is ending because of a preemption signal (fit-end work should skip)."""
    return any(isinstance(c, Preemption) and c.stopping for c in state.callbacks)
