"""Per-step health of the heads, logged so that a dead head shows in the loggers and the loss plot.

A freshly initialised sparse head can sit at `ln(B·G)` (uniform scores) for a whole run while the
total loss falls, because the other terms carry it. These numbers make that visible:

    heads/sparse/weight_norm          ‖W‖ of `sparse_linear` (a token's weight is ReLU(W·h + b))
    heads/sparse/bias                 its bias
    heads/sparse/zero_weight_share    share of the batch's non-special tokens whose weight is 0
    heads/sparse/shared_token_weight  mean of √(w_q·w_p) over the tokens a query shares with its
                                      positive: the per-token weight behind the sparse score
    heads/sparse/nonzero_per_query    mean number of non-zero terms of the batch's query vectors
    heads/sparse/nonzero_per_passage  the same for its passages (hard negatives included)
    heads/sparse/expected_flops       Σ_t p_q(t)·p_d(t) on the batch: the expected cost of a sparse
                                      dot product (`scores.LexicalCost`, recipe.md §Sparsity control)
    grad_norm/{encoder,sparse_head,colbert_head,total}
                                      gradient norms after backward, before clipping
    grad_norm/clip_scale              the factor `max_grad_norm` clipping applies (1 = no clipping)

Logged at `Event.AFTER_BACKWARD` (the loss is never split into micro-batches, so the gradients are
complete there, and clipping has not run yet). A head that `loss.heads` leaves out (frozen) has no
`heads/<head>/…` nor `grad_norm/<head>_head` entry.
"""
from __future__ import annotations

from typing import Optional

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from m3composer.model.inference import unwrap_m3
from m3composer.model.scores import LexicalCost


def _norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def token_weight_stats(q_sparse: torch.Tensor, p_sparse: torch.Tensor, batch: dict, group_size: int,
                       special_ids: set[int]) -> dict[str, float]:
    """Zero share and shared-token weight of one batch (see the module docstring)."""
    p_ids, p_mask = batch["passage_input_ids"], batch["passage_attention_mask"].bool()
    q_ids, q_mask = batch["query_input_ids"], batch["query_attention_mask"].bool()
    special = torch.tensor(sorted(special_ids), device=p_ids.device)
    zero, total = 0, 0
    for sparse, ids, mask in ((q_sparse, q_ids, q_mask), (p_sparse, p_ids, p_mask)):
        keep = mask & ~torch.isin(ids, special)
        weights = sparse.detach().gather(1, ids)[keep]
        zero += int((weights <= 0).sum())
        total += int(weights.numel())
    shared = []
    for b in range(q_ids.shape[0]):
        pos = b * group_size
        common = set(q_ids[b][q_mask[b]].tolist()) & set(p_ids[pos][p_mask[pos]].tolist()) - special_ids
        if common:
            index = torch.tensor(sorted(common), device=q_sparse.device)
            shared.append((q_sparse[b, index].detach().float() * p_sparse[pos, index].detach().float()).sqrt())
    return {"heads/sparse/zero_weight_share": zero / max(total, 1),
            "heads/sparse/shared_token_weight": float(torch.cat(shared).mean()) if shared else 0.0}


def lexical_cost_stats(q_sparse: torch.Tensor, p_sparse: torch.Tensor) -> dict[str, float]:
    """`heads/sparse/{nonzero_per_query, nonzero_per_passage, expected_flops}` of one batch (LexicalCost)."""
    cost = LexicalCost()
    cost.add("query", q_sparse)
    cost.add("passage", p_sparse)
    return {f"heads/sparse/{name}": value for name, value in cost.summary().items()}


class HeadDiagnostics(Callback):
    def __init__(self, max_grad_norm: Optional[float]):
        """`max_grad_norm`: the run's clipping threshold (`optimizer.max_grad_norm`; None: no clipping)."""
        self.max_grad_norm = max_grad_norm

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event != Event.AFTER_BACKWARD:
            return
        m3 = unwrap_m3(state.model)
        linears = {"sparse": m3.sparse_linear, "colbert": m3.colbert_linear}
        trained = {name: any(p.requires_grad for p in linear.parameters()) for name, linear in linears.items()}
        encoder = _norm(m3.encoder.parameters())
        norms = {f"grad_norm/{name}_head": _norm(linear.parameters())
                 for name, linear in linears.items() if trained[name]}
        total = sum([encoder ** 2, *(n ** 2 for n in norms.values())]) ** 0.5
        metrics = {"grad_norm/encoder": encoder, **norms, "grad_norm/total": total}
        if trained["sparse"]:
            metrics["heads/sparse/weight_norm"] = float(m3.sparse_linear.weight.detach().float().norm())
            metrics["heads/sparse/bias"] = float(m3.sparse_linear.bias.detach().float().reshape(-1)[0])
        if self.max_grad_norm is not None:
            metrics["grad_norm/clip_scale"] = min(1.0, self.max_grad_norm / max(total, 1e-12))
        outputs = state.outputs
        queries, passages = getattr(outputs, "queries", None), getattr(outputs, "passages", None)
        if queries is not None and getattr(queries, "sparse", None) is not None and passages.sparse is not None:
            metrics.update(token_weight_stats(queries.sparse, passages.sparse, state.batch, outputs.group_size,
                                              set(m3.special_token_ids.values())))
            metrics.update(lexical_cost_stats(queries.sparse, passages.sparse))
        logger.log_metrics(metrics)
