"""The lexical-sparsity regulariser's warm-up (docs/recipe.md §Sparsity control).

The regulariser's weights (`loss.sparsity.query_weight`, `passage_weight`) ramp up quadratically
from 0 over `loss.sparsity.warmup`, as SPLADE's: scale `min(1, t / warmup)²` (`losses.
sparsity_warmup_scale`). A strong regulariser at step 0 would zero the lexical weights before the
contrastive terms have shaped them; the ramp lets the ranking form first.

As with SelfDistillWarmup, the scale is derived from `state.timestamp` (checkpointed), so a resumed
run continues the ramp at the same step; the switch is the model's `sparsity_scale` attribute and
the loss stays a pure function.
"""
from __future__ import annotations

from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from m3composer.losses import SPARSITY_REGULARIZERS, sparsity_warmup_scale

__all__ = ["SPARSITY_REGULARIZERS", "SparsityWarmup", "sparsity_scale"]


def sparsity_scale(state: State, warmup: Time) -> float:
    """The regulariser's scale for the batch about to run: `min(1, elapsed / warmup)²`."""
    if warmup.unit == TimeUnit.DURATION:
        elapsed = state.get_elapsed_duration()
        return sparsity_warmup_scale(0.0 if elapsed is None else float(elapsed.value), float(warmup.value))
    return sparsity_warmup_scale(float(state.timestamp.get(warmup.unit).value), float(warmup.value))


class SparsityWarmup(Algorithm):
    """Sets `model.sparsity_scale` at every `BATCH_START` from the (checkpointed) timestamp."""

    def __init__(self, warmup: str):
        self.warmup = Time.from_timestring(warmup)

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BATCH_START

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = getattr(state.model, "module", state.model)
        model.sparsity_scale = sparsity_scale(state, self.warmup)
        logger.log_metrics({"algorithms/sparsity_scale": model.sparsity_scale})
