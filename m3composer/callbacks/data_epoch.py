"""The data epoch, set at epoch boundaries: FlagEmbedding calls this "data refresh" (`TrainerCallbackForDataRefresh`);
here "refresh" is kept for re-mining negatives (`NegativeRefresh`).

Composer never tells a dataset which epoch starts (it calls `set_epoch` only on a
DistributedSampler; docs/recipe.md §Epochs and set_epoch), so this Callback does: at
`EPOCH_START` the training dataset is set to the epoch, and it re-draws its plan — stream order,
batch membership, positives, negatives and text shuffles are all functions of (seed, epoch)
there, so the refresh is deterministic and resume-safe. `EPOCH_START` does not fire when a run
resumes mid-epoch; the dataset's `load_state_dict` has set the epoch then. After the load
(AFTER_LOAD) and at each EPOCH_START it has Composer read the epoch's length again: an epoch resumed
on another world size is longer or shorter than the others (docs/recipe.md §Elastic resume).

At `EPOCH_END` it checks the number of batches served against the plan: a store that keeps
failing can make Streaming yield a short or empty epoch without raising (docs/recipe.md
§Failing object store), and a short epoch must not pass silently.
"""
from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger


def _train_dataset(state: State):
    dataloader = state.train_dataloader
    return getattr(dataloader, "dataset", None)


def _reread_dataloader_len(state: State, subset_num_batches: int | None = None) -> None:
    """Composer reads len(dataloader) once, when the dataloader is set; an elastically resumed epoch
    has another length than the epochs after it (dataset.M3TrainDataset.__len__), so read it again
    (-1 makes Composer call len()). With `trainer.train_subset_num_batches` N an epoch is the first N
    steps of its plan (Composer's setter keeps the smaller of N and len())."""
    if state.dataloader is not None and state.dataloader is state.train_dataloader:
        state.dataloader_len = -1
        if subset_num_batches and (state.dataloader_len is None or subset_num_batches < int(state.dataloader_len)):
            state.dataloader_len = subset_num_batches


class DataEpoch(Callback):
    def __init__(self, subset_num_batches: int | None):
        """`subset_num_batches`: `trainer.train_subset_num_batches` (None: whole epochs)."""
        self.subset_num_batches = subset_num_batches

    def after_load(self, state: State, logger: Logger) -> None:
        _reread_dataloader_len(state, self.subset_num_batches)

    def epoch_start(self, state: State, logger: Logger) -> None:
        dataset = _train_dataset(state)
        if dataset is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(int(state.timestamp.epoch))
            _reread_dataloader_len(state, self.subset_num_batches)

    def epoch_end(self, state: State, logger: Logger) -> None:
        # Composer has already moved `timestamp` to the next epoch (batch_in_epoch 0) when EPOCH_END
        # fires; the epoch that just ended is `previous_timestamp`.
        ended = state.previous_timestamp if state.previous_timestamp is not None else state.timestamp
        expected = state.dataloader_len
        served = int(ended.batch_in_epoch)
        # A run that stops at max_duration mid-epoch never reaches EPOCH_END, so a full epoch is expected here.
        if expected is not None and served != int(expected):
            raise RuntimeError(
                f"epoch {int(ended.epoch)} served {served} batches but its plan has {int(expected)}: "
                "the data source ended early (an object store that keeps failing does this silently)")
        logger.log_metrics({"data/batches_in_epoch": served})
