"""Fixtures for the data tests: a word-level tokenizer, JSONL writers, a converted dataset, local S3.

`word_tokenizer_dir`: a real fast tokenizer folder (XLM-R special ids <s>=0 <pad>=1 </s>=2
<unk>=3) that maps every whitespace-separated word to one token, so a text of n words has
n + 2 ids. Tests can then reason about token lengths and buckets without trusting the code.

`converted_dir`: a small converted dataset (see CONVERTED_LAYOUT) that the dataset and collate
tests can reuse; `s3_server`: a moto S3 server on 127.0.0.1 with a bucket, env vars set.
"""
from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest

WORDS = [f"w{i}" for i in range(200)] + ["alpha", "beta", "gamma", "delta", "query", "passage"]
S3_BUCKET = "m3test"


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_row(rng: random.Random, *, n_neg: int = 3, passage_words: int = 20, query_words: int = 6,
             scores: bool = False, **extra) -> dict:
    row = {"query": words(rng, query_words),
           "pos": [words(rng, passage_words)],
           "neg": [words(rng, passage_words) for _ in range(n_neg)]}
    if scores:
        row["pos_scores"] = [round(rng.uniform(0.5, 1.0), 3)]
        row["neg_scores"] = [round(rng.uniform(0.0, 0.5), 3) for _ in range(n_neg)]
    row.update(extra)
    return row


def write_jsonl(path: Path, rows: list, *, gz: bool = False) -> Path:
    """Write rows (dicts are JSON-encoded, bytes/str are written verbatim) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
                    + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture(scope="session")
def word_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ["<mask>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    folder = tmp_path_factory.mktemp("word-tokenizer")
    fast.save_pretrained(folder)
    return folder


# task dir / file name -> (rows, passage words, negatives per row, scores); lengths in words
CONVERTED_LAYOUT = {
    "qa/qa_len-0-500.jsonl": dict(rows=40, passage_words=20, n_neg=3, scores=False),
    "qa/qa_len-500-1000.jsonl": dict(rows=12, passage_words=600, n_neg=2, scores=False),
    "kd/kd_len-0-500.jsonl": dict(rows=24, passage_words=15, n_neg=4, scores=True),
    "parallel_en-es/verses_len-0-500.jsonl": dict(rows=16, passage_words=10, n_neg=1, scores=False),
}


@pytest.fixture(scope="session")
def converted_source(tmp_path_factory) -> Path:
    """The JSONL tree behind `converted_dir` (CONVERTED_LAYOUT)."""
    root = tmp_path_factory.mktemp("jsonl") / "train"
    rng = random.Random(1234)
    for rel, spec in CONVERTED_LAYOUT.items():
        rows = [make_row(rng, n_neg=spec["n_neg"], passage_words=spec["passage_words"], scores=spec["scores"])
                for _ in range(spec["rows"])]
        write_jsonl(root / rel, rows)
    return root


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, converted_source, word_tokenizer_dir) -> Path:
    """A converted dataset: streams qa/len-0-500 (40 rows), qa/len-500-1000 (12), kd/len-0-500 (24,
    teacher scores), verses/len-0-500 (16, parallel). Read-only: copy it before changing it."""
    from m3composer.data.convert import convert

    out = tmp_path_factory.mktemp("mds") / "dataset"
    convert([converted_source], out, word_tokenizer_dir, progress=False)
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with bucket `m3test` (m3composer.testing.s3.MotoS3);
    S3_ENDPOINT_URL and fake AWS creds set. `{"endpoint", "bucket", "client", "moto"}`."""
    from m3composer.testing.s3 import MotoS3

    with MotoS3(S3_BUCKET) as moto:
        env = moto.env()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield {"endpoint": moto.url, "bucket": moto.bucket, "client": moto.client, "moto": moto}
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
