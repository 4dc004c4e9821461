"""The *when* of the recipe's hooks: each module holds a plain function and the Algorithm calling it."""
from m3composer.algorithms.freeze_position_embeddings import FreezePositionEmbeddings, freeze_position_embeddings
from m3composer.algorithms.self_distill_warmup import SelfDistillWarmup, self_distill_active
from m3composer.algorithms.sparsity_warmup import SparsityWarmup, sparsity_scale

__all__ = ["FreezePositionEmbeddings", "freeze_position_embeddings", "SelfDistillWarmup", "self_distill_active",
           "SparsityWarmup", "sparsity_scale"]
