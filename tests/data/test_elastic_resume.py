"""Elastic resume (plan.plan_epoch's `history`, M3TrainDataset.load_state_dict at another world size):
an epoch stopped after k steps at world size W and continued at W' trains every row its plan still
had once, and no row twice; later epochs are planned normally at W'."""
from __future__ import annotations

import pytest

from m3composer.data.dataset import M3TrainDataset
from m3composer.data.plan import plan_epoch, steps_per_epoch
from tests.data.m3_tiny_data import RESUME_SPECS, RESUME_TABLE, write_converted
from m3composer.testing.settings import dataset_settings

ROWS, SIZES = [23, 9, 17, 4], [3, 2, 4, 1]


def _as_lists(steps) -> list[tuple[int, list[int], int]]:
    return [(s.group, s.rows.tolist(), s.per_rank) for s in steps]


def _rows_by_group(steps, groups: int) -> list[list[int]]:
    seen: list[list[int]] = [[] for _ in range(groups)]
    for step in steps:
        seen[step.group].extend(step.rows.tolist())
    return seen


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("tail", ["keep_if_ge_2W", "drop_partial"])
def test_resumed_plan_keeps_the_done_steps_and_plans_each_remaining_row_once(old, new, tail):
    before = plan_epoch(ROWS, SIZES, seed=3, epoch=2, world_size=old, tail=tail)
    for done in (0, 1, len(before) // 2, len(before)):
        after = plan_epoch(ROWS, SIZES, seed=3, epoch=2, world_size=new, tail=tail, history=[(old, done)])
        assert after.first_step_at_world_size == done
        assert _as_lists(after.steps[:done]) == _as_lists(before.steps[:done])
        for step in after.steps[done:]:
            assert len(step.rows) == step.per_rank * new and step.per_rank <= SIZES[step.group]
        planned_before = _rows_by_group(before.steps, len(ROWS))
        done_rows = _rows_by_group(before.steps[:done], len(ROWS))
        new_rows = _rows_by_group(after.steps[done:], len(ROWS))
        for g in range(len(ROWS)):
            trained = done_rows[g] + new_rows[g]
            assert len(trained) == len(set(trained)), "a row twice in one epoch"
            still_had = set(planned_before[g]) - set(done_rows[g])
            assert set(new_rows[g]) <= still_had, "a row the plan had left out, or one already trained"
            # what the new world size leaves out of the rest is one tail: fewer rows than a global batch
            assert len(still_had) - len(new_rows[g]) < SIZES[g] * new
            assert after.left_out[g] == ROWS[g] - len(trained)
        assert sum(after.samples_per_step()) == sum(len(rows) for rows in done_rows + new_rows)


def test_two_resumes_in_one_epoch_and_the_plan_is_a_pure_function():
    history = [(2, 3), (1, 7)]
    a = plan_epoch(ROWS, SIZES, seed=3, epoch=0, world_size=3, history=history, tail="keep_if_ge_2W")
    b = plan_epoch(ROWS, SIZES, seed=3, epoch=0, world_size=3, history=history, tail="keep_if_ge_2W")
    assert _as_lists(a.steps) == _as_lists(b.steps)
    once = plan_epoch(ROWS, SIZES, seed=3, epoch=0, world_size=1, history=history[:1], tail="keep_if_ge_2W")
    assert _as_lists(a.steps[:7]) == _as_lists(once.steps[:7])
    trained = _rows_by_group(a.steps, len(ROWS))
    assert all(len(rows) == len(set(rows)) for rows in trained)
    with pytest.raises(ValueError, match="steps done"):
        plan_epoch(ROWS, SIZES, seed=3, epoch=0, world_size=3, history=[(2, 5), (1, 4)], tail="keep_if_ge_2W")


# ---- the dataset: 2 -> 1 and 1 -> 2 ranks over a whole epoch ---------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_converted(tmp_path_factory.mktemp("elastic") / "mds", RESUME_SPECS)


def _datasets(data, world_size: int) -> list[M3TrainDataset]:
    return [M3TrainDataset(str(data), world_size=world_size, rank=r, **dataset_settings(
        train_group_size=4, default_batch_size=2, batch_size_table=RESUME_TABLE, seed=5, query_max_len=16,
        passage_max_len=16))
            for r in range(world_size)]


def _serve(ranks: list[M3TrainDataset], steps: int | None = None) -> tuple[list[int], int]:
    """Row ids of every rank's batches, for `steps` steps (all when None); and the global queries served."""
    iterators = [iter(ds) for ds in ranks]
    rows, samples, served = [], 0, 0
    while steps is None or served < steps:
        batches = [next(it, None) for it in iterators]
        if batches[0] is None:
            assert all(b is None for b in batches), "ranks disagree on the epoch's length"
            break
        for b in batches:
            rows += b["row_ids"].tolist()
            samples += len(b["row_ids"])
        served += 1
    return rows, samples


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2)])
def test_dataset_resumed_on_another_world_size_trains_each_planned_row_of_the_epoch_once(data, old, new):
    epoch = 1
    before = _datasets(data, old)
    for ds in before:
        ds.set_epoch(epoch)
    whole_epoch_rows, _ = _serve(_datasets_at_epoch(data, old, epoch))
    k = len(before[0]) // 2
    done_rows, samples = _serve(before, k)
    state = before[0].state_dict(samples, True)
    assert (state["epoch"], state["step"], state["world_size"]) == (epoch, k, old)

    after = _datasets(data, new)
    for ds in after:
        ds.load_state_dict(state)
    expected_len = len(plan_epoch([g.rows for g in after[0].groups], [g.per_device_batch_size for g in after[0].groups],
                                  seed=5, epoch=epoch, world_size=new, history=[(old, k)], tail="keep_if_ge_2W"))
    assert len(after[0]) == expected_len and after[0].epoch == epoch
    rest_rows, rest_samples = _serve(after)
    trained = done_rows + rest_rows
    assert len(trained) == len(set(trained)), "a row trained twice in the epoch"
    assert set(trained) <= set(whole_epoch_rows), "a row the epoch's plan had left out"
    # Rows the new world size's tail rule leaves out: at most one short tail per group.
    skipped = set(whole_epoch_rows) - set(trained)
    assert len(skipped) < sum(g.per_device_batch_size * new for g in after[0].groups)
    assert sum(after[0].left_out(epoch).values()) == sum(g.rows for g in after[0].groups) - len(trained)
    # Composer's count: the position after the resumed epoch is its last step
    end = after[0].state_dict(samples + rest_samples, True)
    assert end["step"] == len(after[0]) and end["history"] == [[old, k]]

    # a checkpoint of the resumed epoch, restored at the same world size, goes on identically
    mid = after[0].state_dict(samples + int(after[0].plan(epoch).samples_per_step()[k:k + 1].sum()), True)
    again = _datasets(data, new)
    for ds in again:
        ds.load_state_dict(mid)
    assert _serve(again)[0] == _serve_from(after, k + 1)

    # the next epoch is an ordinary one at the new world size
    for ds in after:
        ds.set_epoch(epoch + 1)
    normal = steps_per_epoch([g.rows for g in after[0].groups], [g.per_device_batch_size for g in after[0].groups],
                             world_size=new, tail="keep_if_ge_2W")
    assert len(after[0]) == normal == after[0].steps_per_epoch
    assert _serve(after)[0] == _serve(_datasets_at_epoch(data, new, epoch + 1))[0]


def _datasets_at_epoch(data, world_size: int, epoch: int) -> list[M3TrainDataset]:
    ranks = _datasets(data, world_size)
    for ds in ranks:
        ds.set_epoch(epoch)
    return ranks


def _serve_from(ranks: list[M3TrainDataset], step: int) -> list[int]:
    """Row ids of the steps from `step` on, read directly (M3TrainDataset.batch) on each rank."""
    return [r for s in range(step, len(ranks[0])) for ds in ranks
            for r in ds.batch(ds.epoch, s)["row_ids"].tolist()]

