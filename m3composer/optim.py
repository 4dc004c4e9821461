"""The optimizer policy of the recipe (docs/recipe.md §Optimizer and schedule): AdamW over the
trainable parameters, no weight decay on biases and LayerNorm weights, and heads the model folder
did not have at a multiple of the learning rate.

The settings are the `optimizer` section of the run schema (m3composer/config.py); they have no
default here. `train.build_optimizer` passes them.
"""
from __future__ import annotations

import torch

from m3composer.model.inference import unwrap_m3

# transformers' own rule: no weight decay on biases and LayerNorm weights (docs/recipe.md §Optimizer and schedule).
NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight")


def decay_groups(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> list[dict]:
    """Two parameter groups at `lr`: the decayed parameters, then those transformers never decays."""
    no_decay = [any(m in name for m in NO_DECAY_MARKERS) for name, _ in named]
    return [{"params": [p for (_, p), nd in zip(named, no_decay) if not nd], "weight_decay": weight_decay, "lr": lr},
            {"params": [p for (_, p), nd in zip(named, no_decay) if nd], "weight_decay": 0.0, "lr": lr}]


def parameter_groups(model: torch.nn.Module, *, lr: float, weight_decay: float,
                     new_head_lr_multiplier: float) -> list[dict]:
    """The trainable parameters in decay groups; heads the model folder did not have (an idf-fitted
    sparse head included: 1× measured no better, recipe.md §A fresh sparse head) in groups of their
    own at `lr × new_head_lr_multiplier`. Frozen parameters (heads `loss.heads` leaves out) are left
    out, so they have no optimizer state."""
    m3 = unwrap_m3(model)
    head_ids = set()
    if new_head_lr_multiplier != 1.0:
        linears = {"sparse": m3.sparse_linear, "colbert": m3.colbert_linear}
        head_ids = {id(p) for head in m3.fresh_heads for p in linears[head].parameters()}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = decay_groups([(n, p) for n, p in trainable if id(p) not in head_ids], lr, weight_decay)
    heads = [(n, p) for n, p in trainable if id(p) in head_ids]
    if heads:
        groups += decay_groups(heads, lr * new_head_lr_multiplier, weight_decay)
    return groups


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
          new_head_lr_multiplier: float) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`."""
    groups = parameter_groups(model, lr=lr, weight_decay=weight_decay, new_head_lr_multiplier=new_head_lr_multiplier)
    # fused: one kernel over all tensors (CPU and CUDA), same update rule as the default per-tensor
    # loop and several times faster on CPU (BENCHMARKS.md §Training, "What was changed").
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
