"""m3composer/data/plan.py's shard-aware plan (data.plan: shard_blocks) and the default plan it
leaves alone: the default is bit for bit the plan of the code before the option; the shard-aware
plan keeps the step count, batch sizes, tail rule and one group per step, and draws each batch
within a block of shards, block after block."""
from __future__ import annotations

import numpy as np
import pytest

from m3composer.data.dataset import M3TrainDataset
from m3composer.data.plan import PLAN_STREAM, _chunk_sizes, plan_epoch, plan_epoch_shard_blocks
from tests.data.m3_tiny_data import StreamSpec, write_converted
from m3composer.testing.settings import dataset_settings

ROWS, SIZES = [97, 40, 13, 64], [4, 3, 2, 5]
SHARD_ROWS = [[7] * 13 + [6], [5] * 8, [3, 4, 6], [8] * 8]


def reference_plan(group_rows, sizes, *, seed, epoch, world_size, tail):
    """`plan_epoch` as it was before data.plan existed (one permutation per group, then of the steps)."""
    rng = np.random.default_rng([seed, PLAN_STREAM, epoch])
    steps, left = [], []
    for g, (rows, batch) in enumerate(zip(group_rows, sizes)):
        order, start = rng.permutation(rows), 0
        for size in _chunk_sizes(rows, batch, world_size, tail):
            steps.append((g, order[start:start + size], size // world_size))
            start += size
        left.append(rows - start)
    return [steps[i] for i in rng.permutation(len(steps))], left


@pytest.mark.parametrize("world_size,tail", [(1, "keep_if_ge_2W"), (2, "keep_if_ge_2W"), (3, "drop_partial")])
def test_the_default_plan_is_the_plan_before_the_option(world_size, tail):
    for epoch in (0, 1, 5):
        plan = plan_epoch(ROWS, SIZES, seed=11, epoch=epoch, world_size=world_size, tail=tail)
        steps, left = reference_plan(ROWS, SIZES, seed=11, epoch=epoch, world_size=world_size, tail=tail)
        assert plan.left_out == left and len(plan.steps) == len(steps)
        for got, (group, rows, per_rank) in zip(plan.steps, steps):
            assert (got.group, got.per_rank) == (group, per_rank)
            np.testing.assert_array_equal(got.rows, rows)


@pytest.mark.parametrize("world_size,block", [(1, 2), (2, 3), (3, 1)])
def test_shard_blocks_keep_the_steps_and_draw_each_batch_within_a_block(world_size, block):
    starts = [np.concatenate([[0], np.cumsum(s)]) for s in SHARD_ROWS]
    for epoch in (0, 1):
        plan = plan_epoch_shard_blocks(ROWS, SIZES, SHARD_ROWS, block_shards=block, seed=11, epoch=epoch,
                                       world_size=world_size, tail="keep_if_ge_2W")
        default = plan_epoch(ROWS, SIZES, seed=11, epoch=epoch, world_size=world_size, tail="keep_if_ge_2W")
        assert plan.left_out == default.left_out
        assert sorted((s.group, len(s.rows)) for s in plan.steps) == sorted((s.group, len(s.rows)) for s in default.steps)
        assert len({s.group for s in plan.steps[:len(ROWS) * 3]}) > 1        # groups interleaved
        for g in range(len(ROWS)):
            mine = [s for s in plan.steps if s.group == g]
            rows = np.concatenate([s.rows for s in mine])
            assert len(set(rows.tolist())) == len(rows) == ROWS[g] - plan.left_out[g]
            shard_of = np.searchsorted(starts[g], np.arange(ROWS[g]), side="right") - 1
            # block number of every shard, from the order in which the group's steps reach them
            first_seen = list(dict.fromkeys(shard_of[rows].tolist()))
            block_of = {s: i // block for i, s in enumerate(first_seen)}
            previous = 0
            for step in mine:       # each batch: a run of consecutive blocks, starting where the last ended
                blocks = sorted({block_of[s] for s in shard_of[step.rows].tolist()})
                assert blocks[0] >= previous and blocks == list(range(blocks[0], blocks[-1] + 1))
                previous = blocks[-1]
    a = plan_epoch_shard_blocks(ROWS, SIZES, SHARD_ROWS, block_shards=block, seed=11, epoch=0, world_size=world_size,
                                tail="keep_if_ge_2W")
    b = plan_epoch_shard_blocks(ROWS, SIZES, SHARD_ROWS, block_shards=block, seed=11, epoch=1, world_size=world_size,
                                tail="keep_if_ge_2W")
    assert any(not np.array_equal(x.rows, y.rows) for x, y in zip(a.steps, b.steps))   # re-drawn per epoch
    with pytest.raises(ValueError, match="do not add up"):
        plan_epoch_shard_blocks(ROWS, SIZES, [[1]] * 4, block_shards=2, seed=1, epoch=0, world_size=1,
                                tail="keep_if_ge_2W")


def test_the_dataset_reads_the_shard_aware_plan_and_refuses_to_resume_across_plans(tmp_path):
    data = write_converted(tmp_path / "mds", [StreamSpec("t1", "len-0-500", 40), StreamSpec(
        "t2", "len-0-500", 30, first_row_id=1000)], size_limit=1 << 10)
    args = dict(train_group_size=4, default_batch_size=4, seed=2, world_size=2, query_max_len=16, passage_max_len=16)
    default = M3TrainDataset(str(data), **dataset_settings(rank=0, **args))
    np.testing.assert_array_equal(default.plan(0).steps[0].rows, plan_epoch(
        [40, 30], [4, 4], seed=2, epoch=0, world_size=2, tail="keep_if_ge_2W").steps[0].rows)
    ranks = [M3TrainDataset(str(data), **dataset_settings(rank=r, plan="shard_blocks", plan_block_shards=2, **args))
             for r in (0, 1)]
    assert len(ranks[0]) == len(default)
    for b0, b1 in zip(*ranks, strict=True):
        tasks = {int(r) // 1000 for r in b0["row_ids"].tolist() + b1["row_ids"].tolist()}
        assert len(tasks) == 1                              # same-task batches on both ranks
    state = ranks[0].state_dict(int(ranks[0].plan(0).samples_per_step()[:2].sum()), True)
    assert state["plan"] == "shard_blocks/2"
    with pytest.raises(ValueError, match="plan"):
        default.load_state_dict(state)
