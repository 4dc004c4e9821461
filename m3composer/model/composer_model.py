"""ComposerM3: the Composer training wrapper around `M3Model` (forward -> scores, loss -> dict of terms).

Input is the collated batch of `docs/architecture.md` (query ids `(B, Lq)`, passage ids `(B·G, Lp)`,
example-major, `teacher_scores (B, G)`, `has_teacher_scores`, `is_parallel`). The arithmetic lives
in `m3composer.losses`; this module decides which terms apply to a batch:

    dense term     info_nce (or m3_kd_loss with teacher scores) on S_dense, gathered across ranks
                   when `negatives_cross_device` (targets arange(W·B)·G, the same global loss on
                   every rank); for parallel batches (L_dense + L_bi) / 2 with L_bi the
                   passage→query loss (`bidirectional_parallel`)
    unified        (L_dense + L_ens + 0.1·L_lex + L_mul) / 4 over local sparse/ColBERT/ensemble scores
                   (global ones too with `negatives_cross_device_heads="all"`: every term on the
                   gathered batch, as one process would compute it)
    self-distill   (L + L') / 2 while `self_distill_on`
    total          what Composer back-propagates

False negatives (`mask_false_negatives`, docs/recipe.md §False-negative masking): when the batch
carries `passage_hashes`/`positive_hashes`, a column whose passage is identical to one of query b's
positives leaves row b's softmax in every matrix above (the gathered dense one included); the
dict's `masked_negatives` counts them (this rank's queries, against the columns of its dense term).

The loss dict always has the keys `LOSS_KEYS`, in that order, on every rank and step; a term
that is off is a zero tensor (Composer all-reduces the dict key by key).

The one switch an Algorithm flips is `self_distill_on` (set from `state.timestamp`, so it survives
a resume); everything else is fixed at construction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from composer.models import ComposerModel
from torchmetrics import Metric

from m3composer import distributed, losses
from m3composer.model import gradcache
from m3composer.model.m3 import M3Model
from m3composer.model.scores import COLBERT_MAX_ELEMENTS, SCORE_NAMES, M3Reps, M3Scores, dense_scores

log = logging.getLogger(__name__)

LOSS_KEYS = SCORE_NAMES + ("self_distill", "bidirectional", "masked_negatives", "total")


class InBatchAccuracy(Metric):
    """Share of queries whose top-scoring in-batch passage is their positive, for one head."""

    full_state_update = False

    def __init__(self, head: str, **kwargs):
        super().__init__(**kwargs)
        self.head = head
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        self.correct += (scores.argmax(dim=-1) == targets).sum().float()
        self.total += targets.numel()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp_min(1)


@dataclass
class M3Outputs:
    """What `forward` returns: both sides' representations and the local `(B, B·G)` scores."""
    queries: M3Reps
    passages: M3Reps
    scores: M3Scores
    group_size: int


class ComposerM3(ComposerModel):
    """Composer model for unified BGE-M3 fine-tuning.

    The settings that the run schema owns (`loss.*`, `model.gradient_checkpointing`,
    `model.gradient_cache`) have no default here: their defaults and meanings are in
    m3composer/config.py (docs/configuration.md), and `train.build_model` passes them.

    Args:
        model: the `M3Model` (encoder + heads).
        temperature: τ of every score; 1.0 when the model does not normalise (`M3Model.score_temperature`).
        unified_finetuning: train sparse, ColBERT and ensemble terms too; off = dense only (the heads
            are frozen so DDP sees no unused trainable parameter, and still saved on export).
        use_self_distill: initial value of `self_distill_on`.
        negatives_cross_device: dense scores against the passages of all ranks (no-op on one process).
        negatives_cross_device_heads: "dense" (the recipe: sparse, ColBERT, ensemble and
            self-distillation stay local) or "all" (every head's representations are gathered, so
            every term is computed on the whole global batch).
        cross_rank_grad_scale: "parity" (FlagEmbedding: the dense term's applied gradient is 1/W of the
            full-batch one) or "full_batch" (differentiable gather: equals the one-process gradient).
        train_group_size: G; when given, every batch is checked against it.
        bidirectional_parallel: add the passage→query direction on `is_parallel` batches.
        knowledge_distillation: use `m3_kd_loss` with the batch's teacher scores when it has them.
        gradient_checkpointing: non-reentrant activation checkpointing of the encoder.
        colbert_max_elements: chunking budget of the ColBERT max-sim (see scores.colbert_scores).
        gradient_cache: encode training batches through the gradient cache in chunks of this size
            (`gradcache`): the same loss and gradients, activations of one chunk at a time; None = off.
        mask_false_negatives: mask in-batch passages identical to a query's positive (batches
            without passage hashes are never masked).
    """

    def __init__(self, model: M3Model, *, temperature: float, unified_finetuning: bool,
                 use_self_distill: bool, negatives_cross_device: bool,
                 negatives_cross_device_heads: str, cross_rank_grad_scale: str,
                 bidirectional_parallel: bool, knowledge_distillation: bool, mask_false_negatives: bool,
                 gradient_checkpointing: bool, gradient_cache: Optional[gradcache.GradientCacheBudget],
                 train_group_size: Optional[int] = None, colbert_max_elements: int = COLBERT_MAX_ELEMENTS):
        super().__init__()
        if cross_rank_grad_scale not in distributed.CROSS_RANK_GRAD_SCALES:
            raise ValueError(f"cross_rank_grad_scale must be one of {distributed.CROSS_RANK_GRAD_SCALES}, "
                             f"got {cross_rank_grad_scale!r}")
        if negatives_cross_device_heads not in distributed.CROSS_DEVICE_HEADS:
            raise ValueError(f"negatives_cross_device_heads must be one of {distributed.CROSS_DEVICE_HEADS}, "
                             f"got {negatives_cross_device_heads!r}")
        if model.score_temperature(temperature) != temperature:
            log.warning("model does not normalise its vectors: temperature %s forced to %s (as the recipe)",
                        temperature, model.score_temperature(temperature))
        temperature = model.score_temperature(temperature)
        self.model = model
        self.temperature = temperature
        self.unified_finetuning = unified_finetuning
        self.negatives_cross_device = negatives_cross_device
        self.negatives_cross_device_heads = negatives_cross_device_heads
        self.cross_rank_grad_scale = cross_rank_grad_scale
        self.train_group_size = train_group_size
        self.bidirectional_parallel = bidirectional_parallel
        self.knowledge_distillation = knowledge_distillation
        self.colbert_max_elements = colbert_max_elements
        self.gradient_cache = gradient_cache
        self.mask_false_negatives = mask_false_negatives
        # The switch the self-distillation warm-up Algorithm sets each batch.
        self.self_distill_on = bool(use_self_distill)
        if not unified_finetuning:
            for p in list(model.colbert_linear.parameters()) + list(model.sparse_linear.parameters()):
                p.requires_grad_(False)
        if gradient_checkpointing:
            model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.train_metrics = {f"{h}_accuracy": InBatchAccuracy(h) for h in self._heads()}
        self.val_metrics = {f"{h}_accuracy": InBatchAccuracy(h) for h in self._heads()}

    def _heads(self) -> tuple[str, ...]:
        return SCORE_NAMES if self.unified_finetuning else ("dense",)

    # ------------------------------------------------------------------ encode + score
    def group_size(self, batch: dict[str, Any]) -> int:
        num_queries = batch["query_input_ids"].shape[0]
        num_passages = batch["passage_input_ids"].shape[0]
        if num_queries == 0 or num_passages % num_queries:
            raise ValueError(f"batch has {num_passages} passages for {num_queries} queries: not B·G")
        group_size = num_passages // num_queries
        if self.train_group_size is not None and group_size != self.train_group_size:
            raise ValueError(f"batch has group size {group_size}, model expects train_group_size={self.train_group_size}")
        return group_size

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> M3Reps:
        unified = self.unified_finetuning
        return self.model.encode(input_ids, attention_mask, with_sparse=unified, with_colbert=unified)

    def score(self, q: M3Reps, p: M3Reps) -> M3Scores:
        return self.model.score(q, p, self.temperature, colbert_max_elements=self.colbert_max_elements)

    def forward(self, batch: dict[str, Any]) -> M3Outputs:
        group_size = self.group_size(batch)
        # Queries and passages go through the encoder together (length-sorted chunks, M3Model.encode_many).
        unified = self.unified_finetuning
        parts = [(batch["query_input_ids"], batch["query_attention_mask"]),
                 (batch["passage_input_ids"], batch["passage_attention_mask"])]
        if self.gradient_cache is not None and torch.is_grad_enabled():
            q, p = gradcache.encode_many(self.model, parts, self.gradient_cache, with_sparse=unified,
                                         with_colbert=unified)
        else:
            q, p = self.model.encode_many(parts, with_sparse=unified, with_colbert=unified)
        return M3Outputs(queries=q, passages=p, scores=self.score(q, p), group_size=group_size)

    # ------------------------------------------------------------------ loss
    def loss(self, outputs: M3Outputs, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss_from_reps(outputs.queries, outputs.passages, batch, local_scores=outputs.scores)

    def _uses_teacher_scores(self, batch: dict[str, Any]) -> bool:
        return self.knowledge_distillation and bool(batch.get("has_teacher_scores", False))

    def _false_negative_masks(self, batch: dict[str, Any], group_size: int, device,
                              gathered: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(local mask `(B, B·G)`, mask of the dense matrix: the global `(W·B, W·B·G)` one when
        `gathered`, else the local one); `(None, None)` when off or the batch has no hashes."""
        if not self.mask_false_negatives or "passage_hashes" not in batch:
            return None, None
        passage_hashes = batch["passage_hashes"].to(device)
        positive_hashes = batch["positive_hashes"].to(device)
        local = losses.false_negative_mask(passage_hashes, positive_hashes, group_size)
        if not gathered:
            return local, local
        # This rank's queries against every rank's passages, then every rank's rows: the same
        # global mask on every rank, without gathering positive lists of different lengths.
        all_passages = distributed.gather_no_grad(passage_hashes)
        rows = losses.false_negative_mask(all_passages, positive_hashes, group_size,
                                          first_row=distributed.rank() * positive_hashes.shape[0])
        return local, distributed.gather_no_grad(rows.to(torch.uint8)).bool()

    def _gather(self, reps: M3Reps) -> M3Reps:
        """Every head's representations from all ranks, in rank order (ColBERT vectors zero-padded
        to the longest rank's length first, as one process's collate would have padded them)."""
        def gather(x):
            return distributed.gather_for_negatives(x, self.cross_rank_grad_scale)
        vectors, mask = distributed.pad_to_longest_across_ranks([reps.colbert, reps.colbert_mask], dim=1)
        return M3Reps(dense=gather(reps.dense), sparse=gather(reps.sparse), colbert=gather(vectors),
                      colbert_mask=distributed.gather_no_grad(mask))

    def loss_from_reps(self, q: M3Reps, p: M3Reps, batch: dict[str, Any],
                       local_scores: Optional[M3Scores] = None) -> dict[str, torch.Tensor]:
        """All loss terms from the representations (the gradient-cache seam: `q`/`p` may be leaves)."""
        group_size = self.group_size(batch)
        scores = local_scores if local_scores is not None else self.score(q, p)
        num_queries = scores.dense.shape[0]
        device = scores.dense.device
        teacher = None
        if self._uses_teacher_scores(batch):
            teacher = torch.softmax(batch["teacher_scores"].to(device).float(), dim=-1)

        gathered = self.negatives_cross_device and distributed.is_distributed()
        local_mask, dense_mask = self._false_negative_masks(batch, group_size, device, gathered)

        def head_loss(head_scores: torch.Tensor, head_teacher: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
            n = head_scores.shape[0]
            if head_teacher is not None:
                return losses.m3_kd_loss(head_scores, head_teacher, group_size, mask=mask)
            return losses.info_nce(losses.mask_scores(head_scores, mask),
                                   losses.in_batch_targets(n, group_size, head_scores.device))

        # Dense: global over all ranks when asked (a no-op without a process group); every head with "all".
        every_head = gathered and self.unified_finetuning and self.negatives_cross_device_heads == "all"
        global_scores = None
        if not gathered:
            global_dense, global_teacher = scores.dense, teacher
        else:
            global_teacher = distributed.gather_no_grad(teacher) if teacher is not None else None
            if every_head:
                global_scores = self.score(self._gather(q), self._gather(p))
                global_dense = global_scores.dense
            else:
                q_all = distributed.gather_for_negatives(q.dense, self.cross_rank_grad_scale)
                p_all = distributed.gather_for_negatives(p.dense, self.cross_rank_grad_scale)
                global_dense = dense_scores(q_all, p_all, self.temperature)
        dense_loss = head_loss(global_dense, global_teacher, dense_mask)
        zero = dense_loss.new_zeros(())

        bidirectional = zero
        dense_term = dense_loss
        if self.bidirectional_parallel and bool(batch.get("is_parallel", False)):
            bidirectional = losses.bidirectional_loss(global_dense, group_size, mask=dense_mask)
            dense_term = (dense_loss + bidirectional) / 2

        masked = zero
        if dense_mask is not None:
            # this rank's rows of the dense mask (all of it when it is local)
            rows = slice(distributed.rank() * num_queries, (distributed.rank() + 1) * num_queries) if gathered \
                else slice(None)
            masked = dense_mask[rows].sum().to(zero.dtype)
        terms = {"dense": dense_loss, "sparse": zero, "colbert": zero, "ensemble": zero,
                 "self_distill": zero, "bidirectional": bidirectional, "masked_negatives": masked}
        if not self.unified_finetuning:
            terms["total"] = dense_term
            return terms

        heads, head_teacher, head_mask = ((global_scores, global_teacher, dense_mask) if every_head
                                          else (scores, teacher, local_mask))
        terms["sparse"] = head_loss(heads.sparse, head_teacher, head_mask)
        terms["colbert"] = head_loss(heads.colbert, head_teacher, head_mask)
        terms["ensemble"] = head_loss(heads.ensemble, head_teacher, head_mask)
        total = losses.unified_loss(dense_term, terms["sparse"], terms["colbert"], terms["ensemble"])
        if self.self_distill_on:
            # masked columns get probability 0 in the teacher and in every student
            terms["self_distill"] = losses.self_distill_loss(
                *(losses.mask_scores(s, head_mask) for s in (heads.ensemble, heads.dense, heads.sparse,
                                                             heads.colbert)))
            total = losses.combine_self_distill(total, terms["self_distill"])
        terms["total"] = total
        assert tuple(terms) == LOSS_KEYS
        return terms

    # ------------------------------------------------------------------ metrics
    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.val_metrics

    def eval_forward(self, batch: dict[str, Any], outputs: Optional[M3Outputs] = None) -> M3Outputs:
        return outputs if outputs is not None else self.forward(batch)

    def update_metric(self, batch: dict[str, Any], outputs: M3Outputs, metric: Metric) -> None:
        head_scores = getattr(outputs.scores, metric.head).detach()
        targets = losses.in_batch_targets(head_scores.shape[0], outputs.group_size, head_scores.device)
        # a duplicate of the positive ranked first is not a miss
        mask, _ = self._false_negative_masks(batch, outputs.group_size, head_scores.device, gathered=False)
        metric.update(losses.mask_scores(head_scores, mask), targets)
