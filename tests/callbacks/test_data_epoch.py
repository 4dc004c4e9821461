"""DataEpoch (m3composer/callbacks/data_epoch.py) in real Composer runs over 2 epochs.

The synthetic streams of tests/data/m3_tiny_data.py encode the row and passage number in the
token ids, so a recorded batch says which rows and which negatives were drawn. A dummy model keeps
the runs to a second.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from composer import Callback, Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from m3composer.callbacks.data_epoch import DataEpoch
from m3composer.data.collate import make_data_spec
from m3composer.data.dataset import M3TrainDataset
from tests.data.m3_tiny_data import Dummy, StreamSpec, write_converted
from m3composer.testing.settings import dataset_settings

SPECS = [StreamSpec("t1", "len-0-500", 12, num_pos=1, num_neg=6),
         StreamSpec("t1", "len-500-1000", 8, num_pos=1, num_neg=6, first_row_id=1000, bucket_hi=1000)]


class Record(Callback):
    """(epoch, row ids, (kind, row, passage number) of every drawn passage) per step."""

    def __init__(self):
        self.steps = []

    def after_dataloader(self, state, logger):
        b = state.batch
        self.steps.append((int(state.timestamp.epoch), b["row_ids"].tolist(),
                           b["passage_input_ids"][:, 1:4].tolist()))


def _as_record(epoch: int, batch: dict):
    return epoch, batch["row_ids"].tolist(), batch["passage_input_ids"][:, 1:4].tolist()


def _dataset(data, cls=M3TrainDataset) -> M3TrainDataset:
    return cls(str(data), **dataset_settings(train_group_size=3, default_batch_size=2, seed=11, query_max_len=16,
                                             passage_max_len=16))


def _fit(dataset, callbacks, max_duration="2ep", loggers=()):
    model = Dummy()
    trainer = Trainer(model=model, train_dataloader=make_data_spec(DataLoader(dataset, batch_size=None)),
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.0), max_duration=max_duration,
                      device="cpu", device_train_microbatch_size=dataset.max_per_device_batch_size,
                      callbacks=list(callbacks), loggers=list(loggers), progress_bar=False, seed=3)
    try:
        trainer.fit()
    finally:
        trainer.close()


@pytest.fixture
def data(tmp_path):
    return write_converted(tmp_path / "mds", SPECS)


def test_epoch_boundary_redraws_negatives_and_order(data):
    dataset = _dataset(data)
    steps = len(dataset)                      # 12 / 2 + 8 / 2 = 10 steps per epoch on one rank
    assert steps == 10
    record, memory = Record(), InMemoryLogger()
    _fit(dataset, [DataEpoch(None), record], loggers=[memory])

    epoch0, epoch1 = record.steps[:steps], record.steps[steps:]
    assert [e for e, _, _ in record.steps] == [0] * steps + [1] * steps
    # epoch 1 is exactly the plan of epoch 1 (a pure function of seed and epoch) ...
    fresh = _dataset(data)
    assert epoch1 == [_as_record(1, fresh.batch(1, s)) for s in range(steps)]
    # ... which orders the rows differently and draws other negatives for the same rows
    assert [rows for _, rows, _ in epoch0] != [rows for _, rows, _ in epoch1]

    def negatives_by_row(epoch_steps):
        out = {}
        for _, rows, passages in epoch_steps:
            group = len(passages) // len(rows)
            for i, row in enumerate(rows):
                out[row] = sorted(tuple(p) for p in passages[i * group:(i + 1) * group] if p[0] == 12)
        return out

    before, after = negatives_by_row(epoch0), negatives_by_row(epoch1)
    assert before.keys() == after.keys() == set(range(12)) | set(range(1000, 1008))
    changed = sum(before[row] != after[row] for row in before)
    # 2 of 6 negatives per draw: the same pair twice has probability 1/15 per row
    assert changed >= len(before) // 2, changed
    # both full epochs passed the end-of-epoch check and were logged
    assert [v for _, v in memory.data["data/batches_in_epoch"]] == [steps, steps]


def test_without_the_callback_the_second_epoch_repeats_the_first(data):
    record = Record()
    _fit(_dataset(data), [record])
    half = len(record.steps) // 2
    assert [r[1:] for r in record.steps[:half]] == [r[1:] for r in record.steps[half:]]


class ShortDataset(M3TrainDataset):
    """A store that stops answering: 3 of the planned batches, then the iterator ends quietly."""

    def __iter__(self):
        return itertools.islice(super().__iter__(), 3)


def test_a_short_epoch_raises_at_epoch_end(data):
    dataset = _dataset(data, ShortDataset)
    with pytest.raises(RuntimeError, match=r"epoch 0 served 3 batches but its plan has 10"):
        _fit(dataset, [DataEpoch(None)])
