"""Process-group teardown on torch 2.7's gloo (docs/recipe.md §Process-group teardown).

A gloo worker thread drops its last reference to a finished collective a little after the
collective has returned. If Python has already let go of the collective's tensors, freeing them
needs the GIL, while `~ProcessGroupGloo` (run by `destroy_process_group`) joins that thread with
the GIL held: the process hangs (or, when the group dies in interpreter finalisation, aborts with
"terminate called without an active exception"). Each rank here opens and tears down a group
TRIALS times, each time right after collectives whose tensors Python dropped at once, as the
project's gathers and Composer's `all_gather_object` do. With a plain `destroy_process_group` in
place of `distributed.shutdown` about half the trials hang on this 2-core machine, so the test
fails with every rank's stack; `distributed.shutdown` never does.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from m3composer import distributed
from tests.test_distributed import WORLD, spawn_ranks

TRIALS = 20


def _worker(rank: int, port: int, out_dir: str) -> None:
    from composer.utils import dist as composer_dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    finished = []
    for trial in range(TRIALS):
        store = dist.FileStore(os.path.join(out_dir, f"store{trial}"), WORLD)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=30))
        for _ in range(10):
            distributed.gather_no_grad(torch.full((256,), float(rank)))      # the output list dropped at once
        composer_dist.all_gather_object({"rank": rank, "trial": trial})
        distributed.shutdown()
        assert not dist.is_initialized()
        distributed.shutdown()                                                # without a group: a no-op
        finished.append(trial)
    torch.save({"finished": torch.tensor(finished)}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_a_group_torn_down_right_after_collectives_never_hangs(tmp_path):
    for result in spawn_ranks(_worker, tmp_path, timeout_s=120):
        assert result["finished"].tolist() == list(range(TRIALS))

