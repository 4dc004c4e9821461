"""`m3composer.json`: how a model folder's encoder is meant to be used, next to its `config.json`.

An HF config says what the encoder *is*; this says how M3 uses it: dense pooling, normalisation and
the instruction prefixes it was trained with. `M3Model.save_pretrained` writes it and
`M3Model.from_pretrained` reads it, like `config.json`; the asset builders write it for the folders
they make. A folder without the file (a BGE-M3 or FlagEmbedding folder) reads as BGE-M3's choices:
CLS pooling, normalised, no instructions. FlagEmbedding ignores the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from m3composer.model.heads import POOLING_METHODS

FOLDER_CONFIG_FILE = "m3composer.json"


@dataclass(frozen=True)
class M3FolderConfig:
    pooling: str = "cls"
    normalize: bool = True
    query_instruction: Optional[str] = None
    passage_instruction: Optional[str] = None
    # How the run that produced this folder initialised heads it started without and trained (e.g.
    # {"sparse": "lexical_overlap", "new_head_lr_multiplier": 1.0}); None: the heads were loaded.
    head_init: Optional[dict] = None
    # The heads the training run that wrote this folder trained (`loss.heads`); None: not written by one.
    trained_heads: Optional[list] = None
    # Heads still as initialised (random): neither trained nor loaded from a folder that had them;
    # evaluation skips them (docs/recipe.md §Choosing the heads).
    fresh_heads: list = dataclasses.field(default_factory=list)
    # Lexical weights below this are dropped at inference (`model.sparse_threshold`, docs/recipe.md
    # §Sparsity control); 0: every positive weight is kept. FlagEmbedding does not read it.
    sparse_threshold: float = 0.0
    # The Matryoshka sizes the run trained besides the full ones (`loss.matryoshka`, docs/recipe.md
    # §Matryoshka): {"dense_dims": [...], "colbert_dims": [...]}; None: full sizes only.
    matryoshka: Optional[dict] = None

    def __post_init__(self):
        if self.pooling not in POOLING_METHODS:
            raise ValueError(f"pooling must be one of {POOLING_METHODS}, got {self.pooling!r}")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "M3FolderConfig":
        """The folder's settings; BGE-M3's defaults when it has no `m3composer.json`."""
        path = Path(folder) / FOLDER_CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            recorded = json.loads(path.read_text())
            return cls(**recorded)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a valid {FOLDER_CONFIG_FILE} ({err})") from err

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / FOLDER_CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
