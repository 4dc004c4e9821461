"""m3composer/algorithms/self_distill_warmup.py: the switch follows the checkpointed timestamp."""
import torch
from composer import Trainer
from composer.core import DataSpec
from composer.models import ComposerModel

from m3composer.algorithms import SelfDistillWarmup


class Recorder(ComposerModel):
    """Records the self-distill switch at every forward (what the M3 loss would read)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.self_distill_on = None
        self.seen = []

    def forward(self, batch):
        self.seen.append(self.self_distill_on)
        return self.w * batch.sum()

    def loss(self, outputs, batch):
        return (outputs - 1).pow(2).sum()


def _fit(algorithm, steps, **kwargs):
    model = Recorder()
    trainer = Trainer(model=model, train_dataloader=DataSpec([torch.ones(2, 2)] * 10, get_num_samples_in_batch=lambda b: 2),
                      max_duration=f"{steps}ba", optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
                      algorithms=[algorithm], device="cpu", device_train_microbatch_size=2, progress_bar=False, log_to_console=False, **kwargs)
    trainer.fit()
    return model.seen


def test_switches_on_at_the_start_step():
    assert _fit(SelfDistillWarmup("3ba", mode="timestamp"), 6) == [False, False, False, True, True, True]


def test_bare_number_means_optimizer_batches_and_zero_means_always():
    assert _fit(SelfDistillWarmup("2", mode="timestamp"), 4) == [False, False, True, True]
    assert _fit(SelfDistillWarmup("0ba", mode="timestamp"), 2) == [True, True]


def test_forward_calls_mode_is_the_seeds_strict_rule():
    # seed: on iff forward calls so far > start; start=1 -> forwards #0 and #1 off, #2 on; -1 -> always
    assert _fit(SelfDistillWarmup(1, mode="forward_calls"), 4) == [False, False, True, True]
    assert _fit(SelfDistillWarmup(-1, mode="forward_calls"), 2) == [True, True]


def test_resume_switches_at_the_same_step(tmp_path):
    full = _fit(SelfDistillWarmup("4ba", mode="timestamp"), 6)
    _fit(SelfDistillWarmup("4ba", mode="timestamp"), 2, save_folder=str(tmp_path), save_interval="2ba", save_filename="ep{epoch}-ba{batch}.pt")
    resumed = _fit(SelfDistillWarmup("4ba", mode="timestamp"), 6, load_path=str(tmp_path / "ep0-ba2.pt"))
    assert resumed == full[2:] == [False, False, True, True]
