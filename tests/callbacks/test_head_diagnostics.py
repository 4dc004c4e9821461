"""HeadDiagnostics: the sparse head's weights and every gradient norm, logged each step."""
import pytest
import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.core import DataSpec
from composer.loggers import InMemoryLogger

from m3composer.callbacks.head_diagnostics import HeadDiagnostics, lexical_cost_stats, token_weight_stats
from m3composer.model.composer_model import ComposerM3
from m3composer.model.m3 import M3Model
from tests.model.conftest import model_settings
from tests.model.test_composer_model import text_batch


def test_token_stats_by_hand():
    # vocabulary of 8 ids; 0, 1, 2 are special. Query 0 = [0, 5, 6, 2]; its positive (row 0) = [0, 5, 7, 2, 1(pad)]
    batch = {"query_input_ids": torch.tensor([[0, 5, 6, 2]]), "query_attention_mask": torch.tensor([[1, 1, 1, 1]]),
             "passage_input_ids": torch.tensor([[0, 5, 7, 2, 1], [0, 6, 2, 1, 1]]),
             "passage_attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}
    q = torch.zeros(1, 8)
    q[0, 5], q[0, 6] = 0.5, 0.0             # token 6 has weight 0
    p = torch.zeros(2, 8)
    p[0, 5], p[0, 7], p[1, 6] = 2.0, 0.3, 0.1
    stats = token_weight_stats(q, p, batch, group_size=2, special_ids={0, 1, 2})
    # non-special tokens: query 5 (0.5), 6 (0); passage 0: 5 (2.0), 7 (0.3); passage 1: 6 (0.1) -> 1 of 5 is zero
    assert stats["heads/sparse/zero_weight_share"] == pytest.approx(1 / 5)
    # the query shares only token 5 with its positive: sqrt(0.5 * 2.0) = 1
    assert stats["heads/sparse/shared_token_weight"] == pytest.approx(1.0)
    # non-zero terms: the query has 1 (token 5), the passages 2 and 1; expected dot-product cost
    # Σ_t p_q(t)·p_d(t) = p_q(5)·p_d(5) = 1 · 1/2
    assert lexical_cost_stats(q, p) == pytest.approx({"heads/sparse/nonzero_per_query": 1.0,
                                                      "heads/sparse/nonzero_per_passage": 1.5,
                                                      "heads/sparse/expected_flops": 0.5})


def test_logged_each_step_before_clipping(tiny_dir, tokenizer):
    torch.manual_seed(0)
    model = ComposerM3(M3Model.from_pretrained(tiny_dir), **model_settings(train_group_size=2))
    batch = text_batch(tokenizer, 4, 2)
    spec = DataSpec([batch, batch, batch], split_batch=lambda b, size: [b],
                    get_num_samples_in_batch=lambda b: b["query_input_ids"].shape[0])
    logger = InMemoryLogger()
    Trainer(model=model, train_dataloader=spec, optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
            max_duration="3ba", device_train_microbatch_size=4, loggers=[logger], progress_bar=False, device="cpu",
            callbacks=[HeadDiagnostics(max_grad_norm=0.1)],
            algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=0.1)]).fit()
    data = {k: [float(v) for _, v in points] for k, points in logger.data.items()}
    for name in ("heads/sparse/weight_norm", "heads/sparse/zero_weight_share", "heads/sparse/shared_token_weight",
                 "grad_norm/encoder", "grad_norm/sparse_head", "grad_norm/colbert_head", "grad_norm/total",
                 "grad_norm/clip_scale", "heads/sparse/nonzero_per_query", "heads/sparse/nonzero_per_passage",
                 "heads/sparse/expected_flops"):
        assert len(data[name]) == 3, name
    # each step's count is the batch's: at most its distinct non-special tokens per text
    assert all(0 < v <= batch["passage_attention_mask"].sum(1).max() for v in data["heads/sparse/nonzero_per_passage"])
    assert all(0 <= v <= 1 for v in data["heads/sparse/zero_weight_share"])
    # norms are of the unclipped gradients: the total is the norm of the parts, and above the 0.1 clip
    for enc, sp, col, total in zip(data["grad_norm/encoder"], data["grad_norm/sparse_head"],
                                   data["grad_norm/colbert_head"], data["grad_norm/total"]):
        assert total == pytest.approx((enc ** 2 + sp ** 2 + col ** 2) ** 0.5, rel=1e-5) and total > 0.1
    assert data["grad_norm/clip_scale"] == pytest.approx([0.1 / t for t in data["grad_norm/total"]])
    # the last logged weight norm is that of the weights before the last optimizer step
    assert data["heads/sparse/weight_norm"][0] != data["heads/sparse/weight_norm"][-1]


def test_a_head_left_out_of_loss_heads_has_no_entries_and_the_total_is_of_the_trained_parts(tiny_dir, tokenizer):
    torch.manual_seed(0)
    model = ComposerM3(M3Model.from_pretrained(tiny_dir), **model_settings(train_group_size=2,
                                                                           heads=("dense", "colbert")))
    batch = text_batch(tokenizer, 4, 2)
    spec = DataSpec([batch, batch], split_batch=lambda b, size: [b],
                    get_num_samples_in_batch=lambda b: b["query_input_ids"].shape[0])
    logger = InMemoryLogger()
    Trainer(model=model, train_dataloader=spec, optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
            max_duration="2ba", device_train_microbatch_size=4, loggers=[logger], progress_bar=False, device="cpu",
            callbacks=[HeadDiagnostics(max_grad_norm=None)]).fit()
    data = {k: [float(v) for _, v in points] for k, points in logger.data.items()}
    # frozen, no lexical weights built (the loss dict keeps its fixed keys: loss/train/sparse is 0)
    assert not [name for name in data if "sparse" in name and not name.startswith("loss/")]
    assert set(data["loss/train/sparse"]) == {0.0}
    for enc, col, total in zip(data["grad_norm/encoder"], data["grad_norm/colbert_head"], data["grad_norm/total"]):
        assert col > 0 and total == pytest.approx((enc ** 2 + col ** 2) ** 0.5, rel=1e-5)
