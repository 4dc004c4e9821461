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
    sparsity       + sparsity_scale · (λ_q·R(W_q) + λ_p·R(W_p)) on this rank's lexical vectors, when
                   `sparsity` (loss.sparsity) is on (docs/recipe.md §Sparsity control)
    total          what Composer back-propagates

Only the heads in `heads` (`loss.heads`) are encoded, scored and trained (docs/recipe.md §Choosing
the heads): their terms, the ensemble of those heads when there are two or more (and then
self-distillation with those heads as students), each sum divided by its number of terms
(`losses.unified_loss`). The other heads' parameters are frozen here, so they get no gradient, no
optimizer state (optim.py takes trainable parameters only) and DDP never waits for them.

Matryoshka (`matryoshka`, docs/recipe.md §Matryoshka): at each level (the k-th extra size of the
dense and of the ColBERT vectors) the cut vectors are scored again, and the dense, bidirectional,
ColBERT and ensemble terms and the self-distillation students each sum their full-size term and
their weighted cut ones (`losses.matryoshka_sum`); the teacher is the full-size ensemble.

False negatives (`mask_false_negatives`, docs/recipe.md §False-negative masking): when the batch
carries `passage_hashes`/`positive_hashes`, a column whose passage is identical to one of query b's
positives leaves row b's softmax in every matrix above (the gathered dense one included); the
dict's `masked_negatives` counts them (this rank's queries, against the columns of its dense term).

The loss dict always has the keys `LOSS_KEYS`, in that order, on every rank and step; a term
that is off is a zero tensor (Composer all-reduces the dict key by key).

The switches Algorithms set are `self_distill_on` and `sparsity_scale` (both from `state.timestamp`,
so they survive a resume); everything else is fixed at construction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from composer.models import ComposerModel
from torchmetrics import Metric

from m3composer import distributed, losses
from m3composer.model import gradcache
from m3composer.model.m3 import M3Model
from m3composer.model.scores import (COLBERT_MAX_ELEMENTS, HEADS, SCORE_NAMES, M3Reps, M3Scores, colbert_scores,
                                     dense_scores, ensemble_scores, truncate_reps)

log = logging.getLogger(__name__)

LOSS_KEYS = SCORE_NAMES + ("self_distill", "bidirectional", "masked_negatives", "sparsity", "total")


@dataclass(frozen=True)
class SparsityRegularizer:
    """`loss.sparsity` when on: `losses.sparsity_loss`'s regulariser and its query/passage weights."""
    regularizer: str
    query_weight: float
    passage_weight: float

    def __post_init__(self):
        if self.regularizer not in losses.SPARSITY_REGULARIZERS or self.regularizer == "none":
            raise ValueError(f"regularizer must be one of {losses.SPARSITY_REGULARIZERS[1:]}, got {self.regularizer!r}")
        if self.query_weight < 0 or self.passage_weight < 0:
            raise ValueError(f"sparsity weights must be >= 0, got {self.query_weight}, {self.passage_weight}")


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


@dataclass(frozen=True)
class MatryoshkaLevel:
    """The k-th Matryoshka size (docs/recipe.md §Matryoshka): the dense and ColBERT vectors' sizes (None:
    that head stays at full size at this level) and their weights; the ensemble of the level weighs the
    mean of the weights of the heads it truncates."""
    dense_dim: Optional[int]
    colbert_dim: Optional[int]
    dense_weight: float
    colbert_weight: float

    @property
    def ensemble_weight(self) -> float:
        weights = [w for w, d in ((self.dense_weight, self.dense_dim), (self.colbert_weight, self.colbert_dim))
                   if d is not None]
        return sum(weights) / len(weights)


def matryoshka_levels(settings: Mapping[str, Sequence], dense_size: int, colbert_size: int) -> tuple[MatryoshkaLevel, ...]:
    """The levels of `loss.matryoshka` (`dense_dims`, `dense_weights`, `colbert_dims`, `colbert_weights`),
    the k-th sizes of both heads paired; each size checked against the head's vector size."""
    per_head = {}
    for head, size in (("dense", dense_size), ("colbert", colbert_size)):
        dims, weights = list(settings[f"{head}_dims"]), list(settings[f"{head}_weights"]) or None
        key = f"loss.matryoshka.{head}_dims"
        too_big = [d for d in dims if not 0 < d < size]
        if too_big:
            raise ValueError(f"{key}: each size must be positive and below the {head} vectors' size {size}, "
                             f"got {too_big}")
        if weights is not None and len(weights) != len(dims):
            raise ValueError(f"loss.matryoshka.{head}_weights: needs one weight per size of {key}")
        per_head[head] = list(zip(dims, weights or [1.0] * len(dims)))
    dense, colbert = per_head["dense"], per_head["colbert"]
    if dense and colbert and len(dense) != len(colbert):
        raise ValueError("loss.matryoshka.colbert_dims: needs as many sizes as loss.matryoshka.dense_dims")
    count = max(len(dense), len(colbert))
    dense = dense or [(None, 0.0)] * count
    colbert = colbert or [(None, 0.0)] * count
    return tuple(MatryoshkaLevel(d, c, float(wd), float(wc)) for (d, wd), (c, wc) in zip(dense, colbert))


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
        heads: the heads trained (any non-empty subset of `HEADS`); the others are frozen so DDP sees
            no unused trainable parameter, and still saved on export. Recorded on the model as
            `trained_heads` (the export's m3composer.json says which heads were trained).
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
        sparsity: the lexical-sparsity regulariser (needs the sparse head); None = off. Its weight is
            scaled by `sparsity_scale` (1 until SparsityWarmup sets it).
        matryoshka: `loss.matryoshka`'s keys (`dense_dims`, `dense_weights`, `colbert_dims`,
            `colbert_weights`): the extra Matryoshka sizes trained (`matryoshka_levels`); empty lists = off.
            Recorded on the model as `matryoshka` (the export's m3composer.json).
    """

    def __init__(self, model: M3Model, *, temperature: float, heads: Sequence[str],
                 use_self_distill: bool, negatives_cross_device: bool,
                 negatives_cross_device_heads: str, cross_rank_grad_scale: str,
                 bidirectional_parallel: bool, knowledge_distillation: bool, mask_false_negatives: bool,
                 matryoshka: Mapping[str, Sequence],
                 gradient_checkpointing: bool, gradient_cache: Optional[gradcache.GradientCacheBudget],
                 sparsity: Optional[SparsityRegularizer],
                 train_group_size: Optional[int] = None, colbert_max_elements: int = COLBERT_MAX_ELEMENTS):
        super().__init__()
        if cross_rank_grad_scale not in distributed.CROSS_RANK_GRAD_SCALES:
            raise ValueError(f"cross_rank_grad_scale must be one of {distributed.CROSS_RANK_GRAD_SCALES}, "
                             f"got {cross_rank_grad_scale!r}")
        heads = tuple(heads)
        if not heads or set(heads) - set(HEADS) or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be a non-empty subset of {HEADS} without repeats, got {list(heads)}")
        if negatives_cross_device_heads not in distributed.CROSS_DEVICE_HEADS:
            raise ValueError(f"negatives_cross_device_heads must be one of {distributed.CROSS_DEVICE_HEADS}, "
                             f"got {negatives_cross_device_heads!r}")
        if model.score_temperature(temperature) != temperature:
            log.warning("model does not normalise its vectors: temperature %s forced to %s (as the recipe)",
                        temperature, model.score_temperature(temperature))
        temperature = model.score_temperature(temperature)
        self.model = model
        self.temperature = temperature
        self.heads = tuple(h for h in HEADS if h in heads)      # trained, in HEADS order
        self.negatives_cross_device = negatives_cross_device
        self.negatives_cross_device_heads = negatives_cross_device_heads
        self.cross_rank_grad_scale = cross_rank_grad_scale
        self.train_group_size = train_group_size
        self.bidirectional_parallel = bidirectional_parallel
        self.knowledge_distillation = knowledge_distillation
        self.colbert_max_elements = colbert_max_elements
        self.gradient_cache = gradient_cache
        self.mask_false_negatives = mask_false_negatives
        if sparsity is not None and "sparse" not in self.heads:
            raise ValueError(f"the sparsity regulariser needs the sparse head in heads, got {list(self.heads)}")
        self.sparsity = sparsity
        # The regulariser's warm-up scale, set each batch by SparsityWarmup (1 = its full weight).
        self.sparsity_scale = 1.0
        # The switch the self-distillation warm-up Algorithm sets each batch.
        self.self_distill_on = bool(use_self_distill)
        model.trained_heads = self.heads
        self.matryoshka = matryoshka_levels(matryoshka, model.encoder.config.hidden_size,
                                            model.colbert_linear.out_features)
        for head in ("dense", "colbert"):
            if head not in self.heads and any(getattr(lvl, f"{head}_dim") for lvl in self.matryoshka):
                raise ValueError(f"loss.matryoshka.{head}_dims: {head} is not in loss.heads {list(self.heads)}")
        model.matryoshka = {f"{h}_dims": [getattr(lvl, f"{h}_dim") for lvl in self.matryoshka
                                          if getattr(lvl, f"{h}_dim") is not None]
                            for h in ("dense", "colbert")} if self.matryoshka else None
        for head, linear in (("sparse", model.sparse_linear), ("colbert", model.colbert_linear)):
            if head not in self.heads:
                linear.requires_grad_(False)
        if gradient_checkpointing:
            model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.train_metrics = {f"{h}_accuracy": InBatchAccuracy(h) for h in self._heads()}
        self.val_metrics = {f"{h}_accuracy": InBatchAccuracy(h) for h in self._heads()}

    def _heads(self) -> tuple[str, ...]:
        """The scores trained: the chosen heads, and their ensemble when there are two or more."""
        return self.heads + (("ensemble",) if len(self.heads) > 1 else ())

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
        return self.model.encode(input_ids, attention_mask, **self._with_heads())

    def _with_heads(self) -> dict[str, bool]:
        """The encoder's head switches: only the trained heads' representations are built."""
        return {"with_sparse": "sparse" in self.heads, "with_colbert": "colbert" in self.heads}

    def score(self, q: M3Reps, p: M3Reps) -> M3Scores:
        return self.model.score(q, p, self.temperature, heads=self.heads, colbert_max_elements=self.colbert_max_elements)

    def forward(self, batch: dict[str, Any]) -> M3Outputs:
        group_size = self.group_size(batch)
        # Queries and passages go through the encoder together (length-sorted chunks, M3Model.encode_many).
        parts = [(batch["query_input_ids"], batch["query_attention_mask"]),
                 (batch["passage_input_ids"], batch["passage_attention_mask"])]
        if self.gradient_cache is not None and torch.is_grad_enabled():
            q, p = gradcache.encode_many(self.model, parts, self.gradient_cache, **self._with_heads())
        else:
            q, p = self.model.encode_many(parts, **self._with_heads())
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
        # (heads not trained have no representations to gather)
        vectors = mask = None
        if reps.colbert is not None:
            vectors, mask = distributed.pad_to_longest_across_ranks([reps.colbert, reps.colbert_mask], dim=1)
        out = M3Reps(dense=gather(reps.dense))
        if reps.sparse is not None:
            out.sparse = gather(reps.sparse)
        if vectors is not None:
            out.colbert, out.colbert_mask = gather(vectors), distributed.gather_no_grad(mask)
        return out

    def loss_from_reps(self, q: M3Reps, p: M3Reps, batch: dict[str, Any],
                       local_scores: Optional[M3Scores] = None) -> dict[str, torch.Tensor]:
        """All loss terms from the representations (the gradient-cache seam: `q`/`p` may be leaves)."""
        group_size = self.group_size(batch)
        scores = local_scores if local_scores is not None else self.score(q, p)
        first = getattr(scores, self.heads[0])
        num_queries = first.shape[0]
        device = first.device
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
        every_head = gathered and self.negatives_cross_device_heads == "all"
        global_scores, global_teacher = None, teacher
        if gathered:
            global_teacher = distributed.gather_no_grad(teacher) if teacher is not None else None
            if every_head:
                q_global, p_global = self._gather(q), self._gather(p)
                global_scores = self.score(q_global, p_global)
        # (queries, passages, their full-size scores) of the sparse, ColBERT and ensemble terms
        head_reps = (q_global, p_global, global_scores) if every_head else (q, p, scores)
        # each Matryoshka level's scores (docs/recipe.md §Matryoshka); none without it
        levels = [(level, self._level_scores(*head_reps, level)) for level in self.matryoshka]
        zero = first.new_zeros((), dtype=torch.float32)
        terms = {"dense": zero, "sparse": zero, "colbert": zero, "ensemble": zero,
                 "self_distill": zero, "bidirectional": zero, "masked_negatives": zero, "sparsity": zero}
        dense_term = None
        if "dense" in self.heads:
            if not gathered or every_head:
                global_dense = head_reps[2].dense
                dense_at = self._truncated_scores(levels, "dense")
            else:
                q_all = distributed.gather_for_negatives(q.dense, self.cross_rank_grad_scale)
                p_all = distributed.gather_for_negatives(p.dense, self.cross_rank_grad_scale)
                global_dense = dense_scores(q_all, p_all, self.temperature)
                dense_at = [(lvl.dense_weight, self._dense_scores_at(q_all, p_all, lvl.dense_dim))
                            for lvl, _ in levels if lvl.dense_dim is not None]
            terms["dense"] = dense_term = losses.matryoshka_sum(
                head_loss(global_dense, global_teacher, dense_mask),
                [(w, head_loss(at, global_teacher, dense_mask)) for w, at in dense_at])
            if self.bidirectional_parallel and bool(batch.get("is_parallel", False)):
                terms["bidirectional"] = losses.matryoshka_sum(
                    losses.bidirectional_loss(global_dense, group_size, mask=dense_mask),
                    [(w, losses.bidirectional_loss(at, group_size, mask=dense_mask)) for w, at in dense_at])
                dense_term = (terms["dense"] + terms["bidirectional"]) / 2

        heads, head_teacher, head_mask = ((global_scores, global_teacher, dense_mask) if every_head
                                          else (scores, teacher, local_mask))
        # counted against the columns of the dense term, or of the other heads' terms without dense
        counted_global = gathered and ("dense" in self.heads or every_head)
        counted = dense_mask if counted_global else local_mask
        if counted is not None:
            # this rank's rows of the mask (all of it when it is local)
            rows = slice(distributed.rank() * num_queries, (distributed.rank() + 1) * num_queries) \
                if counted_global else slice(None)
            terms["masked_negatives"] = counted[rows].sum().to(zero.dtype)
        truncated = {name: self._truncated_scores(levels, name) for name in ("colbert", "ensemble")}
        for name in self._heads():
            if name != "dense":
                terms[name] = losses.matryoshka_sum(
                    head_loss(getattr(heads, name), head_teacher, head_mask),
                    [(w, head_loss(at, head_teacher, head_mask)) for w, at in truncated.get(name, ())])
        trained = set(self._heads())
        total = losses.unified_loss(dense_term, *(terms[h] if h in trained else None
                                                  for h in ("sparse", "colbert", "ensemble")))
        if self.self_distill_on and "ensemble" in trained:
            # masked columns get probability 0 in the teacher and in every student; the teacher is the
            # full-size ensemble, each student's Matryoshka sizes learn from it (recipe.md §Matryoshka)
            students = {name: [(w, losses.mask_scores(at, head_mask)) for w, at in self._truncated_scores(levels, name)]
                        for name in ("dense", "colbert")}
            terms["self_distill"] = losses.self_distill_loss(
                *(None if s is None else losses.mask_scores(s, head_mask)
                  for s in (heads.ensemble, heads.dense, heads.sparse, heads.colbert)),
                truncated=students)
            total = losses.combine_self_distill(total, terms["self_distill"])
        if self.sparsity is not None:
            # this rank's own texts (never the gathered ones): each rank regularises what it encoded
            terms["sparsity"] = self.sparsity_scale * losses.sparsity_loss(
                q.sparse, p.sparse, self.sparsity.regularizer, self.sparsity.query_weight, self.sparsity.passage_weight)
            total = total + terms["sparsity"]
        terms["total"] = total
        assert tuple(terms) == LOSS_KEYS
        return terms

    # ------------------------------------------------------------------ Matryoshka
    def _truncate(self, reps: M3Reps, level: MatryoshkaLevel) -> M3Reps:
        return truncate_reps(reps, level.dense_dim, level.colbert_dim, self.model.normalize)

    def _dense_scores_at(self, q_dense: torch.Tensor, p_dense: torch.Tensor, dim: int) -> torch.Tensor:
        q_cut = truncate_reps(M3Reps(dense=q_dense), dim, None, self.model.normalize).dense
        p_cut = truncate_reps(M3Reps(dense=p_dense), dim, None, self.model.normalize).dense
        return dense_scores(q_cut, p_cut, self.temperature)

    def _level_scores(self, q: M3Reps, p: M3Reps, full: M3Scores, level: MatryoshkaLevel) -> M3Scores:
        """The scores at one Matryoshka level: dense and ColBERT from the cut vectors where the level cuts
        them (else the full-size scores), sparse unchanged, and their ensemble (two or more heads)."""
        out = M3Scores(dense=full.dense, sparse=full.sparse, colbert=full.colbert)
        q_cut, p_cut = self._truncate(q, level), self._truncate(p, level)
        if level.dense_dim is not None and "dense" in self.heads:
            out.dense = dense_scores(q_cut.dense, p_cut.dense, self.temperature)
        if level.colbert_dim is not None and "colbert" in self.heads:
            out.colbert = colbert_scores(q_cut.colbert, q_cut.colbert_mask, p_cut.colbert, self.temperature,
                                         self.colbert_max_elements)
        if len(self.heads) > 1:
            out.ensemble = ensemble_scores(out.dense, out.sparse, out.colbert)
        return out

    @staticmethod
    def _truncated_scores(levels: Sequence[tuple[MatryoshkaLevel, M3Scores]], name: str) -> list[tuple[float, torch.Tensor]]:
        """`(weight, scores)` of score `name` at each level that cuts it (every level for the ensemble)."""
        if name == "ensemble":
            return [(lvl.ensemble_weight, at.ensemble) for lvl, at in levels]
        return [(getattr(lvl, f"{name}_weight"), getattr(at, name)) for lvl, at in levels
                if getattr(lvl, f"{name}_dim") is not None]

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
