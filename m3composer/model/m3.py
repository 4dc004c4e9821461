"""M3Model: a Hugging Face encoder with BGE-M3's dense, sparse and ColBERT heads.

Two steps are kept apart on purpose (a gradient cache later works on the seam between them):

    encode(input_ids, attention_mask) -> M3Reps     (token ids -> each head's representation)
    score(q_reps, p_reps, temperature) -> M3Scores  (representations -> score matrices, scores.py)

A saved folder is what FlagEmbedding's `BGEM3FlagModel` loads: the encoder (`config.json` +
`model.safetensors`) and tokenizer at the root, `colbert_linear.pt` and `sparse_linear.pt` as plain
CPU state dicts (keys `weight`, `bias`), plus our `m3composer.json` (pooling, normalisation,
instruction prefixes) that FlagEmbedding ignores.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from m3composer.fsutil import building_dir
from m3composer.model.folder_config import M3FolderConfig
from m3composer.padding import right_pad
from m3composer.model import heads
from m3composer.model.scores import COLBERT_MAX_ELEMENTS, ENSEMBLE_WEIGHTS, M3Reps, M3Scores, score

log = logging.getLogger(__name__)

COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"
NEW_HEADS = ("sparse", "colbert")     # the heads with weights of their own, new when a folder has no head files
# XLM-R / bge-m3 ids of <s>, <pad>, </s>, <unk>: used only when neither a tokenizer nor explicit ids exist.
XLMR_SPECIAL_IDS = {"cls": 0, "pad": 1, "eos": 2, "unk": 3}
# Per-call overhead of the encoder in tokens (length_chunks); CPU measured, GPU estimated (BENCHMARKS.md
# §Measurements behind code comments).
OVERHEAD_TOKENS_CPU_MIN = 32.0
OVERHEAD_TOKENS_GPU = 1024.0
# Encoding for inference (m3c eval / mine / score-teacher and the evaluation callback), unless told otherwise
INFERENCE_BATCH_SIZE = 32
INFERENCE_QUERY_MAX_LEN = 64
INFERENCE_PASSAGE_MAX_LEN = 512


def special_ids_from_tokenizer(tokenizer) -> dict[str, int]:
    """cls/eos/pad/unk ids, the four tokens whose sparse weight is zeroed (as FlagEmbedding does)."""
    ids = {"cls": tokenizer.cls_token_id, "eos": tokenizer.eos_token_id,
           "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _load_encoder(folder: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """AutoModel without the pooler where the class has one (an unused pooler breaks DDP)."""
    try:
        return AutoModel.from_pretrained(folder, add_pooling_layer=False, trust_remote_code=False, **kwargs)
    except TypeError:  # encoder classes without a pooler do not accept the argument
        return AutoModel.from_pretrained(folder, trust_remote_code=False, **kwargs)


def length_chunks(lengths: Sequence[int], hidden_size: int, overhead_tokens: Optional[float] = None,
                  device_type: str = "cpu") -> list[np.ndarray]:
    """Cut rows into chunks of similar length for the encoder: a list of row-index arrays (shortest
    chunk first, rows of a chunk in input order), each chunk to be padded to its longest row.

    Chooses the cut by dynamic programming over the sorted lengths, minimising the estimated encoder
    cost `Σ_chunks rows·L·(1 + L/(6H)) + overhead_tokens·chunks`: per-token work (the layers'
    matmuls, ~24·H² FLOPs a token, plus attention, ~4·L·H) on padded tokens, and a fixed cost per
    encoder call. `overhead_tokens` defaults to 2¹⁹/H² tokens (at least 32) on CPU, fitted to
    measurements (BENCHMARKS.md §Measurements behind code comments), and 1024 on GPU; on a big
    model it is a few tokens, so chunks get small only when that saves padding.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    if n <= 1:
        return [order]
    if overhead_tokens is None:
        overhead_tokens = default_overhead_tokens(hidden_size, device_type)
    longest = lengths[order]
    per_row = longest * (1.0 + longest / (6.0 * hidden_size))    # cost of one row padded to longest[i]
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    starts = np.arange(n)
    for end in range(1, n + 1):
        # chunk [i, end) costs (end - i) rows at the cost of its first row, plus the call overhead
        cost = best[:end] + (end - starts[:end]) * per_row[:end] + overhead_tokens
        i = int(np.argmin(cost))
        best[end], cut[end] = cost[i], i
    bounds, end = [], n
    while end > 0:
        bounds.append((cut[end], end))
        end = cut[end]
    # Shortest chunk first and each chunk's rows in input order: where the cut is just "queries |
    # passages", the encoder sees exactly the two calls (and dropout draws) of separate encodes.
    return [np.sort(order[a:b]) for a, b in bounds]


def default_overhead_tokens(hidden_size: int, device_type: str = "cpu") -> float:
    """The fixed cost of one more encoder call, in tokens of per-token work (see `length_chunks`)."""
    if device_type == "cpu":
        return max(OVERHEAD_TOKENS_CPU_MIN, 2.0 ** 19 / float(hidden_size) ** 2)
    # A GPU runs a token's matmuls in microseconds while each call launches hundreds of kernels.
    return OVERHEAD_TOKENS_GPU


class M3Model(nn.Module):
    """Encoder + `colbert_linear (H -> D)` + `sparse_linear (H -> 1)`; see module doc.

    `pooling` ("cls" | "mean") and `normalize` are the dense head's settings; they are saved in
    `m3composer.json`. `special_token_ids` are the ids whose sparse weight is forced to 0.
    """

    def __init__(self, encoder: PreTrainedModel, colbert_linear: nn.Linear, sparse_linear: nn.Linear, *,
                 pooling: str = "cls", normalize: bool = True, special_token_ids: Optional[dict[str, int]] = None,
                 tokenizer=None, query_instruction: Optional[str] = None,
                 passage_instruction: Optional[str] = None):
        super().__init__()
        if pooling not in heads.POOLING_METHODS:
            raise ValueError(f"pooling must be one of {heads.POOLING_METHODS}, got {pooling!r}")
        self.encoder = encoder
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear
        self.pooling = pooling
        self.normalize = normalize
        self.tokenizer = tokenizer
        if special_token_ids is None:
            if tokenizer is not None:
                special_token_ids = special_ids_from_tokenizer(tokenizer)
            else:
                log.warning("M3Model: no tokenizer and no special_token_ids; assuming XLM-R ids %s", XLMR_SPECIAL_IDS)
                special_token_ids = dict(XLMR_SPECIAL_IDS)
        self.special_token_ids = dict(special_token_ids)
        self.query_instruction = query_instruction
        self.passage_instruction = passage_instruction
        # Heads whose weights are as initialised, never trained (falsy when none): sparse and ColBERT
        # when from_pretrained found no head files, else what the folder's m3composer.json records
        # (heads an earlier run saved untrained). Those no run trains are recorded on save and
        # skipped by evaluation (`untrained_fresh_heads`, inference.heads_in_folder).
        self.fresh_heads: tuple[str, ...] = ()
        # of those, the ones the folder's m3composer.json recorded (what a save without training keeps)
        self.recorded_fresh_heads: tuple[str, ...] = ()
        # The heads a training run trains (ComposerM3 sets it); None: not being trained here
        self.trained_heads: Optional[tuple[str, ...]] = None
        # how the training run initialised fresh heads; recorded in m3composer.json by save_pretrained
        self.head_init: Optional[dict] = None
        # lexical weights below it are zeroed outside training (recipe.md §Sparsity control); 0 = off
        self.sparse_threshold = 0.0
        # the Matryoshka sizes trained ({"dense_dims": [...], "colbert_dims": [...]}, docs/recipe.md
        # §Matryoshka); None: only the full sizes. Recorded in m3composer.json; `m3c eval` reports them
        self.matryoshka: Optional[dict] = None
        # encode in length-sorted chunks (see encoder_hidden); off = one padded encoder call per encode
        self.length_grouping = True
        self.length_grouping_overhead_tokens: Optional[float] = None   # None: length_chunks' default

    # ------------------------------------------------------------------ construction
    @staticmethod
    def new_heads(hidden_size: int, colbert_dim: int = heads.COLBERT_DIM_HIDDEN) -> tuple[nn.Linear, nn.Linear]:
        """Fresh heads with PyTorch's default init, as the recipe (`colbert_dim <= 0` means D = H)."""
        colbert = nn.Linear(hidden_size, hidden_size if colbert_dim <= 0 else colbert_dim)
        sparse = nn.Linear(hidden_size, 1)
        return colbert, sparse

    @classmethod
    def from_encoder(cls, encoder: PreTrainedModel, *, colbert_dim: int = heads.COLBERT_DIM_HIDDEN,
                     **kwargs) -> "M3Model":
        """Wrap an encoder with freshly initialised heads."""
        colbert, sparse = cls.new_heads(encoder.config.hidden_size, colbert_dim)
        return cls(encoder, colbert, sparse, **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, pooling: Optional[str] = None,
                        normalize: Optional[bool] = None, colbert_dim: int = heads.COLBERT_DIM_HIDDEN,
                        load_tokenizer: bool = True, special_token_ids: Optional[dict[str, int]] = None,
                        **encoder_kwargs) -> "M3Model":
        """Load an M3 folder (ours, FlagEmbedding's, or a plain HF encoder folder), in eval mode.

        Defaults for `pooling`/`normalize`/instructions come from `m3composer.json` (BGE-M3's when
        absent). The heads are read from `colbert_linear.pt`/`sparse_linear.pt` with
        `weights_only=True` when both exist (D is then the saved one); otherwise they are
        initialised as the recipe does and a warning says so.
        """
        folder = Path(folder)
        recorded = M3FolderConfig.from_folder(folder)
        encoder = _load_encoder(folder, **encoder_kwargs)
        tokenizer = None
        if load_tokenizer and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                   "sentencepiece.bpe.model")):
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        hidden = encoder.config.hidden_size
        colbert_path, sparse_path = folder / COLBERT_FILE, folder / SPARSE_FILE
        fresh: tuple[str, ...] = tuple(recorded.fresh_heads)
        if colbert_path.is_file() and sparse_path.is_file():
            colbert_state = torch.load(colbert_path, map_location="cpu", weights_only=True)
            sparse_state = torch.load(sparse_path, map_location="cpu", weights_only=True)
            colbert_linear = nn.Linear(hidden, colbert_state["weight"].shape[0])
            sparse_linear = nn.Linear(hidden, 1)
            try:
                colbert_linear.load_state_dict(colbert_state)
                sparse_linear.load_state_dict(sparse_state)
            except RuntimeError as err:
                raise RuntimeError(f"{folder}: head files do not fit an encoder of hidden size {hidden}: {err}") from err
            colbert_linear.to(dtype=encoder.dtype)
            sparse_linear.to(dtype=encoder.dtype)
        else:
            log.warning("%s: no %s/%s; the ColBERT and sparse heads are newly initialised "
                        "(fine for training, not for inference)", folder, COLBERT_FILE, SPARSE_FILE)
            colbert_linear, sparse_linear = cls.new_heads(hidden, colbert_dim)
            fresh = NEW_HEADS
        model = cls(encoder, colbert_linear, sparse_linear,
                    pooling=pooling or recorded.pooling,
                    normalize=recorded.normalize if normalize is None else normalize,
                    special_token_ids=special_token_ids, tokenizer=tokenizer,
                    query_instruction=recorded.query_instruction, passage_instruction=recorded.passage_instruction)
        model.fresh_heads = fresh
        model.recorded_fresh_heads = tuple(recorded.fresh_heads)
        model.head_init = recorded.head_init
        model.sparse_threshold = recorded.sparse_threshold
        model.matryoshka = recorded.matryoshka
        return model.eval()   # like transformers' from_pretrained; the trainer switches to train()

    def score_temperature(self, temperature: float) -> float:
        """The τ this model's scores use: `temperature` when it normalises its vectors, else 1 (the
        recipe's rule: unnormalised inner products are not divided by τ)."""
        return temperature if self.normalize else 1.0

    # ------------------------------------------------------------------ encode / score
    @property
    def vocab_size(self) -> int:
        return self.encoder.config.vocab_size

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
               with_sparse: bool = True, with_colbert: bool = True) -> M3Reps:
        """Token ids `(n, L)` -> `M3Reps` (dense `(n, H)`, sparse `(n, V)`, ColBERT `(n, L-1, D)` + mask)."""
        return self.encode_many([(input_ids, attention_mask)], with_sparse=with_sparse, with_colbert=with_colbert)[0]

    def encode_many(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], *, with_sparse: bool = True,
                    with_colbert: bool = True) -> list[M3Reps]:
        """`encode` for several right-padded `(input_ids, attention_mask)` pairs (queries and passages)
        at once: the encoder sees all their rows together, in length-sorted chunks (`encoder_hidden`),
        so short passages share a call with the queries; the heads then run on each part with its own
        shape. Same results as one `encode` per part (up to float rounding and dropout draws)."""
        chunks = None
        if self.length_grouping and len(parts) > 1:
            widths = [ids.shape[1] for ids, _ in parts]
            all_ids, all_mask = self.concat_parts(parts)
            chunks = self._length_chunks(all_mask)
        if chunks is None or len(chunks) <= 1:
            # One call for everything would pad the queries to the passages' width: keep each part
            # at its own width instead (each part is still length-grouped on its own).
            return [self._heads(self.encoder_hidden(ids, mask), ids, mask, with_sparse, with_colbert)
                    for ids, mask in parts]
        hidden_all = self.encoder_hidden(all_ids, all_mask, chunks=chunks)
        out, start = [], 0
        for (ids, mask), w in zip(parts, widths):
            hidden = hidden_all[start:start + ids.shape[0], :w]
            start += ids.shape[0]
            out.append(self._heads(hidden, ids, mask, with_sparse, with_colbert))
        return out

    def concat_parts(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of several right-padded `(input_ids, attention_mask)` pairs as one pair, padded
        to the widest part (rows in part order)."""
        width = max(ids.shape[1] for ids, _ in parts)
        pad_id = self._pad_id()
        all_ids = torch.cat([F.pad(ids, (0, width - ids.shape[1]), value=pad_id) for ids, _ in parts])
        all_mask = torch.cat([F.pad(mask, (0, width - mask.shape[1]), value=0) for _, mask in parts])
        return all_ids, all_mask

    def _pad_id(self) -> int:
        pad = getattr(self.encoder.config, "pad_token_id", None)
        return int(pad) if pad is not None else int(self.special_token_ids.get("pad", XLMR_SPECIAL_IDS["pad"]))

    def _length_chunks(self, attention_mask: torch.Tensor) -> Optional[list[np.ndarray]]:
        """`length_chunks` of these rows, or None when grouping is off or the padding is not on the right."""
        n, width = attention_mask.shape
        if not self.length_grouping or n <= 1:
            return None
        if width > 1 and not bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all()):
            return None
        return length_chunks(attention_mask.sum(dim=1).tolist(), self.encoder.config.hidden_size,
                             self.length_grouping_overhead_tokens, device_type=attention_mask.device.type)

    def encoder_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                       chunks: Optional[list[np.ndarray]] = None) -> torch.Tensor:
        """Last hidden state `(n, L, H)`; positions past each row's length are 0 when grouped.

        With `length_grouping` (default) the rows are sorted by length and cut into chunks
        (`length_chunks`), each run through the encoder padded only to its own longest row, so the
        encoder does far less work on padding (a sample batch is about half padding, BENCHMARKS.md
        §Training). A row's
        hidden states do not depend on how much padding follows it (attention masks padding out;
        XLM-R's position ids count only real tokens), so this equals one padded call up to float
        rounding; only dropout draws differ. Needs right padding; anything else takes one call.
        """
        n, width = input_ids.shape
        if chunks is None:
            chunks = self._length_chunks(attention_mask)
        lengths = attention_mask.sum(dim=1)
        if chunks is None or (len(chunks) == 1 and int(lengths.max()) == width):
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        outputs = []
        for rows in chunks:
            index = torch.as_tensor(rows, device=input_ids.device)
            longest = max(1, int(lengths[index].max()))
            hidden = self.encoder(input_ids=input_ids[index, :longest], attention_mask=attention_mask[index, :longest],
                                  return_dict=True).last_hidden_state
            outputs.append(F.pad(hidden, (0, 0, 0, width - longest)))
        order = torch.as_tensor(np.concatenate(chunks), device=input_ids.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=order.device)
        return torch.cat(outputs)[inverse]

    def head_outputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor, with_sparse: bool,
                     with_colbert: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Row-wise head outputs of `hidden (n, L, H)`: dense `(n, H)`, per-position sparse weights
        `(n, L)` (0 at padding) and ColBERT vectors `(n, L-1, D)` (0 at padding), None when not asked.
        Everything the loss reads is a function of these and the token ids (`sparse_reps`)."""
        dense = heads.pool_dense(hidden, attention_mask, self.pooling)
        if self.normalize:
            dense = heads.l2_normalize(dense)
        weights = colbert = None
        if with_sparse:
            # Padding positions carry the pad id (zeroed in sparse_reps anyway); masking also covers a
            # collator that pads with some other id.
            weights = heads.sparse_token_weights(hidden, self.sparse_linear) * attention_mask.to(hidden.dtype)
        if with_colbert:
            colbert, _ = heads.colbert_vectors(hidden, attention_mask, self.colbert_linear, self.normalize)
        return dense, weights, colbert

    def sparse_reps(self, token_weights: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-position weights `(n, L)` -> the `(n, V)` vocabulary vector (special ids 0); outside
        training, weights below `sparse_threshold` are 0 too (the loss always sees them all)."""
        vocab = heads.sparse_vocab_weights(token_weights, input_ids, self.vocab_size, self.special_token_ids.values())
        if self.sparse_threshold > 0 and not self.training:
            vocab = vocab.masked_fill(vocab < self.sparse_threshold, 0)
        return vocab

    def reps_from_head_outputs(self, dense: torch.Tensor, weights: Optional[torch.Tensor],
                               colbert: Optional[torch.Tensor], input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> M3Reps:
        reps = M3Reps(dense=dense)
        if weights is not None:
            reps.sparse = self.sparse_reps(weights, input_ids)
        if colbert is not None:
            reps.colbert, reps.colbert_mask = colbert, attention_mask[:, 1:]
        return reps

    def _heads(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               with_sparse: bool, with_colbert: bool) -> M3Reps:
        return self.reps_from_head_outputs(*self.head_outputs(hidden, attention_mask, with_sparse, with_colbert),
                                           input_ids, attention_mask)

    @staticmethod
    def score(q: M3Reps, p: M3Reps, temperature: float, *, heads: Optional[Sequence[str]] = None,
              ensemble_weights: tuple[float, float, float] = ENSEMBLE_WEIGHTS,
              colbert_max_elements: int = COLBERT_MAX_ELEMENTS) -> M3Scores:
        """Score matrices `(len(q), len(p))` of `heads` (None: every head present); see `scores.score`."""
        return score(q, p, temperature, heads=heads, ensemble_weights=ensemble_weights,
                     colbert_max_elements=colbert_max_elements)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> M3Reps:
        return self.encode(input_ids, attention_mask)

    # ------------------------------------------------------------------ save
    def untrained_fresh_heads(self) -> tuple[str, ...]:
        """Fresh heads that a training run leaves out of `loss.heads`: their weights are still as
        initialised (random), so nothing should rank with them (docs/recipe.md §Choosing the heads).
        A model no run trains (`trained_heads` None) says only what its folder recorded."""
        if self.trained_heads is None:
            return self.recorded_fresh_heads
        return tuple(h for h in self.fresh_heads if h not in self.trained_heads)

    def folder_config(self) -> M3FolderConfig:
        """What `save_pretrained` records in `m3composer.json` (and `from_pretrained` reads back): a
        fresh head stays fresh unless it is being trained."""
        return M3FolderConfig(pooling=self.pooling, normalize=self.normalize,
                              query_instruction=self.query_instruction, passage_instruction=self.passage_instruction,
                              head_init=self.head_init, matryoshka=self.matryoshka,
                              trained_heads=None if self.trained_heads is None else list(self.trained_heads),
                              fresh_heads=list(self.untrained_fresh_heads()),
                              sparse_threshold=float(self.sparse_threshold))

    def save_pretrained(self, folder: str | os.PathLike, tokenizer=None,
                        extra_files: Optional[Callable[[Path], None]] = None) -> Path:
        """Write a FlagEmbedding-loadable folder atomically (temp folder + rename); returns its path.

        Encoder weights as safetensors, the tokenizer (`tokenizer` or the attached one), the two heads
        as plain CPU state dicts, and `m3composer.json`. An existing folder is replaced.
        `extra_files(tmp)` writes more files (the model card) into the folder before it is renamed in.
        """
        folder = Path(folder)
        with building_dir(folder) as tmp:
            # Clone to CPU so the saved tensors never alias live (possibly GPU/DDP) parameters.
            state = {k: v.detach().clone().cpu() for k, v in self.encoder.state_dict().items()}
            self.encoder.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer = tokenizer if tokenizer is not None else self.tokenizer
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, head in ((COLBERT_FILE, self.colbert_linear), (SPARSE_FILE, self.sparse_linear)):
                torch.save({k: v.detach().clone().cpu() for k, v in head.state_dict().items()}, tmp / name)
            self.folder_config().save(tmp)
            if extra_files is not None:
                extra_files(tmp)
        return folder

    # ------------------------------------------------------------------ inference
    def encode_texts(self, texts: Sequence[str] | str, tokenizer=None, *, batch_size: int = INFERENCE_BATCH_SIZE,
                     max_length: int = INFERENCE_PASSAGE_MAX_LEN, instruction: Optional[str] = None, return_dense: bool = True,
                     return_sparse: bool = True, return_colbert_vecs: bool = True) -> dict:
        """Encode texts with the meaning of `BGEM3FlagModel.encode`.

        Returns `{"dense_vecs": (n, H) float32 array, "lexical_weights": [{token id as str: weight}],
        "colbert_vecs": [(tokens-1, D) float32 arrays]}` (a key is None when not requested; a
        single string gives single items). Lexical weights keep, per token id, the max weight over
        its positions, dropping special ids, zero weights and weights below `sparse_threshold`;
        ColBERT vectors drop padding.
        `instruction` is prepended verbatim (e.g. the folder's `query_instruction`). Texts are
        sorted by length for batching and returned in input order.
        """
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("encode_texts needs a tokenizer (none attached to this model)")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if instruction:
            texts = [instruction + t for t in texts]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        order = np.argsort([-len(ids) for ids in encoded], kind="stable")
        special = set(self.special_token_ids.values())
        device = next(self.parameters()).device
        dense_out: list[Optional[np.ndarray]] = [None] * len(texts)
        lexical_out: list[Optional[dict]] = [None] * len(texts)
        colbert_out: list[Optional[np.ndarray]] = [None] * len(texts)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(texts), batch_size):
                    idx = order[start:start + batch_size]
                    input_ids, attention_mask = right_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
                    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                    hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                          return_dict=True).last_hidden_state
                    if return_dense:
                        dense = heads.pool_dense(hidden, attention_mask, self.pooling)
                        dense = heads.l2_normalize(dense) if self.normalize else dense
                        for row, i in enumerate(idx):
                            dense_out[i] = dense[row].float().cpu().numpy()
                    if return_sparse:
                        weights = heads.sparse_token_weights(hidden, self.sparse_linear).float().cpu().numpy()
                        for row, i in enumerate(idx):
                            lexical: dict[str, float] = {}
                            for token_id, w in zip(encoded[i], weights[row]):
                                if token_id in special or w <= 0 or w < self.sparse_threshold:
                                    continue
                                key = str(token_id)
                                if w > lexical.get(key, 0.0):
                                    lexical[key] = float(w)
                            lexical_out[i] = lexical
                    if return_colbert_vecs:
                        vecs, mask = heads.colbert_vectors(hidden, attention_mask, self.colbert_linear, self.normalize)
                        vecs = vecs.float().cpu().numpy()
                        for row, i in enumerate(idx):
                            colbert_out[i] = vecs[row, :len(encoded[i]) - 1]
        finally:
            self.train(was_training)
        result = {
            "dense_vecs": np.stack(dense_out) if return_dense else None,
            "lexical_weights": lexical_out if return_sparse else None,
            "colbert_vecs": colbert_out if return_colbert_vecs else None,
        }
        if single:
            result = {k: (v[0] if v is not None else None) for k, v in result.items()}
        return result
