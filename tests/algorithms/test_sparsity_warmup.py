"""m3composer/algorithms/sparsity_warmup.py: the regulariser's scale follows the checkpointed timestamp."""
import pytest
import torch
from composer import Trainer
from composer.core import DataSpec
from composer.loggers import InMemoryLogger

from m3composer.algorithms import SparsityWarmup
from tests.algorithms.test_self_distill_warmup import Recorder


class ScaleRecorder(Recorder):
    """Records the regulariser's scale at every forward (what the M3 loss would read)."""

    def __init__(self):
        super().__init__()
        self.sparsity_scale = 1.0

    def forward(self, batch):
        self.seen.append(self.sparsity_scale)
        return self.w * batch.sum()


def _fit(algorithm, steps, **kwargs):
    model = ScaleRecorder()
    logger = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=DataSpec([torch.ones(2, 2)] * 8, get_num_samples_in_batch=lambda b: 2),
                      max_duration=f"{steps}ba", optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
                      algorithms=[algorithm], device="cpu", device_train_microbatch_size=2, progress_bar=False,
                      log_to_console=False, loggers=[logger], **kwargs)
    trainer.fit()
    return model.seen, [v for _, v in logger.data["algorithms/sparsity_scale"]]


def test_scale_ramps_quadratically_over_the_warmup_in_batches():
    seen, logged = _fit(SparsityWarmup("4ba"), 6)
    assert seen == pytest.approx([0.0, 1 / 16, 4 / 16, 9 / 16, 1.0, 1.0])
    assert logged == pytest.approx(seen)


def test_zero_warmup_is_full_weight_and_a_fraction_of_the_run_works():
    assert _fit(SparsityWarmup("0ba"), 3)[0] == [1.0, 1.0, 1.0]
    # 0.5dur of an 8-batch run = 4 batches
    assert _fit(SparsityWarmup("0.5dur"), 8)[0] == pytest.approx([0, 1 / 16, 4 / 16, 9 / 16, 1, 1, 1, 1])


def test_resume_continues_the_ramp_at_the_same_step(tmp_path):
    full, _ = _fit(SparsityWarmup("4ba"), 6)
    _fit(SparsityWarmup("4ba"), 2, save_folder=str(tmp_path), save_interval="2ba", save_filename="ep{epoch}-ba{batch}.pt")
    resumed, _ = _fit(SparsityWarmup("4ba"), 6, load_path=str(tmp_path / "ep0-ba2.pt"))
    assert resumed == pytest.approx(full[2:]) and resumed == pytest.approx([4 / 16, 9 / 16, 1.0, 1.0])
