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
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

HEADS = ("dense", "sparse", "colbert")          # the three heads of an M3 model
SCORE_NAMES = HEADS + ("ensemble",)              # every score: the heads and their weighted sum
ENSEMBLE_WEIGHTS = (1.0, 0.3, 1.0)   # (dense, sparse, colbert), recipe.md §Scores

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
    dense: torch.Tensor
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


@_fp32
def colbert_scores(q_vecs: torch.Tensor, q_mask: torch.Tensor, p_vecs: torch.Tensor, temperature: float,
                   max_elements: int = COLBERT_MAX_ELEMENTS) -> torch.Tensor:
    """Late-interaction max-sim `(Nq, Lq, D) × (Np, Lp, D) -> (Nq, Np)`, divided by `N_q` and τ.

    The full token-score tensor has `Nq·Lq·Np·Lp` elements (for 8 queries × 512 tokens against 32
    passages × 8192 tokens, 4·10⁹ floats). When that exceeds `max_elements` the passages (and, if
    one passage is still too big, the queries) are processed in chunks. Only the max indices of each
    chunk are kept for backward, so peak memory is one chunk, in the forward and the backward pass.
    Padding rows are zero vectors: they count in the max over passage tokens and add 0 to the sum
    over query tokens (FlagEmbedding's training score, kept for parity: recipe.md §Scores).
    """
    q_vecs, p_vecs = q_vecs.float(), p_vecs.float()
    n_q, len_q = q_vecs.shape[:2]
    n_p, len_p = p_vecs.shape[:2]
    per_query_passage = max(1, len_q * len_p)
    q_step = n_q if n_q * per_query_passage <= max_elements else max(1, max_elements // per_query_passage)
    p_step = max(1, min(n_p, max_elements // max(1, q_step * per_query_passage)))
    rows = []
    for q0 in range(0, n_q, q_step):
        q_chunk = q_vecs[q0:q0 + q_step]
        cols = []
        for p0 in range(0, n_p, p_step):
            token_scores = torch.einsum("qin,pjn->qipj", q_chunk, p_vecs[p0:p0 + p_step])
            cols.append(token_scores.max(dim=-1).values.sum(dim=1))      # (q_chunk, p_chunk)
        rows.append(torch.cat(cols, dim=1))
    summed = torch.cat(rows, dim=0)
    num_query_vectors = q_mask.sum(dim=-1, keepdim=True).float()
    return summed / num_query_vectors / temperature


def ensemble_scores(dense: torch.Tensor, sparse: torch.Tensor, colbert: torch.Tensor,
                    weights: tuple[float, float, float] = ENSEMBLE_WEIGHTS) -> torch.Tensor:
    """`S_ens = w_dense·S_dense + w_lex·S_lex + w_mul·S_mul` (all the same shape)."""
    w_dense, w_lex, w_mul = weights
    return w_dense * dense + w_lex * sparse + w_mul * colbert


def score(q: M3Reps, p: M3Reps, temperature: float, *,
          ensemble_weights: tuple[float, float, float] = ENSEMBLE_WEIGHTS,
          colbert_max_elements: int = COLBERT_MAX_ELEMENTS) -> M3Scores:
    """All score matrices between queries `q` and passages `p`; sparse/ColBERT/ensemble only when
    both sides carry those representations."""
    dense = dense_scores(q.dense, p.dense, temperature)
    if q.sparse is None or p.sparse is None or q.colbert is None or p.colbert is None:
        return M3Scores(dense=dense)
    sparse = sparse_scores(q.sparse, p.sparse, temperature)
    colbert = colbert_scores(q.colbert, q.colbert_mask, p.colbert, temperature, colbert_max_elements)
    return M3Scores(dense=dense, sparse=sparse, colbert=colbert,
                    ensemble=ensemble_scores(dense, sparse, colbert, ensemble_weights))
