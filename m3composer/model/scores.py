"""Score matrices of the three M3 heads and their ensemble: pure functions over representations.

`encode` (in `m3.py`) turns token ids into an `M3Reps`; the functions here turn a query `M3Reps` and
a passage `M3Reps` into `(queries, passages)` score matrices; `m3composer.losses` turns scores into
losses. A gradient cache hooks in between encode and score, so nothing here touches the encoder.

All scores are computed in fp32 (`.float()` before dividing by τ), whatever precision the encoder
ran in. Formulas (docs/recipe.md §Scores), with `τ` the temperature:

    S_dense[q, p] = <e_q, e_p> / τ
    S_lex[q, p]   = Σ_t v_q[t] · v_p[t] / τ
    S_mul[q, p]   = ( Σ_i max_j <C_q[i], C_p[j]> ) / N_q / τ,   N_q = number of unmasked query vectors
    S_ens         = w_dense · S_dense + w_lex · S_lex + w_mul · S_mul,   weights (1, 0.3, 1)

This module is also the one home of four rules that inference shares with training: the score
names (`HEADS`, `SCORE_NAMES`), the ensemble's weighted sum (`ensemble_scores`, with training's
`ENSEMBLE_WEIGHTS` or BGE-M3's inference weights `INFERENCE_ENSEMBLE_WEIGHTS`) and the ColBERT
max-sim (`colbert_maxsim`, whose `padding` argument picks training's or inference's treatment of
padding: recipe.md §ColBERT max-sim variants), and what lexical vectors cost (`LexicalCost`:
non-zero terms per text and the expected cost of a sparse dot product, recipe.md §Sparsity
control). `m3c eval`, `m3c mine`, `m3c score-teacher` and NegativeRefresh call them without a
temperature.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

HEADS = ("dense", "sparse", "colbert")          # the three heads of an M3 model
SCORE_NAMES = HEADS + ("ensemble",)              # every score: the heads and their weighted sum
ENSEMBLE_WEIGHTS = (1.0, 0.3, 1.0)   # (dense, sparse, colbert) in training, recipe.md §Scores
INFERENCE_ENSEMBLE_WEIGHTS = (0.4, 0.2, 0.4)   # (dense, sparse, colbert): BGE-M3's README hybrid weights
COLBERT_PADDING = ("kept", "masked")   # colbert_maxsim's padding variants, recipe.md §ColBERT max-sim variants

# Largest (queries × query tokens × passages × passage tokens) block the ColBERT max-sim builds at
# once: 2^25 fp32 elements = 128 MiB (plus about the same again transiently in backward).
COLBERT_MAX_ELEMENTS = 2 ** 25


@dataclass
class M3Reps:
    """What `M3Model.encode` returns for `n` texts.

    dense         (n, H)       pooled (normalised) sentence vectors
    sparse        (n, V)       lexical weight per vocabulary id, special ids 0; None if not computed
    colbert       (n, L-1, D)  token vectors after CLS, padding rows 0; None if not computed
    colbert_mask  (n, L-1)     attention mask of those vectors; None if not computed
    """
    dense: torch.Tensor
    sparse: Optional[torch.Tensor] = None
    colbert: Optional[torch.Tensor] = None
    colbert_mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.dense.shape[0]


@dataclass
class M3Scores:
    """Score matrices `(queries, passages)`, already divided by τ. Heads not computed are None."""
    dense: Optional[torch.Tensor] = None
    sparse: Optional[torch.Tensor] = None
    colbert: Optional[torch.Tensor] = None
    ensemble: Optional[torch.Tensor] = None


def _fp32(fn):
    """Run `fn` with autocast off on its first argument's device, so the `.float()` matmuls stay fp32
    (under bf16 autocast a matmul of fp32 tensors would otherwise be cast back down)."""
    @functools.wraps(fn)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=first.device.type, enabled=False):
            return fn(first, *args, **kwargs)
    return wrapper


@_fp32
def dense_scores(q_dense: torch.Tensor, p_dense: torch.Tensor, temperature: float) -> torch.Tensor:
    """`(Nq, H) × (Np, H) -> (Nq, Np)`: inner products / τ."""
    return q_dense.float() @ p_dense.float().T / temperature


@_fp32
def sparse_scores(q_sparse: torch.Tensor, p_sparse: torch.Tensor, temperature: float) -> torch.Tensor:
    """`(Nq, V) × (Np, V) -> (Nq, Np)`: lexical matching score / τ (yes, divided by τ, as the recipe)."""
    return q_sparse.float() @ p_sparse.float().T / temperature


def _chunk_steps(n_whole: int, n_chunked: int, per_pair: int, max_elements: int) -> tuple[int, int]:
    """`(step of the side kept whole if it fits, step of the side chunked)` so that one block of
    `step_whole · step_chunked · per_pair` elements stays within `max_elements` (or is one pair)."""
    whole = n_whole if n_whole * per_pair <= max_elements else max(1, max_elements // per_pair)
    return whole, max(1, min(n_chunked, max_elements // max(1, whole * per_pair)))


def colbert_maxsim(q_vecs: torch.Tensor, q_mask: torch.Tensor, p_vecs: torch.Tensor,
                   p_mask: Optional[torch.Tensor] = None, *, padding: str = "masked",
                   max_elements: int = COLBERT_MAX_ELEMENTS) -> torch.Tensor:
    """Late-interaction max-sim `(Nq, Lq, D) × (Np, Lp, D) -> (Nq, Np)`: for each query vector the
    max inner product with the passage's vectors, summed over the query's vectors and divided by
    their number (the ones of `q_mask`, at least 1). No temperature and no cast: the caller's dtype.

    `padding` says what padding rows (zero vectors) do (docs/recipe.md §ColBERT max-sim variants):

    - `"kept"`: they take part. A passage's padding offers a dot product of 0 to the max; a query's
      padding rows add 0 to the sum. FlagEmbedding's training score, kept for parity of the losses
      (recipe.md §Scores); `p_mask` is not used.
    - `"masked"`: the passage's padding (`p_mask` 0) is left out of the max (`−inf`) and the query's
      padding (`q_mask` 0) out of the sum. BGE-M3's inference `colbert_score`: a score does not
      depend on how the batch around it is padded.

    The full token-score tensor has `Nq·Lq·Np·Lp` elements (for 8 queries × 512 tokens against 32
    passages × 8192 tokens, 4·10⁹ floats). When that exceeds `max_elements` it is built in chunks,
    cut along the side each variant's callers have many of: training ("kept": a few queries, their
    groups of passages) chunks the passages, retrieval ("masked": a block of queries against one
    corpus batch) the queries; the other side too if one item is still too big. Keeping each
    variant's chunks keeps its scores bit-identical to earlier runs (a matmul's rounding depends on
    its shape). Only the max indices of each chunk are kept for backward, so peak memory is one
    chunk, in the forward and the backward pass.
    """
    if padding not in COLBERT_PADDING:
        raise ValueError(f"padding must be one of {COLBERT_PADDING}, got {padding!r}")
    masked = padding == "masked"
    if masked and p_mask is None:
        raise ValueError('padding="masked" needs the passages\' mask p_mask')
    n_q, len_q = q_vecs.shape[:2]
    n_p, len_p = p_vecs.shape[:2]
    per_pair = max(1, len_q * len_p)
    if masked:
        p_step, q_step = _chunk_steps(n_p, n_q, per_pair, max_elements)
    else:
        q_step, p_step = _chunk_steps(n_q, n_p, per_pair, max_elements)
    q_real = q_mask.bool()[:, :, None] if masked else None                  # (Nq, Lq, 1)
    p_pad = ~p_mask.bool()[None, None] if masked else None                  # (1, 1, Np, Lp)
    rows = []
    for q0 in range(0, n_q, q_step):
        cols = []
        for p0 in range(0, n_p, p_step):
            token_scores = torch.einsum("qin,pjn->qipj", q_vecs[q0:q0 + q_step], p_vecs[p0:p0 + p_step])
            if masked:
                token_scores = token_scores.masked_fill(p_pad[:, :, p0:p0 + p_step], float("-inf"))
            best = token_scores.max(dim=-1).values                                  # (q_chunk, Lq, p_chunk)
            if masked:
                best = torch.where(q_real[q0:q0 + q_step], best, torch.zeros_like(best))
            cols.append(best.sum(dim=1))                                            # (q_chunk, p_chunk)
        rows.append(torch.cat(cols, dim=1))
    summed = torch.cat(rows, dim=0)
    return summed / q_mask.sum(dim=-1, keepdim=True).to(summed.dtype).clamp_min(1)


@_fp32
def colbert_scores(q_vecs: torch.Tensor, q_mask: torch.Tensor, p_vecs: torch.Tensor, temperature: float,
                   max_elements: int = COLBERT_MAX_ELEMENTS) -> torch.Tensor:
    """Training's ColBERT scores `(Nq, Np)`: `colbert_maxsim` with the padding kept, in fp32, / τ."""
    return colbert_maxsim(q_vecs.float(), q_mask, p_vecs.float(), padding="kept",
                          max_elements=max_elements) / temperature


def ensemble_scores(dense=None, sparse=None, colbert=None,
                    weights: Sequence[float] = ENSEMBLE_WEIGHTS):
    """`S_ens = w_dense·S_dense + w_lex·S_lex + w_mul·S_mul`, summed in that order over the heads
    given (a head that is None is left out; at least one is needed). Tensors of one shape, or plain
    numbers (one pair)."""
    total = None
    for weight, head_scores in zip(weights, (dense, sparse, colbert)):
        if head_scores is not None:
            total = weight * head_scores if total is None else total + weight * head_scores
    if total is None:
        raise ValueError("ensemble_scores needs the scores of at least one head")
    return total


def truncate_reps(reps: M3Reps, dense_dim: Optional[int], colbert_dim: Optional[int], normalize: bool) -> M3Reps:
    """Matryoshka prefixes (docs/recipe.md §Matryoshka): the dense vectors cut to their first
    `dense_dim` dims and the ColBERT vectors to their first `colbert_dim`, each re-normalised (per
    row, per token) when the model normalises; None keeps that head at full size. Sparse vectors are
    unchanged. Padding rows of ColBERT stay zero."""
    from m3composer.model.heads import l2_normalize

    def cut(x: Optional[torch.Tensor], dim: Optional[int]) -> Optional[torch.Tensor]:
        if x is None or dim is None or dim >= x.shape[-1]:
            return x
        return l2_normalize(x[..., :dim]) if normalize else x[..., :dim]

    return M3Reps(dense=cut(reps.dense, dense_dim), sparse=reps.sparse,
                  colbert=cut(reps.colbert, colbert_dim), colbert_mask=reps.colbert_mask)


def score(q: M3Reps, p: M3Reps, temperature: float, *, heads: Optional[Sequence[str]] = None,
          ensemble_weights: tuple[float, float, float] = ENSEMBLE_WEIGHTS,
          colbert_max_elements: int = COLBERT_MAX_ELEMENTS) -> M3Scores:
    """Score matrices between queries `q` and passages `p`, and their ensemble when two or more heads
    are scored (the weighted sum over those heads: recipe.md §Choosing the heads).

    `heads`: the heads to score (each needs both sides' representations); None = dense, plus sparse
    and ColBERT when both sides carry both."""
    if heads is None:
        both = all(r is not None for side in (q, p) for r in (side.sparse, side.colbert))
        heads = HEADS if both else ("dense",)
    unknown = set(heads) - set(HEADS)
    if unknown or not heads:
        raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {list(heads)}")
    out = M3Scores()
    if "dense" in heads:
        out.dense = dense_scores(q.dense, p.dense, temperature)
    if "sparse" in heads:
        out.sparse = sparse_scores(q.sparse, p.sparse, temperature)
    if "colbert" in heads:
        out.colbert = colbert_scores(q.colbert, q.colbert_mask, p.colbert, temperature, colbert_max_elements)
    if len(set(heads)) > 1:
        out.ensemble = ensemble_scores(out.dense, out.sparse, out.colbert, ensemble_weights)
    return out


class LexicalCost:
    """What the lexical vectors of some texts cost to store and to score, accumulated over batches
    of `(n, V)` vectors (docs/recipe.md §Sparsity control):

        non-zero terms per query / passage   mean over that side's texts of |{t : w[t] > 0}|
        expected dot-product cost            Σ_t p_q(t) · p_d(t),  p_x(t) = share of side x's texts
                                             whose weight for term t is non-zero

    The cost is the expected number of multiplications of one query-passage sparse dot product
    (SPLADE's "FLOPS"), estimated on the texts seen; the FLOPS regulariser is its smooth stand-in.
    """

    SIDES = ("query", "passage")

    def __init__(self):
        self.texts = dict.fromkeys(self.SIDES, 0)
        self.present: dict[str, Optional[torch.Tensor]] = dict.fromkeys(self.SIDES)   # (V,) texts with term t

    def add(self, side: str, sparse: torch.Tensor) -> None:
        """Count the non-zero terms of `sparse (n, V)`, the lexical vectors of `n` texts of `side`."""
        self.add_counts(side, (sparse.detach() > 0).sum(dim=0), sparse.shape[0])

    def add_counts(self, side: str, texts_with_term, num_texts: int) -> None:
        """Count `num_texts` texts of `side` whose `(V,)` per-term counts are `texts_with_term` (the
        number of them with a non-zero weight for each term; a tensor or an array)."""
        if side not in self.SIDES:
            raise ValueError(f"side must be one of {self.SIDES}, got {side!r}")
        per_term = torch.as_tensor(texts_with_term).to(torch.float64).cpu()
        seen = self.present[side]
        self.present[side] = per_term if seen is None else seen + per_term
        self.texts[side] += num_texts

    def summary(self) -> dict[str, float]:
        """`{"nonzero_per_query", "nonzero_per_passage", "expected_flops"}` (0 for a side with no texts)."""
        out = {f"nonzero_per_{side}": (float(self.present[side].sum()) / self.texts[side]
                                       if self.texts[side] else 0.0) for side in self.SIDES}
        q, p = self.present["query"], self.present["passage"]
        out["expected_flops"] = (float((q / self.texts["query"] * (p / self.texts["passage"])).sum())
                                 if q is not None and p is not None else 0.0)
        return out
