"""BGE-M3 losses as pure tensor functions (imports only torch).

Every function takes score matrices that are **already divided by τ** (see `model/scores.py`),
arranged `(rows = queries, columns = passages)` in the in-batch layout: query `b` owns the `G`
passages at columns `b·G … b·G+G−1`, its positive first (column `b·G`). Notation: `N` queries,
`G = train_group_size`, `S_x` the score matrix of head x ∈ {dense, lex (sparse), mul (ColBERT),
ens (ensemble)}, `CE(S, y) = mean_b −log softmax(S[b])[y_b]`.

The composition used in training (docs/recipe.md §Unified loss, §Self-distillation; checked against
FlagEmbedding's own numbers, recipe.md §Reference numbers):

    L       = ( L_dense + L_ens + 0.1·L_lex + L_mul ) / 4                     unified_loss
    L'      = ( L'_dense + 0.1·L'_lex + L'_mul ) / 3                          self_distill_loss
    L_total = ( L + L' ) / 2  when self-distillation is on, else L            combine_self_distill

where each `L_x` is `info_nce(S_x, y)` (or `m3_kd_loss` when teacher scores are used) and each
`L'_x` is the soft cross entropy of `S_x` against `softmax(S_ens.detach())`.

When only some heads are trained (`loss.heads`, docs/recipe.md §Choosing the heads) the same
formulas run over the terms there are: `L` sums the weighted terms of the chosen heads (and the
ensemble of those heads, when there are two or more) and divides by their number, `L'` sums the
chosen heads' weighted distillation terms and divides by theirs. With all three heads these are
the divisors 4 and 3 above; with dense only, `L = L_dense`.

Sparsity control (docs/recipe.md §Sparsity control), when `loss.sparsity` is on, adds to `L_total`

    L_sparsity = s(t) · ( λ_q · R(W_q) + λ_p · R(W_p) )                         sparsity_loss

with `W` the `(n, V)` lexical vectors of the batch's queries or passages, `R` the FLOPS or L1
regulariser and `s(t)` the warm-up ramp (`sparsity_warmup_scale`).

With Matryoshka sizes (`loss.matryoshka`, docs/recipe.md §Matryoshka) each dense and ColBERT term,
the ensemble term and each student of `L'` is the weighted sum over the full size and the cut sizes
(`matryoshka_sum`), the teacher staying the full-size ensemble.

In-batch false negatives (docs/recipe.md §False-negative masking): a column whose passage is
identical to one of query b's positives is taken out of row b's softmax in every matrix above
(`false_negative_mask`, `mask_scores`); a matrix without such columns is left unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

UNIFIED_LOSS_WEIGHTS = (1.0, 0.1, 1.0, 1.0)      # (dense, lex, mul, ens), recipe.md §Unified loss
SELF_DISTILL_WEIGHTS = (1.0, 0.1, 1.0)           # (dense, lex, mul), recipe.md §Self-distillation
SPARSITY_REGULARIZERS = ("none", "flops", "l1")  # loss.sparsity.regularizer, recipe.md §Sparsity control


def in_batch_targets(num_queries: int, group_size: int, device=None) -> torch.Tensor:
    """Column of each query's positive: `y_b = b·G`, shape `(N,)`."""
    return torch.arange(num_queries, device=device) * group_size


def false_negative_mask(passage_hashes: torch.Tensor, positive_hashes: torch.Tensor, group_size: int,
                        first_row: int = 0) -> torch.Tensor:
    """`M[b, c]` true when passage c is identical to one of query b's positives, except b's own
    positive column `(first_row + b)·G`.

    passage_hashes `(M,)`: a content hash per column; positive_hashes `(N, P)`: the hashes of each
    query's positives (a row may repeat a hash to pad). `first_row` is the global index of row 0
    when the rows are one rank's queries against every rank's passages. Shape `(N, M)` bool.
    """
    num_queries = positive_hashes.shape[0]
    mask = (passage_hashes[None, :, None] == positive_hashes[:, None, :]).any(dim=-1)
    own = in_batch_targets(num_queries, group_size, mask.device) + first_row * group_size
    mask[torch.arange(num_queries, device=mask.device), own] = False
    return mask


def mask_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores with the masked entries at the dtype's most negative finite value: their softmax
    probability is exactly 0 and no gradient reaches them, so every loss over the result equals
    the loss over the matrix without those columns. `mask=None` returns `scores` itself."""
    if mask is None:
        return scores
    return scores.float().masked_fill(mask, torch.finfo(torch.float32).min)


def info_nce(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled InfoNCE with in-batch negatives.

    `L = mean_b −log( exp(S[b, y_b]) / Σ_c exp(S[b, c]) )`, scores `(N, M)` (÷τ already), targets
    `(N,)` long. Every other column of row b is a negative: b's own hard negatives and all passages
    of the other queries (and of the other ranks, for gathered dense scores).
    """
    return F.cross_entropy(scores.float(), targets)


def soft_cross_entropy(scores: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """`−mean_b Σ_c T[b, c] · log_softmax(S)[b, c]`, scores and teacher `(N, M)`, teacher rows sum to 1.

    (FlagEmbedding calls this its "kl_div" distill loss; it is a cross entropy, the teacher's
    entropy is not subtracted. Gradient flows into `scores` only.)
    """
    return -(teacher_probs * torch.log_softmax(scores.float(), dim=-1)).sum(dim=-1).mean()


def _weighted_mean(terms: list[tuple[float, torch.Tensor | None]]) -> torch.Tensor:
    """`Σ w·t / n` over the terms that are not None, summed left to right (n = their number)."""
    present = [(w, t) for w, t in terms if t is not None]
    if not present:
        raise ValueError("no loss term given")
    total = present[0][0] * present[0][1]
    for w, t in present[1:]:
        total = total + w * t
    return total / len(present)


def unified_loss(dense: torch.Tensor | None, sparse: torch.Tensor | None, colbert: torch.Tensor | None,
                 ensemble: torch.Tensor | None,
                 weights: tuple[float, float, float, float] = UNIFIED_LOSS_WEIGHTS) -> torch.Tensor:
    """`L = (λ_dense·L_dense + λ_ens·L_ens + λ_lex·L_lex + λ_mul·L_mul) / 4`, λ = (1, 0.1, 1, 1) by default.

    Inputs are the scalar per-head losses (CE or m3_kd_loss). The divisor stays 4 whatever the
    weights, as in the recipe. A term that is None (a head not trained, or no ensemble) is left
    out of the sum and of the divisor: `(λ_dense·L_dense + λ_lex·L_lex) / 2` for dense and sparse
    without their ensemble term.
    """
    w_dense, w_lex, w_mul, w_ens = weights
    return _weighted_mean([(w_dense, dense), (w_ens, ensemble), (w_lex, sparse), (w_mul, colbert)])


def matryoshka_sum(full: torch.Tensor, prefixes: Sequence[tuple[float, torch.Tensor]] = ()) -> torch.Tensor:
    """A head's Matryoshka term (docs/recipe.md §Matryoshka): `L = L_full + Σ_k w_k · L_k`, summed left to
    right, where `L_k` is the same loss on the vectors cut to the k-th smaller size (re-normalised) and
    `w_k` its weight; the full size always counts with weight 1 and there is no divisor. Without
    prefixes this is `full` itself (no arithmetic: numerics without Matryoshka are unchanged)."""
    total = full
    for weight, term in prefixes:
        total = total + weight * term
    return total


def self_distill_loss(ensemble_scores: torch.Tensor, dense_scores: torch.Tensor | None,
                      sparse_scores: torch.Tensor | None, colbert_scores: torch.Tensor | None,
                      weights: tuple[float, float, float] = SELF_DISTILL_WEIGHTS,
                      truncated: Mapping[str, Sequence[tuple[float, torch.Tensor]]] | None = None) -> torch.Tensor:
    """Self-knowledge distillation: the ensemble is a detached teacher for each head.

        T    = softmax(S_ens.detach(), dim=-1)                 (N, M), rows over all in-batch passages
        L'_x = −mean_b Σ_c T[b, c] · log_softmax(S_x)[b, c]    x ∈ {dense, lex, mul}
        L'   = (L'_dense + 0.1·L'_lex + L'_mul) / 3

    All four score matrices are local `(N, N·G)` (the dense one too, also with cross-rank
    negatives). No gradient reaches the teacher. A student that is None (a head not trained) is
    left out of the sum and of the divisor.

    `truncated`, optional: Matryoshka prefixes of a student, `{"dense": [(w_k, S_dense@d_k), …],
    "colbert": […]}`. Each is distilled from the same full-size teacher and the student's term becomes
    `matryoshka_sum(L'_x, [(w_k, L'_x@d_k)])` (docs/recipe.md §Matryoshka).
    """
    teacher = torch.softmax(ensemble_scores.detach().float(), dim=-1)
    truncated = truncated or {}
    w_dense, w_lex, w_mul = weights

    def student(name: str, s: torch.Tensor | None) -> torch.Tensor | None:
        if s is None:
            return None
        return matryoshka_sum(soft_cross_entropy(s, teacher),
                              [(w, soft_cross_entropy(t, teacher)) for w, t in truncated.get(name, ())])

    return _weighted_mean([(w, student(name, s)) for name, w, s in
                           (("dense", w_dense, dense_scores), ("sparse", w_lex, sparse_scores),
                            ("colbert", w_mul, colbert_scores))])


def combine_self_distill(unified: torch.Tensor, self_distill: torch.Tensor) -> torch.Tensor:
    """`L_total = (L + L') / 2` (the recipe halves the sum once self-distillation is on)."""
    return (unified + self_distill) / 2


def m3_kd_loss(scores: torch.Tensor, teacher_targets: torch.Tensor, group_size: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Knowledge distillation from teacher scores, FlagEmbedding's `m3_kd_loss` (recipe.md §m3_kd_loss).

    scores `(N, N·G)` (÷τ), teacher_targets `t = softmax(teacher_scores)` of shape `(N, G)`: column 0
    the positive, then the negatives (sorted by teacher score, descending). Each own passage i in
    turn is the target, against the other queries' passages and own passages not used yet:

        for i in 0..G−1:   y_i[b] = b·G + i
                           ℓ_i[b] = −log softmax(S[b] masked)[y_i[b]]
                           L     += mean_b t[b, i] · ℓ_i[b]
                           mask column y_i[b] of row b for the following rounds

    Masked columns are set to the dtype's most negative finite value (probability exactly 0).
    Because of the masking the order of the group matters (a Plackett–Luce-like listwise loss).

    `mask (N, N·G)`, optional: false negatives, masked in every round from the start. Only columns
    of other queries are taken from it: b's own G passages are all targets here, weighted by the
    teacher, so none of them is pushed away as a negative.
    """
    scores = scores.float()
    num_queries = scores.shape[0]
    rows = torch.arange(num_queries, device=scores.device)
    used = torch.zeros_like(scores, dtype=torch.bool)
    if mask is not None:
        own_group = (torch.arange(scores.shape[1], device=scores.device)[None, :] // group_size) == rows[:, None]
        used = mask & ~own_group
    lowest = torch.finfo(scores.dtype).min
    loss = scores.new_zeros(())
    for i in range(group_size):
        targets = rows * group_size + i
        per_row = F.cross_entropy(scores.masked_fill(used, lowest), targets, reduction="none")
        loss = loss + (teacher_targets[:, i].float() * per_row).mean()
        used = used.clone()
        used[rows, targets] = True
    return loss


def bidirectional_loss(scores: torch.Tensor, group_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Passage→query InfoNCE for parallel (`parallel_`, e.g. bitext) batches.

    From the query→passage scores `S (N, N·G)` take the columns of the positives,
    `S_pq = S[:, y]ᵀ` with `y = arange(N)·G` (shape `(N, N)`: row a = positive passage of query a,
    column b = query b), and

        L_bi = mean_a −log( exp(S_pq[a, a]) / Σ_b exp(S_pq[a, b]) )

    i.e. each positive passage must retrieve its own query among all queries of the batch. Hard
    negatives have no query of their own, so they are not rows here. The model uses it on the
    dense head for parallel batches as `(L_dense + L_bi) / 2` in place of `L_dense`
    (the symmetric InfoNCE of sentence-transformers' MultipleNegativesSymmetricRankingLoss).
    FlagEmbedding parses the `parallel_` flag but never uses it (recipe.md §Bidirectional loss).

    `mask (N, N·G)`, optional, the query→passage false-negative mask: query b is masked out of
    row a when a's positive is identical to one of b's positives (`mask[b, a·G]`).
    """
    num_queries = scores.shape[0]
    positives = in_batch_targets(num_queries, group_size, scores.device)
    passage_to_query = scores[:, positives].T
    if mask is not None:
        passage_to_query = mask_scores(passage_to_query, mask[:, positives].T)
    return F.cross_entropy(passage_to_query.float(), torch.arange(num_queries, device=scores.device))


def flops_regularizer(weights: torch.Tensor) -> torch.Tensor:
    """SPLADE's FLOPS regulariser `Σ_t ( mean_i W[i, t] )²` of lexical vectors `W (n, V)` (weights >= 0).

    `mean_i W[i, t]` stands for the probability that a text has term t, so the sum is a smooth
    estimate of the expected cost of a sparse dot product (`Σ_t p_q(t)·p_d(t)` when applied to both
    sides); terms many texts carry cost the most."""
    return weights.float().mean(dim=0).pow(2).sum()


def l1_regularizer(weights: torch.Tensor) -> torch.Tensor:
    """`mean_i Σ_t W[i, t]` of lexical vectors `W (n, V)` (weights >= 0: the L1 norm)."""
    return weights.float().sum(dim=1).mean()


def sparsity_loss(query_weights: torch.Tensor, passage_weights: torch.Tensor, regularizer: str,
                  query_weight: float, passage_weight: float) -> torch.Tensor:
    """`λ_q · R(W_q) + λ_p · R(W_p)`, `R` = `flops_regularizer` or `l1_regularizer` (`regularizer`
    "flops" / "l1"), `W_q (Nq, V)`, `W_p (Np, V)` each averaged over its own texts."""
    functions = {"flops": flops_regularizer, "l1": l1_regularizer}
    if regularizer not in functions:
        raise ValueError(f"regularizer must be one of {tuple(functions)}, got {regularizer!r}")
    r = functions[regularizer]
    return query_weight * r(query_weights) + passage_weight * r(passage_weights)


def sparsity_warmup_scale(elapsed: float, warmup: float) -> float:
    """SPLADE's quadratic ramp `min(1, elapsed / warmup)²` (1 when `warmup` <= 0)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, max(0.0, elapsed) / warmup) ** 2
