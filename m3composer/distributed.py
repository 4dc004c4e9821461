"""Cross-rank negatives: gather representations from all ranks, with either gradient convention;
the sharing of work among ranks (`shard`, `gather_rows`: NegativeRefresh and the command-line tools
on N ranks, docs/operations.md §Evaluate, mine and score on N ranks); a tool's process group under a
launcher; and `shutdown`, the one process-group teardown.

Everything here is a no-op on one process, with or without a process group (FlagEmbedding
calls `dist.get_rank()` unconditionally and crashes without one).

Two conventions for the gradient of a loss computed on gathered tensors (docs/recipe.md
§Cross-rank negatives, §Gathers and gradients):

* `parity` (FlagEmbedding, the default): the other ranks' tensors are constants, the local slice
  is put back so only it carries a gradient (`gather_local_grad`). Every rank computes the same
  global loss; DDP then averages the W identical-shaped local gradients, so the applied gradient is
  `(1/W)·∇L_global` — the dense term weighs 1/W relative to the local terms.
* `full_batch`: the gather is differentiable (`gather_with_grad`, torch.distributed.nn); its
  backward sums every rank's gradient for this rank's slice, so after DDP's average the applied
  gradient equals the one-process gradient of the loss on the concatenated batch.
"""
from __future__ import annotations

import atexit
import functools
import os
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

CROSS_RANK_GRAD_SCALES = ("parity", "full_batch")
CROSS_DEVICE_HEADS = ("dense", "all")   # which heads score against every rank's passages


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from all ranks in rank order, differentiably."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather  # differentiable collective
    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks in rank order; only the local slice keeps its gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def sum_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over all ranks, the same sum on every rank (no gradient); `x` on one process.
    Under nccl the reduction runs on this rank's GPU and the result comes back to `x`'s device."""
    if not is_distributed():
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else x.device
    total = x.detach().to(device).clone()
    dist.all_reduce(total)
    return total.to(x.device)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks (targets, teacher scores: no gradient needed)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_for_negatives(x: torch.Tensor, cross_rank_grad_scale: str) -> torch.Tensor:
    """Gather `x` for cross-rank negatives under the named gradient convention (see module doc)."""
    if cross_rank_grad_scale == "parity":
        return gather_local_grad(x)
    if cross_rank_grad_scale == "full_batch":
        return gather_with_grad(x)
    raise ValueError(f"cross_rank_grad_scale must be one of {CROSS_RANK_GRAD_SCALES}, got {cross_rank_grad_scale!r}")


def pad_to_longest_across_ranks(tensors: list[torch.Tensor], dim: int = 1) -> list[torch.Tensor]:
    """The tensors (all of one size along `dim`) zero-padded along `dim` to the longest size any rank
    has there, so they can be gathered; one collective for all of them, differentiable. Zero rows
    are what one process's collate would have padded with."""
    if not is_distributed():
        return list(tensors)
    here = tensors[0].shape[dim]
    longest = int(gather_no_grad(torch.tensor([here], device=tensors[0].device)).max())
    if longest == here:
        return list(tensors)
    return [torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, longest - here]) for x in tensors]


# ---- work shared among ranks (NegativeRefresh, `m3c eval` / `mine` / `score-teacher` on N ranks) --------
def shard(n: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """`(start, stop, size)`: rank's contiguous share of n items, every share padded to `size`
    (only the last shares can be short, so the padded shares concatenated and cut to n are the n items)."""
    size = -(-n // world_size) if n else 0
    return min(n, rank * size), min(n, (rank + 1) * size), size


def my_shard(n: int) -> tuple[int, int, int]:
    """`shard(n, …)` of this process (all of it on one process)."""
    return shard(n, rank(), world_size())


def gather_all(local: torch.Tensor) -> list[torch.Tensor]:
    """`local` (same shape on every rank) from every rank, in rank order; `[local]` on one process."""
    if not is_distributed():
        return [local]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return parts


def gather_rows(local: np.ndarray, total: int, size: int, device) -> np.ndarray:
    """Every rank's `local` rows (its `shard`, padded here to `size`) concatenated in rank order, cut
    to `total`: the whole array on every rank. `device`: where the collective runs (cuda under nccl)."""
    padded = np.zeros((size,) + local.shape[1:], dtype=local.dtype)
    padded[:len(local)] = local
    parts = gather_all(torch.from_numpy(padded).to(device))
    return torch.cat([p.cpu() for p in parts]).numpy()[:total]


def gather_ragged(local: np.ndarray, device) -> np.ndarray:
    """Every rank's `local` (any length along the first axis, the other axes alike) concatenated in
    rank order, on every rank."""
    if not is_distributed():
        return local
    lengths = [int(n) for n in torch.cat(gather_all(torch.tensor([len(local)], device=device))).cpu()]
    parts = gather_rows(local, max(lengths) * len(lengths), max(lengths), device).reshape(
        (len(lengths), max(lengths)) + local.shape[1:])
    return np.concatenate([part[:n] for part, n in zip(parts, lengths)])


def max_across_ranks(value: int, device) -> int:
    """The largest `value` any rank has (`value` on one process)."""
    return int(torch.cat(gather_all(torch.tensor([value], device=device))).max())


# ---- a tool started by a launcher (`composer -n N`, torchrun) ----------------------------------------
def launched_world_size() -> int:
    """WORLD_SIZE as a launcher sets it (`composer -n N` and torchrun both do); 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def launched_process_group(device: str) -> Iterator[bool]:
    """For a command-line tool: under a launcher with WORLD_SIZE > 1, the default process group
    (nccl when `device` is cuda, or auto with a GPU: one GPU per local rank; gloo otherwise) for the
    body, ended through `shutdown` (ok when the body returned, not when it raised). Yields whether
    there are several ranks; without a launcher it does nothing and yields False."""
    if launched_world_size() <= 1:
        yield False
        return
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    shutdown_at_exit()
    ok = False
    try:
        yield True
        ok = True
    finally:
        shutdown(ok)


# ---- teardown (docs/recipe.md §Process-group teardown) ---------------------------------------------
GLOO_WORKER_THREADS = 2      # ProcessGroupGloo's default worker-thread count (torch 2.7)
SETTLE_S = 0.02              # GIL-free wait after the probes, for a worker still finishing a work
PROBE_RELEASE_S = 5.0        # bound on the wait for a worker to let go of a probe (microseconds normally)


def _release_gloo_workers(probes: int) -> None:
    """Let gloo's worker threads finish the works they hold, with the GIL free.

    A worker thread drops its last reference to a finished work (and so to the work's tensors) a
    little after the collective has returned. A tensor that Python has already dropped then needs
    the GIL to be freed, and `~ProcessGroupGloo` joins the workers while holding the GIL: a
    deadlock at `destroy_process_group`, or `std::terminate` if the group dies in interpreter
    finalisation. Each probe is a collective whose tensor this function keeps until the worker has
    let go of it (`_use_count() == 1`), sleeping meanwhile, so that a worker waiting for the GIL
    gets it; then one more short sleep."""
    for _ in range(probes):
        probe = torch.zeros(1)
        dist.all_reduce(probe)
        deadline = time.monotonic() + PROBE_RELEASE_S
        while probe._use_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.0005)
    time.sleep(SETTLE_S)


def shutdown(ok: bool = True) -> None:
    """Destroy the default process group, the one place this happens (end of training, of every
    multi-rank tool, and `atexit`). `ok`: every rank got here normally, so a barrier first makes
    every rank's collectives complete; after an error the other ranks may be gone, so no collective
    is started. A no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        if ok:
            dist.barrier()
            _release_gloo_workers(GLOO_WORKER_THREADS)
        else:
            time.sleep(SETTLE_S)
    elif ok:
        dist.barrier()
    dist.destroy_process_group()


@functools.cache
def shutdown_at_exit() -> None:
    """Register `shutdown(ok=False)` to run at interpreter exit (once per process), before
    finalisation: a process that ends without calling `shutdown` still destroys its group while
    the interpreter is whole."""
    atexit.register(shutdown, ok=False)
