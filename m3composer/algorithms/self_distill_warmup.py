"""Self-distillation switches on after `self_distill_start_step` (docs/recipe.md §Self-distillation).

FlagEmbedding keeps a forward-call counter on the model: it counts micro-batches per process and
restarts at 0 on resume, so a resumed run switches self-distillation on late. Here the decision
is derived from `state.timestamp`, which Composer checkpoints (it saves an Algorithm's attributes
only as a repr: recipe.md §Algorithm state), so a resumed run switches at exactly the same
optimizer step.

The start and the mode are the run schema's `loss.self_distill_start_step` and
`loss.self_distill_mode` (defaults there, m3composer/config.py).

* `mode="timestamp"`: on iff `state.timestamp.get(unit) >= start`, with `start` a
  Composer time string (`"6000ba"`, `"2ep"`, `"0ba"` = from the first step). A bare integer
  string means optimizer batches.
* `mode="forward_calls"` (parity with FlagEmbedding): on iff the number of training forward calls
  made before this batch is `> start` (strict, as FlagEmbedding; `-1` = always on, `1` = off for the
  first two forwards). m3composer runs one forward per optimizer step (the device batch is one
  micro-batch), so the count is the timestamp's batch count; derived, not kept in an attribute,
  it survives a resume — the one place we deliberately differ from FlagEmbedding's counter.

The switch itself is the model's `self_distill_on` attribute; the loss stays a pure function.
"""
from __future__ import annotations

from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger


def parse_start(start: str | int) -> Time:
    """`"6000"`/`6000` -> 6000 optimizer batches; `"2ep"`, `"500ba"` as Composer time strings."""
    text = str(start).strip()
    if text.lstrip("-").isdigit():
        return Time(int(text), TimeUnit.BATCH)
    return Time.from_timestring(text)


SELF_DISTILL_MODES = ("timestamp", "forward_calls")


def self_distill_active(state: State, start: Time, mode: str) -> bool:
    """Whether the self-distillation term is on for the batch about to run."""
    if mode == "timestamp":
        return state.timestamp.get(start.unit).value >= start.value
    if mode == "forward_calls":
        if start.unit != TimeUnit.BATCH:
            raise ValueError("self_distill_start_step in forward_calls mode must be a number of micro-batches")
        # The whole device batch is one micro-batch (the contrastive loss needs it), so the
        # forward calls made before this batch equal the optimizer batches done.
        return int(state.timestamp.batch) > start.value
    raise ValueError(f"unknown self-distill mode {mode!r}: expected 'timestamp' or 'forward_calls'")


class SelfDistillWarmup(Algorithm):
    """Sets `model.self_distill_on` at every `BATCH_START` from the (checkpointed) timestamp."""

    def __init__(self, self_distill_start_step: str | int, *, mode: str):
        self.start = parse_start(self_distill_start_step)
        self.mode = mode
        if mode not in SELF_DISTILL_MODES:
            raise ValueError(f"unknown self-distill mode {mode!r}: expected 'timestamp' or 'forward_calls'")

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BATCH_START

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = getattr(state.model, "module", state.model)
        on = self_distill_active(state, self.start, self.mode)
        if on != getattr(model, "self_distill_on", None):
            logger.log_metrics({"algorithms/self_distill_on": float(on)})
        model.self_distill_on = on
