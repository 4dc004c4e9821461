"""Reseed the random generators at every step from (seed, rank, step), so a resumed run draws the
same dropout masks as the uninterrupted one.

Composer checkpoints each rank's RNG state, but restores it only when a run resumes at the start
of an epoch or while it replays ("spins") the dataloader. Our dataset resumes itself from its
`state_dict` (no replay), so after a mid-epoch resume Composer never restores the RNG and the run
continues from `seed_all(seed)`: every dropout mask after the resume differs from the
uninterrupted run's, and so do the losses (measured: a difference of about 1 in the total loss from
the first resumed step of the tiny model).

`StepSeed` makes the randomness of step N a pure function of `(rank_zero_seed, global rank, N)`,
like everything else about a step (the data plan is a function of (seed, epoch, step)): at
`BATCH_START` it seeds `random`, `numpy` and `torch` (all devices) with a value derived from the
three. Nothing in the data pipeline draws from these global generators (negatives and shuffles use
their own seeded generators), so the only effect is on the model's own randomness (dropout).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


def step_seed(rank_zero_seed: int, rank: int, step: int) -> int:
    """A 32-bit seed (numpy's limit) from the run seed, the global rank and the optimizer step."""
    return int(np.random.SeedSequence([int(rank_zero_seed), int(rank), int(step)]).generate_state(1)[0])


def seed_step(seed: int) -> None:
    """`reproducibility.seed_all` without its INFO line (it would log once per step)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)   # every device, CUDA included


class StepSeed(Callback):
    def batch_start(self, state: State, logger: Logger) -> None:
        seed_step(step_seed(state.rank_zero_seed, dist.get_global_rank(), int(state.timestamp.batch)))
