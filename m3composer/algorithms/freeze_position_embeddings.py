"""Freeze the encoder's position embeddings (the recipe's `fix_position_embedding`).

BGE-M3 fine-tunes with the position table fixed: every parameter whose name contains
`position_embeddings` stops receiving updates (for XLM-R and BERT exactly
`embeddings.position_embeddings.weight`). Word and token-type embeddings stay trainable.

The function works without a Trainer. The Algorithm calls it at `Event.INIT`, which Composer
fires before it wraps the model in DDP, so DDP never registers the frozen tensor and no
unused-parameter error can come from it. Optimizers built before INIT still list the tensor;
that is harmless: torch optimizers skip parameters whose `.grad` is None, weight decay included
(docs/recipe.md §INIT before DDP). The trainer freezes only through this Algorithm
(`model.fix_position_embedding` adds it), as Composer's algorithms do: the function says what,
the Algorithm says when.
"""
from __future__ import annotations

import logging

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

log = logging.getLogger(__name__)


def freeze_position_embeddings(model: torch.nn.Module) -> list[str]:
    """Set `requires_grad=False` on every parameter named `*position_embeddings*`; return their names."""
    frozen = []
    for name, param in model.named_parameters():
        if "position_embeddings" in name:
            param.requires_grad_(False)
            param.grad = None
            frozen.append(name)
    if not frozen:
        raise ValueError("fix_position_embedding: the model has no parameter named '*position_embeddings*'")
    return frozen


class FreezePositionEmbeddings(Algorithm):
    """Runs :func:`freeze_position_embeddings` once, at `Event.INIT` (before the DDP wrap)."""

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        frozen = freeze_position_embeddings(state.model)
        log.info("fix_position_embedding: froze %s", ", ".join(frozen))
        logger.log_hyperparameters({"algorithms/frozen_parameters": frozen})
