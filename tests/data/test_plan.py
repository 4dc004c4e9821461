"""m3composer/data/plan.py: the epoch plan is FlagEmbedding's refresh_epoch, reproducible per (seed, epoch, W)."""
from __future__ import annotations

import numpy as np
import pytest

from m3composer.data.index import StreamEntry
from m3composer.data.plan import group_streams, plan_epoch, steps_per_epoch


def _entry(name, rows, task=None, has_teacher_scores=False, is_parallel=False, bucket="len-0-500"):
    return StreamEntry(name=name, path=name, task=task or name.split("/")[0], bucket=bucket, rows=rows, is_parallel=is_parallel,
                       has_teacher_scores=has_teacher_scores, min_neg=1)


def _global_sizes(plan):
    return sorted(len(s.rows) for s in plan.steps)


def test_flagembedding_tail_rule_examples():
    # FlagEmbedding's own numbers (recipe.md §Tail rule): 23 rows, bs 3, W 2 -> chunks 6, 6, 6, 5; the chunk of 5
    # gives floor(5/2) = 2 rows per rank and 1 row sits out. 9 rows -> 6 kept, tail 3 < 2W dropped.
    plan = plan_epoch([23], [3], seed=0, epoch=0, world_size=2, tail="keep_if_ge_2W")
    assert _global_sizes(plan) == [4, 6, 6, 6]
    assert sorted(s.per_rank for s in plan.steps) == [2, 3, 3, 3]
    assert plan.left_out == [1]
    plan = plan_epoch([9], [3], seed=0, epoch=0, world_size=2, tail="keep_if_ge_2W")
    assert _global_sizes(plan) == [6] and plan.left_out == [3]


def test_drop_partial_keeps_full_global_batches_only():
    plan = plan_epoch([23, 9], [3, 3], seed=0, epoch=0, world_size=2, tail="drop_partial")
    assert _global_sizes(plan) == [6, 6, 6, 6]
    assert plan.left_out == [5, 3]


def test_single_rank_tail_needs_two_rows():
    # W = 1: a final chunk is kept when it has >= 2 rows (an in-batch loss needs another query).
    assert plan_epoch([7], [3], seed=0, epoch=0, world_size=1, tail="keep_if_ge_2W").left_out == [1]
    assert _global_sizes(plan_epoch([8], [3], seed=0, epoch=0, world_size=1, tail="keep_if_ge_2W")) == [2, 3, 3]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_step_is_one_group_rows_disjoint_and_accounted(world_size):
    rows, sizes = [23, 9, 17, 4], [3, 2, 4, 1]
    for epoch in range(3):
        plan = plan_epoch(rows, sizes, seed=11, epoch=epoch, world_size=world_size, tail="keep_if_ge_2W")
        seen = [[] for _ in rows]
        for step in plan.steps:
            assert len(step.rows) == step.per_rank * world_size
            assert step.per_rank <= sizes[step.group]
            slices = [step.rank_rows(r) for r in range(world_size)]
            assert all(len(s) == step.per_rank for s in slices)
            assert np.array_equal(np.concatenate(slices), step.rows)
            seen[step.group].extend(step.rows.tolist())
        for g, n in enumerate(rows):
            assert len(seen[g]) == len(set(seen[g])), "a row twice in one epoch"
            assert set(seen[g]) <= set(range(n))
            assert len(seen[g]) + plan.left_out[g] == n


def test_pure_function_of_seed_epoch_world_size():
    args = dict(group_rows=[23, 9, 17], per_device_batch_sizes=[3, 2, 4], tail="keep_if_ge_2W")
    a = plan_epoch(**args, seed=3, epoch=1, world_size=2)
    b = plan_epoch(**args, seed=3, epoch=1, world_size=2)
    assert [(s.group, s.rows.tolist()) for s in a.steps] == [(s.group, s.rows.tolist()) for s in b.steps]
    e0 = plan_epoch(**args, seed=3, epoch=0, world_size=2)
    other_seed = plan_epoch(**args, seed=4, epoch=1, world_size=2)
    for other in (e0, other_seed):
        assert [s.rows.tolist() for s in other.steps] != [s.rows.tolist() for s in a.steps]


def test_membership_and_group_order_change_between_epochs():
    e0 = plan_epoch([40, 40], [4, 4], seed=1, epoch=0, world_size=1, tail="keep_if_ge_2W")
    e1 = plan_epoch([40, 40], [4, 4], seed=1, epoch=1, world_size=1, tail="keep_if_ge_2W")
    batches = lambda plan: {(s.group, frozenset(s.rows.tolist())) for s in plan.steps}
    # the same rows are re-grouped: (almost) no batch of epoch 0 reappears in epoch 1
    assert len(batches(e0) & batches(e1)) <= 1
    assert [s.group for s in e0.steps] != [s.group for s in e1.steps]


def test_steps_per_epoch_matches_every_plan():
    rows, sizes = [23, 9, 1, 30], [3, 2, 2, 7]
    for tail in ("keep_if_ge_2W", "drop_partial"):
        for w in (1, 2, 4):
            n = steps_per_epoch(rows, sizes, world_size=w, tail=tail)
            assert all(len(plan_epoch(rows, sizes, seed=5, epoch=e, world_size=w, tail=tail)) == n
                       for e in range(3))


def test_samples_per_step_counts_queries_of_all_ranks():
    plan = plan_epoch([23], [3], seed=0, epoch=0, world_size=2, tail="keep_if_ge_2W")
    assert sorted(plan.samples_per_step().tolist()) == [4, 6, 6, 6]


def test_bad_tail_rule_is_refused():
    with pytest.raises(ValueError, match="tail"):
        plan_epoch([10], [2], seed=0, epoch=0, world_size=1, tail="keep_all")


def test_small_streams_merge_per_task_with_minimum_batch_size():
    # FlagEmbedding's data check (recipe.md §Reference numbers): W=2, default bs 3, small 6 / drop 8:
    # files of 23, 5 and 4 rows (5 and 4 merged to 9) and a parallel file of 9 rows -> global chunk
    # sizes {6, 5, 6, 6, 6, 6}.
    streams = [_entry("a/len-0-500", 23), _entry("a/len-500-1000", 5, bucket="len-500-1000"),
               _entry("a/len-1000-2000", 4, bucket="len-1000-2000"),
               _entry("parallel_b/len-0-500", 9, task="parallel_b", is_parallel=True, has_teacher_scores=True)]
    groups, dropped = group_streams(streams, [3, 4, 3, 3], small_threshold=6, drop_threshold=8)
    assert dropped == []
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"a/len-0-500", "a/small", "parallel_b/len-0-500"}
    merged = by_name["a/small"]
    assert merged.streams == (1, 2) and merged.rows == 9 and merged.per_device_batch_size == 3
    assert by_name["parallel_b/len-0-500"].is_parallel and by_name["parallel_b/len-0-500"].has_teacher_scores
    plan = plan_epoch([g.rows for g in groups], [g.per_device_batch_size for g in groups], seed=42, epoch=0,
                      world_size=2, tail="keep_if_ge_2W")
    # the chunk of 5 serves 2 rows per rank (4 rows); FlagEmbedding counts it as a chunk of 5
    assert sorted(len(s.rows) + (1 if len(s.rows) == 4 else 0) for s in plan.steps) == [5, 6, 6, 6, 6, 6]


def test_merged_group_below_drop_threshold_is_dropped_and_reported():
    streams = [_entry("a/x", 5), _entry("a/y", 4), _entry("b/x", 30, task="b"), _entry("c/x", 3, task="c")]
    groups, dropped = group_streams(streams, [3, 3, 3, 3], small_threshold=6, drop_threshold=8)
    assert [g.name for g in groups] == ["b/x", "a/small"]
    assert dropped == ["c/small"]          # 3 rows < 8: merged per task, so c is not joined with a


def test_merge_is_off_by_default_and_keeps_teacher_scores_apart():
    streams = [_entry("a/x", 5), _entry("a/y", 4, has_teacher_scores=True)]
    groups, _ = group_streams(streams, [3, 3], small_threshold=0, drop_threshold=0)
    assert [g.name for g in groups] == ["a/x", "a/y"]
    groups, _ = group_streams(streams, [3, 3], small_threshold=10, drop_threshold=0)
    assert sorted((g.name, g.has_teacher_scores) for g in groups) == [("a/small-noscores", False), ("a/small-scores", True)]
