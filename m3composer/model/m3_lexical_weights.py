"""M3LexicalWeights: BGE-M3's sparse head as a sentence-transformers module (shipped inside export folders).

`m3c export-st` copies this file, unchanged, into the `sparse` folder, whose `modules.json` names
`m3_lexical_weights.M3LexicalWeights` after the Transformer. sentence-transformers imports it only
when the user passes `trust_remote_code=True`: it has no module for M3's lexical weights
(`SpladePooling` reads MLM logits and applies log1p, M3 reads the last hidden state through a
1-unit linear layer and applies ReLU only).

For every position l of a text: `w_l = ReLU(linear(h_l))` (0 at padding); the `(vocab,)` output
keeps, per token id, the max weight over the positions with that id; the special ids (cls, eos,
pad, unk) weigh 0. That is `M3Model.encode_texts(...)["lexical_weights"]` as a dense vocabulary
vector, which `SparseEncoder` turns into a sparse tensor.

Only torch, safetensors and sentence-transformers are imported (no m3composer: the file must run
where m3composer is not installed). Without sentence-transformers the class is a plain
`torch.nn.Module` with the same forward, which is how m3composer's own tests run it.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

try:
    from sentence_transformers.base.modules.module import Module
except ImportError:  # m3composer's tests run the forward without sentence-transformers
    Module = nn.Module

MODULE_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class M3LexicalWeights(Module):
    """`features["token_embeddings"] (n, L, H)` + `input_ids` -> `features["sentence_embedding"] (n, V)`."""

    config_keys = ["in_features", "vocab_size", "special_token_ids"]

    def __init__(self, in_features: int, vocab_size: int, special_token_ids: list[int]):
        super().__init__()
        self.in_features = int(in_features)
        self.vocab_size = int(vocab_size)
        self.special_token_ids = sorted(int(i) for i in special_token_ids)
        self.linear = nn.Linear(self.in_features, 1)

    def forward(self, features: dict, **kwargs) -> dict:
        if "cu_seq_lens_q" in features:   # flash-attention unpadded batch: back to (n, L, H)
            from sentence_transformers.util.tensor import repad_flattened_features
            features = repad_flattened_features(features)
        hidden = features["token_embeddings"]
        input_ids = features["input_ids"]
        mask = features["attention_mask"].to(hidden.dtype)
        weights = torch.relu(self.linear(hidden)).squeeze(-1) * mask
        vocab = torch.zeros(hidden.shape[0], self.vocab_size, dtype=weights.dtype, device=weights.device)
        # weights are >= 0, so the zero start value of the max changes nothing
        vocab = vocab.scatter_reduce(1, input_ids, weights, reduce="amax", include_self=True)
        if self.special_token_ids:
            keep = torch.ones(self.vocab_size, dtype=vocab.dtype, device=vocab.device)
            keep[self.special_token_ids] = 0
            vocab = vocab * keep
        features["sentence_embedding"] = vocab
        return features

    def get_embedding_dimension(self) -> int:
        return self.vocab_size

    def get_sentence_embedding_dimension(self) -> int:   # the name older releases ask for
        return self.vocab_size

    def get_config_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.config_keys}

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        from safetensors.torch import save_file
        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, MODULE_CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(self.get_config_dict(), handle, indent=2)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(output_path, WEIGHTS_FILE))

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "M3LexicalWeights":
        from safetensors.torch import load_file
        hub = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        config_path = cls.load_file_path(model_name_or_path, MODULE_CONFIG_FILE, subfolder=subfolder, **hub)
        weights_path = cls.load_file_path(model_name_or_path, WEIGHTS_FILE, subfolder=subfolder, **hub)
        if config_path is None or weights_path is None:
            raise FileNotFoundError(f"{model_name_or_path}/{subfolder}: {MODULE_CONFIG_FILE} and {WEIGHTS_FILE} are needed")
        with open(config_path, encoding="utf-8") as handle:
            module = cls(**json.load(handle))
        module.load_state_dict(load_file(weights_path))
        return module
