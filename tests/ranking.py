"""Ranking assertions that hold on any CPU.

Two correct implementations can sum a score in different orders (batched vs one text at a time,
AVX-512 vs AVX2), so scores that agree to ~1e-6 may still swap two documents whose scores differ by
less than that. These helpers check that a ranking is *consistent* with reference scores up to a
tolerance instead of asserting one exact order; where neighbours are further apart than the
tolerance, that is the same as asserting the exact order.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SCORE_TOL = 1e-5   # far above float32 rounding differences of a dot product (~1e-7), far below real gaps


def assert_ranked_by(ranked: Sequence[str], scores: Mapping[str, float], tol: float = SCORE_TOL) -> None:
    """`ranked` (best first, possibly a top-k) orders `scores`' keys by score, up to `tol`:
    every document scores no more than `tol` above the one ranked before it, and no document left
    out scores more than `tol` above the last one kept."""
    assert len(set(ranked)) == len(ranked) and set(ranked) <= set(scores), ranked
    values = [scores[d] for d in ranked]
    for i in range(1, len(values)):
        assert values[i] <= values[i - 1] + tol, (f"{ranked[i]} ({values[i]:.7g}) ranked below "
                                                  f"{ranked[i - 1]} ({values[i - 1]:.7g})")
    left_out = [scores[d] for d in scores if d not in set(ranked)]
    if left_out and values:
        assert max(left_out) <= values[-1] + tol, f"a document scoring {max(left_out):.7g} was left out"


def min_neighbour_gap(scores: np.ndarray) -> float:
    """Smallest gap between two adjacent scores of any row: how separated a model's scores are."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64), axis=-1)
    return float(np.diff(ordered, axis=-1).min())
