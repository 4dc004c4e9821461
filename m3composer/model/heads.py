"""The three M3 heads: from an encoder's last hidden state to dense, sparse and ColBERT representations.

These are plain functions over tensors (the `nn.Linear` heads are passed in), so the model class
stays short and every head can be tested with hand-made tensors. Shapes: `hidden (n, L, H)`,
`input_ids`/`attention_mask (n, L)`. Formulas: docs/recipe.md §Dense head, §Sparse head, §ColBERT head.

* dense:   pooled vector (`cls` = position 0, the recipe; `mean` = attention-mask-weighted mean,
           what e5 models were trained with), L2-normalised when `normalize`.
* sparse:  `w[n, l] = ReLU(sparse_linear(hidden[n, l]))`, aggregated per token id with **max** into a
           `(n, V)` vocabulary vector; the special ids (cls, eos, pad, unk) get weight 0.
* ColBERT: `colbert_linear(hidden[:, 1:])` (every token after CLS), padding rows zeroed, each row
           L2-normalised when `normalize`.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

POOLING_METHODS = ("cls", "mean")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """`x / max(‖x‖₂, 1e-12)` along the last dim (zero rows stay zero), as the recipe does."""
    return F.normalize(x, p=2, dim=-1, eps=1e-12)


def pool_dense(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence vector `(n, H)` from `hidden (n, L, H)`; not normalised here."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLING_METHODS}")


def sparse_token_weights(hidden: torch.Tensor, sparse_linear: nn.Linear) -> torch.Tensor:
    """Per-position lexical weight `ReLU(sparse_linear(hidden))`, shape `(n, L)`, every position."""
    return torch.relu(sparse_linear(hidden)).squeeze(-1)


# `colbert_dim` that sizes the ColBERT vectors as the encoder's hidden size (the recipe's, D = H)
COLBERT_DIM_HIDDEN = -1

# How a fresh sparse head starts (`model.new_sparse_head_init`, docs/recipe.md §A fresh sparse head).
SPARSE_INITS = ("idf", "lexical_overlap", "default")
FITTED_SPARSE_INITS = ("idf",)      # then fitted on a sample of the training data (model/sparse_fit.py)


def init_fresh_sparse_head(sparse_linear: nn.Linear, how: str, temperature: float) -> None:
    """Start a sparse head the model folder did not have as `how` (one of `SPARSE_INITS`) says:
    `lexical_overlap` and `idf` start as lexical overlap (`idf` is its special case with every idf
    equal; `needs_sparse_fit` says it is still to be fitted once the training data is open),
    `default` keeps PyTorch's init (FlagEmbedding's). `temperature`: the τ the model scores with."""
    if how not in SPARSE_INITS:
        raise ValueError(f"unknown sparse head init {how!r}; expected one of {SPARSE_INITS}")
    if how != "default":
        init_sparse_as_lexical_overlap(sparse_linear, temperature)


def needs_sparse_fit(how: str) -> bool:
    """Whether a fresh sparse head started as `how` is then fitted to the training data."""
    return how in FITTED_SPARSE_INITS


def init_sparse_as_lexical_overlap(sparse_linear: nn.Linear, temperature: float) -> None:
    """Start a fresh sparse head as plain lexical overlap: weight 0, bias √τ.

    Every token then weighs √τ, so each token a query shares with a passage adds √τ·√τ/τ = 1 logit
    to the sparse score: the head starts as a bag-of-words matcher that already ranks, every ReLU
    is active, and the gradient reaches W through every token (`∂w_t/∂W = h_t`). Training then
    learns which tokens matter. PyTorch's default init instead gives weights near 0.05·‖h‖ of
    either sign: most tokens weigh 0 and the rest a few hundredths, so sparse scores are flat
    (loss ln(B·G)) and the gradient, a product of two small weights, stays small
    (recipe.md §Sparse head).
    """
    with torch.no_grad():
        sparse_linear.weight.zero_()
        sparse_linear.bias.fill_(temperature ** 0.5)


def special_token_mask(vocab_size: int, special_token_ids: Iterable[int], device=None, dtype=None) -> torch.Tensor:
    """`(V,)` tensor: 0 at the special ids, 1 elsewhere (multiplied in, so autograd sees no in-place edit)."""
    keep = torch.ones(vocab_size, device=device, dtype=dtype)
    ids = sorted(set(int(i) for i in special_token_ids if i is not None))
    if ids:
        keep[ids] = 0
    return keep


def sparse_vocab_weights(token_weights: torch.Tensor, input_ids: torch.Tensor, vocab_size: int,
                         special_token_ids: Iterable[int]) -> torch.Tensor:
    """Vocabulary vector `v (n, V)`: `v[n, t] = max_{l: input_ids[n,l]=t} token_weights[n, l]`, 0 elsewhere.

    Built with one `scatter_reduce(..., "amax")` into `(n, V)`, never an `(n, L, V)` tensor
    (FlagEmbedding's out-of-memory path, recipe.md §Sparse head). Weights are ≥ 0, so including
    the zero initial value changes nothing. The special ids' columns are zeroed by a constant 0/1
    mask. Memory: the `n·V` floats of the result, about 1 MB per text for V=250,002 in fp32
    (plus its gradient during backward). `_VocabMax` keeps only `(n, L)` tensors for the backward,
    where autograd's own scatter, zeros and mask ops would keep two more `(n, V)` copies
    (recipe.md §Sparse head, memory).
    """
    keep = special_token_mask(vocab_size, special_token_ids, device=token_weights.device, dtype=token_weights.dtype)
    return _VocabMax.apply(token_weights, input_ids, keep)


class _VocabMax(torch.autograd.Function):
    """`scatter_reduce(zeros(n, V), 1, ids, w, "amax", include_self=True) * keep`, with the gradient
    autograd gives it, from `(n, L)` saved tensors: each `(n, V)` cell's gradient is shared equally
    by every input equal to its maximum (the zero it started from included), as torch's own backward
    of `amax` does; here only the weights get one."""

    @staticmethod
    def forward(ctx, token_weights: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        vocab = token_weights.new_zeros(token_weights.shape[0], keep.shape[0])
        vocab.scatter_reduce_(1, input_ids, token_weights, reduce="amax", include_self=True)
        peak = vocab.gather(1, input_ids)              # each position's token's maximum, before the mask
        ctx.save_for_backward(token_weights, input_ids, peak, keep)
        return vocab.mul_(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        token_weights, input_ids, peak, keep = ctx.saved_tensors
        is_peak = (token_weights == peak).to(grad.dtype)
        # how many inputs share each cell's maximum: the positions equal to it, plus the initial 0
        sharing = torch.zeros_like(grad).scatter_add_(1, input_ids, is_peak).gather(1, input_ids)
        sharing = sharing + (peak == 0).to(grad.dtype)
        at_position = grad.gather(1, input_ids) * keep[input_ids]
        return is_peak * (at_position / sharing), None, None


def colbert_vectors(hidden: torch.Tensor, attention_mask: torch.Tensor, colbert_linear: nn.Linear,
                    normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ColBERT token vectors `(n, L-1, D)` for every position after CLS, and their mask `(n, L-1)`.

    Padding rows are exactly zero (multiplied by the mask before normalising), which is what makes
    the max-sim see zeros from padding (kept for parity with FlagEmbedding; recipe.md §Scores).
    """
    mask = attention_mask[:, 1:]
    vecs = colbert_linear(hidden[:, 1:]) * mask.unsqueeze(-1).to(hidden.dtype)
    if normalize:
        vecs = l2_normalize(vecs)
    return vecs, mask
