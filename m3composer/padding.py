"""Right-padding token id sequences into `(input_ids, attention_mask)`: the one padder of the package.

Training batches (`data/collate`), inference (`M3Model.encode_texts`) and evaluation all pad the
same way: rows left-aligned, `pad_id` after the last token, mask 1 on real tokens. Built in numpy
and converted once per tensor (one small `torch.tensor` per row cost more than the encoder on tiny
batches).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int,
              pad_to_multiple_of: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, both `(n, L)` long, `L` the longest row (rounded up to a
    multiple of `pad_to_multiple_of` when given)."""
    length = max((len(s) for s in sequences), default=0)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    lengths = np.empty(len(sequences), dtype=np.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = seq
        lengths[row] = len(seq)
    attention_mask = (np.arange(length) < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
