"""Finding and loading the M3 model for inference: in a folder, or inside a training wrapper.

Evaluation, teacher scoring and export all need the bare `M3Model`, whether they are handed a folder,
the Composer model, or a DDP/FSDP wrapper around it; and they need to know which heads a folder
really has (a plain encoder folder has the dense head only; a run that trained some heads records
the fresh ones it left untrained).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from m3composer.model.folder_config import M3FolderConfig
from m3composer.model.m3 import COLBERT_FILE, NEW_HEADS, SPARSE_FILE, M3Model
from m3composer.model.scores import HEADS


def unwrap_m3(obj):
    """The `M3Model` inside `obj`: itself, a DDP/FSDP `.module`, or a wrapper's `.m3` / `.model`."""
    seen = obj
    for _ in range(4):
        if isinstance(seen, M3Model):
            return seen
        for attr in ("module", "m3", "model"):
            inner = getattr(seen, attr, None)
            if isinstance(inner, torch.nn.Module):
                seen = inner
                break
        else:
            break
    raise TypeError(f"no M3Model found in {type(obj).__name__} (looked at .module, .m3, .model)")


def missing_heads(folder: str | os.PathLike) -> dict[str, str]:
    """`{head: why}` for the heads a model folder cannot score with: sparse and ColBERT without both
    head files; a head its `m3composer.json` records as fresh (saved untrained by a run whose
    `loss.heads` left it out, docs/recipe.md §Choosing the heads), whose weights are random."""
    folder = Path(folder)
    if not ((folder / COLBERT_FILE).is_file() and (folder / SPARSE_FILE).is_file()):
        return {h: f"no {COLBERT_FILE}/{SPARSE_FILE}" for h in NEW_HEADS}
    return {h: "never trained (m3composer.json fresh_heads: not in the loss.heads of the run that saved it)"
            for h in M3FolderConfig.from_folder(folder).fresh_heads}


def heads_in_folder(folder: str | os.PathLike) -> tuple[str, ...]:
    """The heads a model folder really has (in `HEADS` order): dense always, sparse and ColBERT when
    their files exist and they are not fresh (`missing_heads`)."""
    missing = missing_heads(folder)
    return tuple(h for h in HEADS if h not in missing)


DEVICES = ("auto", "cpu", "cuda")


def inference_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; `cpu` / `cuda` as named."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is available")
    return torch.device(name)


def load_model_for_inference(folder: str | os.PathLike, pooling: Optional[str] = None, device: str = "cpu"):
    """`M3Model.from_pretrained` on `device` (`inference_device`), without its fresh-heads warning when
    the folder has no heads (the caller reports those heads as skipped instead)."""
    m3_log = logging.getLogger("m3composer.model.m3")
    previous = m3_log.level
    if heads_in_folder(folder) != HEADS:
        m3_log.setLevel(logging.ERROR)
    try:
        return M3Model.from_pretrained(folder, pooling=pooling).to(inference_device(device))
    finally:
        m3_log.setLevel(previous)
