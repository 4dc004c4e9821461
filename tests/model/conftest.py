"""Fixtures for the model tests: the reference model and batch of docs/recipe.md §Reference numbers
(hand-made ids), on which FlagEmbedding's losses were computed."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaModel

from m3composer.model.m3 import M3Model

RECIPE_SPECIAL_IDS = {"cls": 0, "pad": 1, "eos": 2, "unk": 3}
RECIPE_QUERY_IDS = [[0, 5, 6, 5, 2], [0, 7, 8, 2, 1]]
RECIPE_PASSAGE_IDS = [[0, 5, 9, 10, 6, 2], [0, 11, 12, 2, 1, 1], [0, 7, 8, 13, 2, 1], [0, 14, 3, 15, 16, 2]]
RECIPE_TEACHER = [[0.9, 0.1], [0.7, 0.6]]


def build_recipe_model() -> M3Model:
    """The reference model: torch seed 0, encoder first, then colbert and sparse heads (order matters)."""
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=32, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                           intermediate_size=8, max_position_embeddings=40, pad_token_id=1, type_vocab_size=1,
                           initializer_range=1.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = XLMRobertaModel(cfg, add_pooling_layer=False)
    colbert, sparse = nn.Linear(4, 4), nn.Linear(4, 1)
    return M3Model(encoder, colbert, sparse, pooling="cls", normalize=True, special_token_ids=RECIPE_SPECIAL_IDS)


def model_settings(**overrides) -> dict:
    """ComposerM3's settings as the run schema's defaults give them (`train.composer_model_settings`),
    without the group-size check, with `overrides` on top."""
    from m3composer.config import TrainConfig
    from m3composer.train import composer_model_settings
    return {**composer_model_settings(TrainConfig()), "train_group_size": None, **overrides}


def recipe_batch(queries=RECIPE_QUERY_IDS, passages=RECIPE_PASSAGE_IDS, teacher=RECIPE_TEACHER,
                 has_teacher=True, parallel=False) -> dict:
    q, p = torch.tensor(queries), torch.tensor(passages)
    return {"query_input_ids": q, "query_attention_mask": (q != 1).long(),
            "passage_input_ids": p, "passage_attention_mask": (p != 1).long(),
            "teacher_scores": torch.tensor(teacher, dtype=torch.float32),
            "has_teacher_scores": torch.tensor(has_teacher), "is_parallel": torch.tensor(parallel),
            "row_ids": torch.arange(len(queries))}


@pytest.fixture
def recipe_model() -> M3Model:
    return build_recipe_model().train()
