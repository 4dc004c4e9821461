"""Start a fresh sparse head as idf-weighted lexical overlap, fitted on the training data
(`model.new_sparse_head_init: idf`, docs/recipe.md §A fresh sparse head).

The head keeps its architecture, `w_t = ReLU(W·h_t + b)` per position (FlagEmbedding's), so the
export still loads in `BGEM3FlagModel`. Only its starting values change: W and b are the ridge
least-squares fit of `c · idf(t)` on the base encoder's last hidden states `h_t` over a sample of
the training passages and queries, where

    idf(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))        (BM25's, over the N sampled passages)
    c      = √(τ / mean(idf²))                                 (the mean position's target, squared, is τ)

A shared token then adds about `c²·idf(t)²/τ` logits to the sparse score: one logit for a token of
average idf, near 0 for tokens in every passage (the instruction prefix, punctuation), several for
rare ones — the vector-space model's tf-idf dot product with binary term frequency. A linear map of
contextual hidden states cannot hold a per-token table exactly; `r2` (the fraction of the target's
variance the fit explains) is returned and recorded so that a poor fit shows. Training refines the
head from there, as from `lexical_overlap` (W = 0, b = √τ, every token one logit), which is this fit
with every idf equal.

Everything is a pure function of the model and the token ids given. On several ranks every rank
is given the same sample, encodes 1/W of its batches and the normal equations are summed across
ranks (`distributed.sum_across_ranks`), so every rank solves the same system: the encode costs 1/W
and the heads agree (DDP broadcasts rank 0's parameters at wrap anyway).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from m3composer import distributed
from m3composer.padding import right_pad


def idf_of(passages: Sequence[np.ndarray], vocab_size: int, special_ids: Iterable[int]) -> np.ndarray:
    """`(V,)` BM25 idf over the passages' distinct token ids (special ids get 0)."""
    df = np.zeros(vocab_size, dtype=np.float64)
    for ids in passages:
        df[np.unique(np.asarray(ids, dtype=np.int64))] += 1
    n = len(passages)
    idf = np.log1p((n - df + 0.5) / (df + 0.5))
    idf[sorted(set(int(i) for i in special_ids if i is not None))] = 0.0
    return idf


def fit_sparse_head_to_idf(m3, passages: Sequence[np.ndarray], queries: Sequence[np.ndarray], *,
                           temperature: float, pad_id: int, batch_size: int = 32, ridge: float = 1e-3) -> dict:
    """Set `m3.sparse_linear` to the ridge fit of c·idf (module doc) on these model-ready token ids
    (prefixed, truncated: what the collator feeds); returns the fit's facts for `head_init`.

    `ridge` is relative: λ = ridge × the mean variance of a hidden dimension. The normal equations
    are accumulated batch by batch in float64, so memory is one encoder batch plus H×H.
    """
    if not passages:
        raise ValueError("the idf fit of the sparse head needs at least one training passage")
    special = [i for i in m3.special_token_ids.values() if i is not None]
    idf = idf_of(passages, m3.vocab_size, special)
    special_t = torch.tensor(sorted(set(special)), dtype=torch.long)
    hidden = m3.encoder.config.hidden_size
    xtx = torch.zeros(hidden, hidden, dtype=torch.float64)
    xty = torch.zeros(hidden, dtype=torch.float64)
    sx = torch.zeros(hidden, dtype=torch.float64)
    sy = syy = 0.0
    count = 0
    device = next(m3.parameters()).device
    idf_t = torch.from_numpy(idf)
    sequences = list(passages) + list(queries)
    order = np.argsort([-len(s) for s in sequences], kind="stable")
    starts = range(distributed.rank() * batch_size, len(order), distributed.world_size() * batch_size)
    was_training = m3.training
    m3.eval()                                   # no dropout: the fit sees the encoder as it ranks
    try:
        with torch.no_grad():
            for start in starts:                # this rank's share of the length-sorted batches
                ids, mask = right_pad([sequences[r] for r in order[start:start + batch_size]], pad_id)
                h = m3.encoder_hidden(ids.to(device), mask.to(device)).double().cpu()
                keep = mask.bool() & ~torch.isin(ids, special_t)
                x, y = h[keep], idf_t[ids[keep]]
                xtx += x.T @ x
                xty += x.T @ y
                sx += x.sum(0)
                sy += float(y.sum())
                syy += float((y * y).sum())
                count += len(y)
    finally:
        m3.train(was_training)
    flat = distributed.sum_across_ranks(torch.cat([xtx.flatten(), xty, sx, torch.tensor([sy, syy, count],
                                                                                        dtype=torch.float64)]))
    xtx, xty, sx = flat[:hidden * hidden].view(hidden, hidden), flat[hidden * hidden:hidden * (hidden + 1)], \
        flat[hidden * (hidden + 1):hidden * (hidden + 2)]
    sy, syy, count = float(flat[-3]), float(flat[-2]), int(flat[-1])
    if count == 0:
        raise ValueError("the idf fit of the sparse head found no non-special token in the sample")
    scale = math.sqrt(temperature / (syy / count)) if syy > 0 else math.sqrt(temperature)
    mean_x, mean_y = sx / count, sy / count
    cov = xtx / count - torch.outer(mean_x, mean_x)
    cross = xty / count - mean_x * mean_y
    lam = ridge * float(torch.diagonal(cov).mean())
    w = torch.linalg.solve(cov + lam * torch.eye(hidden, dtype=torch.float64), cross)
    b = mean_y - float(mean_x @ w)
    # explained variance of the unscaled target: 1 - E[(xw + b - y)^2] / Var(y)
    var_y = syy / count - mean_y ** 2
    resid = float(w @ cov @ w - 2 * w @ cross) + var_y
    r2 = 1.0 - resid / var_y if var_y > 0 else 0.0
    with torch.no_grad():
        m3.sparse_linear.weight.copy_((scale * w).to(m3.sparse_linear.weight.dtype).view_as(m3.sparse_linear.weight))
        m3.sparse_linear.bias.fill_(scale * b)
    return {"passages": len(passages), "queries": len(queries), "positions": count, "scale": round(scale, 6),
            "r2": round(r2, 4)}
