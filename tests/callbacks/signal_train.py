"""Test-only: `scripts/train.py` with a callback that sends a signal to its own process, so the
preemption tests signal a chosen rank at a chosen step deterministically. Not part of the package.

    composer -n 2 tests/callbacks/signal_train.py STEP SIGNAL RANK RECIPE.yaml [key=value ...]

sends SIGNAL (e.g. SIGTERM, SIGUSR1) to global rank RANK at BATCH_START of step STEP (0-based), in
the middle of the step, as a scheduler's signal would arrive.
"""
from __future__ import annotations

import os
import signal
import sys

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


class SignalAt(Callback):
    def __init__(self, step: int, signum: int, rank: int):
        self.step, self.signum, self.rank = step, signum, rank

    def batch_start(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.step and dist.get_global_rank() == self.rank:
            os.kill(os.getpid(), self.signum)


def with_signal(step: int, signum: int, rank: int):
    """Patch m3composer.train.build_callbacks to add SignalAt; returns the undo function."""
    import m3composer.train as train

    original = train.build_callbacks

    def build_callbacks(*args, **kwargs):
        return [*original(*args, **kwargs), SignalAt(step, signum, rank)]

    train.build_callbacks = build_callbacks
    return lambda: setattr(train, "build_callbacks", original)


if __name__ == "__main__":
    step, name, rank = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    with_signal(step, signal.Signals[name], rank)
    from m3composer.train import main

    main(sys.argv[4:])
