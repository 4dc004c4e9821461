"""Gradient cache (GradCache, Gao et al. 2021): the whole device batch in one loss, encoded in chunks.

The contrastive loss needs every row of the device batch at once, but the encoder's activations
need not all live at once. `encode_many` returns the same `M3Reps` as `M3Model.encode_many`, so
the loss code is unchanged, but builds them in three passes:

    1. forward, no graph: the rows (queries and passages together) are sorted by length and cut into
       chunks of at most `max_sequences` rows and `max_tokens` = rows × padded length; each chunk is
       encoded without autograd, keeping only what the heads output (dense vector, per-position
       sparse weights, ColBERT vectors) and the RNG state the chunk started from;
    2. the scores and every loss term are built on the full batch over these outputs (the (n, V)
       sparse vectors are scattered from the cached per-position weights inside the loss graph);
       Composer's single `loss.backward()` carries the gradient down to the cached outputs;
    3. the autograd node that produced them (`_ChunkedEncode.backward`) then re-encodes each chunk
       with the graph, restoring its RNG state (so dropout draws the same masks) and the autocast
       state of the forward, and back-propagates that chunk's slice of the gradient, one chunk at a
       time. Peak activation memory is one chunk's, at the cost of a second encoder forward.

Only the last chunk's gradient goes through the parameters' gradient accumulators, where DDP's
reducer hooks sit: the earlier chunks use `torch.autograd.grad` and add into `.grad` by hand (what
`no_sync` does), so DDP all-reduces once per step, the sum of all chunks. Gradient clipping and the
optimizer see ordinary `.grad` tensors after `loss.backward()` returns.

The gradient is exact for the dropout masks drawn. They are not the masks of the uncached run: the
encoder calls have other shapes (as with length grouping, `M3Model.encoder_hidden`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from m3composer.model.scores import M3Reps

CONFIG_KEY = "model.gradient_cache"


@dataclass(frozen=True)
class GradientCacheBudget:
    """Size of one chunk: at most `max_sequences` rows and `max_tokens` = rows × padded length."""
    max_sequences: int
    max_tokens: Optional[int] = None

    def __post_init__(self):
        if self.max_sequences < 1:
            raise ValueError(f"{CONFIG_KEY}.max_sequences must be >= 1, got {self.max_sequences}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"{CONFIG_KEY}.max_tokens must be >= 1 or null, got {self.max_tokens}")


def plan_chunks(lengths: Sequence[int], budget: GradientCacheBudget) -> list[np.ndarray]:
    """Cut rows into chunks under `budget`, longest rows first: a list of row-index arrays (rows of a
    chunk in input order). Rows are taken in length order, so a chunk is padded to its first row's
    length and holds rows of similar length; a new chunk starts when the next row would exceed either
    limit."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    if budget.max_tokens is not None and len(lengths) and int(lengths.max()) > budget.max_tokens:
        raise ValueError(f"{CONFIG_KEY}.max_tokens={budget.max_tokens} is smaller than one sequence of "
                         f"{int(lengths.max())} tokens in this batch")
    chunks, start = [], 0
    while start < len(order):
        padded = max(1, int(lengths[order[start]]))
        rows = budget.max_sequences
        if budget.max_tokens is not None:
            rows = min(rows, budget.max_tokens // padded)
        chunks.append(np.sort(order[start:start + rows]))
        start += rows
    return chunks


def _rng_state(device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _ChunkedEncoding:
    """The rows of all parts, the chunk plan, and what passes 1 and 3 need to agree on."""

    def __init__(self, model, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], chunks: list[np.ndarray],
                 with_sparse: bool, with_colbert: bool):
        self.model = model
        self.ids, self.mask = model.concat_parts(parts)
        self.lengths = self.mask.sum(dim=1).tolist()
        self.sizes = [ids.shape[0] for ids, _ in parts]
        self.widths = [ids.shape[1] for ids, _ in parts]
        self.offsets = np.cumsum([0] + self.sizes)
        self.chunks = chunks
        self.with_sparse, self.with_colbert = with_sparse, with_colbert
        self.rng_states: list = []
        device_type = self.ids.device.type
        self.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def _encode(self, rows: np.ndarray) -> list[Optional[torch.Tensor]]:
        """Head outputs `[dense, weights, colbert]` of these rows, padded to their longest row."""
        index = torch.as_tensor(rows, device=self.ids.device)
        longest = max(1, max(self.lengths[r] for r in rows))
        ids, mask = self.ids[index, :longest], self.mask[index, :longest]
        hidden = self.model.encoder_hidden(ids, mask)
        return list(self.model.head_outputs(hidden, mask, self.with_sparse, self.with_colbert))

    def _part_slices(self, rows: np.ndarray):
        """For each part: (its rows' positions in the chunk, their row indices in the part, the part's width)."""
        device = self.ids.device
        for k, (lo, hi) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
            inside = (rows >= lo) & (rows < hi)
            if inside.any():
                yield (k, torch.as_tensor(np.nonzero(inside)[0], device=device),
                       torch.as_tensor(rows[inside] - lo, device=device), self.widths[k])

    def encode_without_graph(self) -> list[list[Optional[torch.Tensor]]]:
        """Pass 1: per part, `[dense (n, H), weights (n, L), colbert (n, L-1, D)]` (None where off),
        each part at its own width (what `M3Model.encode_many` gives)."""
        outputs: Optional[list[list[Optional[torch.Tensor]]]] = None
        for rows in self.chunks:
            self.rng_states.append(_rng_state(self.ids.device))
            chunk = self._encode(rows)
            if outputs is None:
                outputs = [[None if t is None else t.new_zeros(_part_shape(i, t, n, w)) for i, t in enumerate(chunk)]
                           for n, w in zip(self.sizes, self.widths)]
            for k, at, local, width in self._part_slices(rows):
                for i, t in enumerate(chunk):
                    if t is not None:
                        w = _copy_width(i, t, width)
                        outputs[k][i][local, :w] = t[at, :w]
        self.layout = [[t is not None for t in part] for part in outputs]
        return outputs

    def flatten(self, outputs: list[list[Optional[torch.Tensor]]]) -> tuple[torch.Tensor, ...]:
        return tuple(t for part in outputs for t in part if t is not None)

    def unflatten(self, flat: Sequence[torch.Tensor]) -> list[list[Optional[torch.Tensor]]]:
        it = iter(flat)
        return [[next(it) if present else None for present in part] for part in self.layout]

    def replay(self, grads: list[list[Optional[torch.Tensor]]]) -> None:
        """Pass 3: re-encode each chunk with the graph and back-propagate its slice of `grads`."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        device = self.ids.device
        device_type, autocast_on, autocast_dtype = self.autocast
        for number, (rows, (cpu_state, cuda_state)) in enumerate(zip(self.chunks, self.rng_states)):
            with torch.random.fork_rng(devices=[device] if cuda_state is not None else [], device_type="cuda"):
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, device)
                with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                    chunk = self._encode(rows)
            outs, outs_grads = [], []
            for i, t in enumerate(chunk):
                if t is None:
                    continue
                g = torch.zeros_like(t)
                for k, at, local, width in self._part_slices(rows):
                    w = _copy_width(i, t, width)
                    g[at, :w] = grads[k][i][local, :w]
                outs.append(t)
                outs_grads.append(g)
            if number == len(self.chunks) - 1:
                # The one pass through the gradient accumulators (where DDP's all-reduce hooks sit).
                torch.autograd.backward(outs, outs_grads)
            else:
                chunk_grads = torch.autograd.grad(outs, params, outs_grads, allow_unused=True)
                for p, g in zip(params, chunk_grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)


def _part_shape(output: int, chunk_tensor: torch.Tensor, rows: int, width: int) -> tuple[int, ...]:
    """Shape of head output `output` (0 dense, 1 sparse weights, 2 ColBERT) for a part of `rows` rows."""
    if output == 0:
        return (rows, *chunk_tensor.shape[1:])
    if output == 1:
        return (rows, width)
    return (rows, width - 1, chunk_tensor.shape[2])


def _copy_width(output: int, chunk_tensor: torch.Tensor, width: int) -> Optional[int]:
    """Positions copied between a chunk and a part: the part's rows are padding past its width (and
    past the chunk's); None = the whole row (dense)."""
    if output == 0:
        return None
    return min(chunk_tensor.shape[1], width - (output == 2))


class _ChunkedEncode(torch.autograd.Function):
    """Autograd node between the parameters and the cached head outputs (see module doc)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, encoding: _ChunkedEncoding):
        ctx.encoding = encoding
        return encoding.flatten(encoding.encode_without_graph())

    @staticmethod
    def backward(ctx, *flat_grads):
        encoding, ctx.encoding = ctx.encoding, None
        encoding.replay(encoding.unflatten(flat_grads))
        return None, None


def encode_many(model, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], budget: GradientCacheBudget, *,
                with_sparse: bool = True, with_colbert: bool = True) -> list[M3Reps]:
    """`M3Model.encode_many` through the gradient cache: the same `M3Reps` per part, whose backward
    re-encodes chunk by chunk (see module doc). Call with grad enabled."""
    lengths = torch.cat([mask.sum(dim=1) for _, mask in parts]).tolist()
    return encode_chunks(model, parts, plan_chunks(lengths, budget), with_sparse=with_sparse,
                         with_colbert=with_colbert, cached=True)


def encode_chunks(model, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], chunks: list[np.ndarray], *,
                  with_sparse: bool, with_colbert: bool, cached: bool) -> list[M3Reps]:
    """Encode the rows of `parts` (concatenated in order) chunk by chunk (`M3Model.encoder_hidden` on each);
    `cached=False` builds the ordinary graph over the same calls (so the same dropout draws): the
    reference the cache must equal."""
    encoding = _ChunkedEncoding(model, parts, chunks, with_sparse, with_colbert)
    if cached:
        anchor = torch.zeros((), requires_grad=True)   # an input that needs grad, so the node's backward runs
        outputs = encoding.unflatten(_ChunkedEncode.apply(anchor, encoding))
    else:
        outputs = encoding.encode_without_graph()
    return [model.reps_from_head_outputs(dense, weights, colbert, ids, mask)
            for (dense, weights, colbert), (ids, mask) in zip(outputs, parts)]
