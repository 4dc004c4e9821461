"""Loading Composer checkpoints without pickle's code execution (docs/recipe.md §Checkpoint loading).

Composer 0.32.1 reads every trainer checkpoint (`trainer.load_path`, autoresume, a preemption
resume; local or object store) through one private function, `composer.utils.checkpoint.
_torch_load_with_validation`, which calls `torch.load(..., weights_only=False)`: a full unpickle,
so a crafted file runs any code it names. `use_safe_loading` replaces that one function with
`load`: torch's restricted unpickler (`weights_only=True`) with an allow-list of exactly the
non-tensor types an m3composer checkpoint holds. Everything else in such a checkpoint is a dict,
list, tuple, str, number, bool, None or tensor (the model, optimizer and scheduler state, the
dataset position, the negative-refresh version, the RNG states, Composer's metadata).
"""
from __future__ import annotations

import datetime
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

# What a checkpoint holds besides containers, scalars and tensors; each entry names who puts it there.
ALLOWED_GLOBALS: list = [
    datetime.timedelta,                     # Composer's Timestamp: the wall-clock counters
    TorchVersion,                           # Composer's metadata: torch_version
    np.ndarray, np.dtype,                   # the numpy RNG state (an MT19937 uint32 key array)
    *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)},
    # numpy 2 pickles arrays with numpy._core's _reconstruct, numpy 1 with numpy.core's (older checkpoints)
    (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
]
TRUST_KEY = "trainer.trust_checkpoint"


class CheckpointError(Exception):
    """A checkpoint that is refused: not readable, or holding a type no m3composer checkpoint holds."""


@dataclass
class LoadPolicy:
    """How `load` treats the checkpoints of this run: `trust` loads with full pickle; `earlier` says
    where an earlier checkpoint may be found, for the message about one that cannot be read."""
    trust: bool = False
    earlier: str = ""


POLICY = LoadPolicy()


def load(path: str | os.PathLike, map_location: Any = "cpu", policy: LoadPolicy | None = None,
         shown: str | None = None) -> Any:
    """`torch.load` of a Composer checkpoint under the allow-list (or with full pickle when the policy
    trusts checkpoints). Raises CheckpointError, one line naming the file (`shown`, default `path`),
    for a file that holds another type or cannot be read; FileNotFoundError passes through (Composer
    explains it)."""
    policy = policy or POLICY
    name = shown or str(path)
    if policy.trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused:
            raise CheckpointError(
                f"{name}: refused: it holds {refused.group(1)}, which no m3composer checkpoint holds, and "
                f"loading it would run code the file names; if you trust the file, set {TRUST_KEY}=true") from None
        raise CheckpointError(_unreadable(name, err, policy)) from None
    except (EOFError, OSError, RuntimeError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(_unreadable(name, err, policy)) from None


def _unreadable(name: str, err: BaseException, policy: LoadPolicy) -> str:
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'empty'}"[:200]
    return (f"{name}: cannot read this checkpoint ({reason}): it is truncated or not a Composer checkpoint; "
            f"delete it and resume from an earlier one, or start without it. {policy.earlier}").rstrip()


def earlier_checkpoints_note(save_folder: str | None, keep: int) -> str:
    """The sentence about earlier checkpoints for the unreadable-checkpoint message."""
    if not save_folder:
        return "This run saves no checkpoints (trainer.save_folder is not set)."
    if keep == 1:
        return (f"{save_folder} keeps only the latest checkpoint (trainer.save_num_checkpoints_to_keep=1), "
                "so no earlier one is there.")
    kept = sorted(p.name for p in Path(save_folder).glob("ep*-ba*.pt") if not p.is_symlink()) \
        if Path(save_folder).is_dir() else []
    listed = f": {', '.join(kept)}" if kept else ""
    return (f"Earlier checkpoints are kept in {save_folder} (trainer.save_num_checkpoints_to_keep={keep}){listed}; "
            "pass one as trainer.load_path.")


def use_safe_loading(policy: LoadPolicy) -> None:
    """Route Composer's checkpoint loads in this process through `load` under `policy`."""
    from composer.utils import checkpoint as composer_checkpoint

    if not hasattr(composer_checkpoint, "_torch_load_with_validation"):   # refuse to run unprotected
        raise RuntimeError("composer.utils.checkpoint._torch_load_with_validation is gone: this Composer is not "
                           "the 0.32.1 that m3composer pins, so its checkpoint loading cannot be made safe here")
    POLICY.trust, POLICY.earlier = policy.trust, policy.earlier

    def torch_load_with_validation(checkpoint_filepath, map_location):
        """Composer's checkpoint validation hook (CHECKPOINT_VALIDATION_FUNCTION), then `load`. Composer
        hands over a link to a local checkpoint (named by its target here) or a downloaded copy."""
        path = composer_checkpoint._ensure_valid_checkpoint(checkpoint_filepath)
        shown = os.path.realpath(path) if os.path.islink(path) else f"{path} (Composer's download of the checkpoint)"
        return load(path, map_location, shown=shown)

    composer_checkpoint._torch_load_with_validation = torch_load_with_validation
