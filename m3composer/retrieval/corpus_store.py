"""An encoded corpus on disk (`m3c eval` / `m3c mine --corpus-cache DIR`, docs/recipe.md §Corpus
store): the dense vectors and the lexical weights of every document, written in shards as they are
encoded, resumable after a kill, and read back by the next run of the same model and settings.

Layout: `DIR/<key>/manifest.json` and `DIR/<key>/shard-00000.safetensors`, … Shard i holds the
documents `[i·shard_docs, (i+1)·shard_docs)` in corpus order: `dense (n, H)` float32 and, with the
sparse head, the weights as CSR arrays `sparse_indptr (n+1,)` int64, `sparse_tokens` int32,
`sparse_weights` float32 (a document's non-zero weights, by token). No pickle: safetensors only.
Each shard is written to a temporary file and renamed (`fsutil.atomic_file`), so a final shard file
is a complete one: after a kill the next run reuses every shard present and encodes the missing ones.

The key (`store_key`) is a hash of everything that changes the stored numbers: the model's weights
(the bytes of the encoder's parameters and buffers, and the sparse head's when sparse vectors are
stored, in the loaded dtype: a changed, fine-tuned or re-cast model is another key; hashing ~2 GB of
BGE-M3 costs a few seconds), its pooling,
normalisation and sparse threshold, the tokenizer's vocabulary, the heads stored, the passage
instruction and max length, and the corpus (every text, in order). A different key is a different
directory, so a stale store is never read. Matryoshka sizes are not part of it: the full vectors are
stored and cut when scored. ColBERT vectors are not stored (a vector per token: ~100× the dense
vectors); exact search with ColBERT encodes the corpus as before.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from m3composer.distributed import rank, sum_across_ranks, world_size
from m3composer.fsutil import atomic_file, write_json_atomic
from m3composer.model.scores import LexicalCost

SHARD_DOCS = 10_000                    # documents per shard file
FORMAT = 1
MANIFEST = "manifest.json"


def _model_digest(model, with_sparse: bool) -> str:
    """A hash of the parameters and buffers the stored vectors come from (names, dtypes, shapes, bytes): the
    encoder's, and the sparse head's when sparse vectors are stored. The ColBERT head, never stored, is left
    out, and so is the sparse head of a dense-only store: a folder without head files gets fresh random heads
    at every load, which must not change the key of what they do not touch."""
    digest = hashlib.blake2b(digest_size=16)
    kept = ("encoder.", "sparse_linear.") if with_sparse else ("encoder.",)
    for name, tensor in model.state_dict().items():
        if not name.startswith(kept):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def corpus_digest(docs: Sequence[str]) -> str:
    """A hash of the corpus' texts in order (a document's index is its row in the store)."""
    digest = hashlib.blake2b(digest_size=16)
    for text in docs:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def store_settings(model, tokenizer, docs: Sequence[str], *, instruction: Optional[str], max_length: int,
                   with_sparse: bool) -> dict:
    """What the store's numbers depend on (module doc), as JSON-ready values."""
    vocab = hashlib.blake2b(json.dumps(sorted(tokenizer.get_vocab().items())).encode(), digest_size=16).hexdigest()
    return {"format": FORMAT, "model": _model_digest(model, with_sparse), "tokenizer": f"{type(tokenizer).__name__}:{vocab}",
            "pooling": str(model.pooling), "normalize": bool(model.normalize),
            "sparse_threshold": float(model.sparse_threshold), "vocab_size": int(model.vocab_size),
            "heads": ["dense", "sparse"] if with_sparse else ["dense"],
            "passage_instruction": instruction or "", "passage_max_len": int(max_length),
            "num_docs": len(docs), "corpus": corpus_digest(docs)}


def store_key(settings: dict) -> str:
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=12).hexdigest()


class CorpusCache:
    """Where the stores live (`--corpus-cache DIR`), one directory per key; `report`: the last store
    used (`CorpusStore.report`). `stop_after`: write at most that many shards per run, then stop with
    `StoreInterrupted` (what a kill leaves behind; for tests)."""

    def __init__(self, root: str | Path, shard_docs: int = SHARD_DOCS, stop_after: Optional[int] = None):
        self.root, self.shard_docs, self.stop_after = Path(root), shard_docs, stop_after
        self.report: Optional[dict] = None

    def open(self, settings: dict, encode_batches, across_ranks: bool = False) -> "CorpusStore":
        """The complete store of `settings`, its missing shards encoded first (`CorpusStore.ensure`).
        `across_ranks` (collective; docs/operations.md §Evaluate, mine and score on N ranks): the
        missing shards are dealt out among the ranks (shard i of the missing ones to rank i mod W),
        each rank encodes and writes its own, rank 0 alone writes the manifest, and after a barrier
        every rank reads the whole store. DIR must be a folder every rank sees (one machine, or a shared
        file system); a store left incomplete by a kill is resumed by the next run on any number of ranks."""
        store = CorpusStore(self.root, settings, self.shard_docs).ensure(encode_batches, self.stop_after,
                                                                         across_ranks)
        self.report = store.report
        if store.missing_shards():
            raise StoreInterrupted(f"{store.dir}: stopped after {self.stop_after} shard(s)")
        return store


class StoreInterrupted(RuntimeError):
    """A store left incomplete on purpose (`CorpusCache.stop_after`)."""


class CorpusStore:
    """One key's directory under `root` (module doc). `report` after `ensure`: `{"dir", "bytes",
    "reused", "shards_encoded", "shards_reused", "seconds"}` (`reused`: nothing was encoded)."""

    def __init__(self, root: str | Path, settings: dict, shard_docs: int = SHARD_DOCS):
        self.settings = settings
        self.dir = Path(root) / store_key(settings)
        self.num_docs = settings["num_docs"]
        self.with_sparse = "sparse" in settings["heads"]
        manifest = self._read_manifest()
        # the layout belongs to the store: an existing one keeps its shard size
        self.shard_docs = int(manifest["shard_docs"]) if manifest else shard_docs
        if self.shard_docs < 1:
            raise ValueError(f"shard_docs must be >= 1, got {self.shard_docs}")
        self.report: dict = {}

    @property
    def num_shards(self) -> int:
        return -(-self.num_docs // self.shard_docs)

    def shard_path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:05d}.safetensors"

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_docs, min((shard + 1) * self.shard_docs, self.num_docs)

    def _read_manifest(self) -> Optional[dict]:
        try:
            return json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]

    def ensure(self, encode_batches, stop_after: Optional[int] = None, across_ranks: bool = False) -> "CorpusStore":
        """Encode and write every missing shard. `encode_batches(doc_indices)` yields `(document
        indices, M3Reps)` over those documents (`search.encoded_batches`). `stop_after`: return
        after writing that many shards (per rank; what a kill leaves; for tests). `across_ranks`:
        this rank writes its part of the missing shards (`CorpusCache.open`), then waits for the others."""
        started = time.perf_counter()
        missing = self.missing_shards()
        if across_ranks and int(sum_across_ranks(torch.tensor([len(missing)]))) != len(missing) * world_size():
            # also a barrier: no rank writes a shard before every rank has listed the missing ones
            raise RuntimeError(f"{self.dir}: the ranks see different shards: is it on a file system every rank shares?")
        ours = missing[rank()::world_size()] if across_ranks else missing
        writes_manifest = not across_ranks or rank() == 0
        written = 0
        for shard in ours:
            if stop_after is not None and written >= stop_after:
                break
            self._write_shard(shard, encode_batches(np.arange(*self.shard_range(shard))))
            written += 1
            if writes_manifest:
                self._write_manifest()
        if across_ranks:
            written = int(sum_across_ranks(torch.tensor([written])))     # a barrier too: every shard is written
        if writes_manifest and not self.missing_shards():
            self._write_manifest()
        self.report = {"dir": str(self.dir), "bytes": self.bytes_on_disk(), "reused": written == 0,
                       "shards_encoded": written, "shards_reused": self.num_shards - len(missing),
                       "seconds": round(time.perf_counter() - started, 3)}
        return self

    def _write_shard(self, shard: int, batches: Iterator) -> None:
        from safetensors.numpy import save

        start, end = self.shard_range(shard)
        dense, rows, tokens, weights = None, [], [], []
        for indices, reps in batches:
            local = np.asarray(indices, dtype=np.int64) - start
            vecs = reps.dense.float().cpu().numpy()
            if dense is None:
                dense = np.empty((end - start, vecs.shape[1]), dtype=np.float32)
            dense[local] = vecs
            if self.with_sparse:
                r, t = reps.sparse.nonzero(as_tuple=True)
                weights.append(reps.sparse[r, t].float().cpu().numpy())
                rows.append(local[r.cpu().numpy()])
                tokens.append(t.cpu().numpy().astype(np.int32))
        tensors = {"dense": dense}
        if self.with_sparse:
            rows, tokens, weights = (np.concatenate(x) for x in (rows, tokens, weights))
            order = np.lexsort((tokens, rows))
            tensors.update(sparse_indptr=np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=end - start))]),
                           sparse_tokens=tokens[order], sparse_weights=weights[order])
        with atomic_file(self.shard_path(shard), "wb") as handle:
            handle.write(save(tensors, metadata={"start": str(start), "end": str(end)}))

    def _write_manifest(self) -> None:
        done = [s for s in range(self.num_shards) if self.shard_path(s).is_file()]
        write_json_atomic(self.dir / MANIFEST, {
            "settings": self.settings, "shard_docs": self.shard_docs, "num_shards": self.num_shards,
            "complete": len(done) == self.num_shards,
            "shards": [{"file": self.shard_path(s).name, "start": self.shard_range(s)[0],
                        "end": self.shard_range(s)[1]} for s in done]})

    def bytes_on_disk(self) -> int:
        """The manifest and the shards; not the dot-prefixed temporary a kill mid-write leaves (never read)."""
        if not self.dir.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file() and not p.name.startswith("."))

    def shards(self, only: Optional[range] = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """`(first document index, arrays)` per shard, in corpus order (the store must be complete);
        `only`: those shards (a rank's share)."""
        from safetensors.numpy import load_file

        for shard in range(self.num_shards) if only is None else only:
            yield self.shard_range(shard)[0], load_file(self.shard_path(shard))

    def dense(self) -> np.ndarray:
        """Every document's dense vector `(N, H)` float32, in corpus order."""
        parts = [arrays["dense"] for _, arrays in self.shards()]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    def batches(self, batch_size: int, device, lexical_cost: Optional[LexicalCost] = None,
                only: Optional[range] = None) -> Iterator[tuple[list[int], torch.Tensor, Optional[torch.Tensor]]]:
        """`(document indices, dense (b, H), sparse (b, V) or None)` in corpus order, `batch_size` at a
        time: the vectors exact search scores (`search.py`), rebuilt from the shards (`only`: those
        shards); `lexical_cost` counts the passages' terms."""
        vocab_size = self.settings["vocab_size"]
        for start, arrays in self.shards(only):
            if lexical_cost is not None and self.with_sparse:
                count_passage_terms(lexical_cost, arrays, vocab_size)
            for b in range(0, len(arrays["dense"]), batch_size):
                stop = min(b + batch_size, len(arrays["dense"]))
                sparse = None
                if self.with_sparse:
                    sparse = csr_rows(arrays, b, stop, vocab_size).to(device)
                yield list(range(start + b, start + stop)), torch.from_numpy(arrays["dense"][b:stop]).to(device), sparse


def describe(report: dict) -> str:
    """One line for a command's log: the store, its size, and whether this run encoded into it."""
    done = "read, nothing encoded" if report["reused"] else f"{report['shards_encoded']} shard(s) encoded"
    return f"corpus store {report['dir']}: {report['bytes']:,} bytes, {done}, {report['seconds']:.1f} s"


def csr_rows(arrays: dict[str, np.ndarray], begin: int, end: int, vocab_size: int) -> torch.Tensor:
    """Rows `[begin, end)` of a shard's lexical weights as a dense `(end - begin, V)` tensor."""
    ptr = arrays["sparse_indptr"]
    lo, hi = int(ptr[begin]), int(ptr[end])
    rows = np.repeat(np.arange(end - begin), np.diff(ptr[begin:end + 1]))
    out = torch.zeros(end - begin, vocab_size)
    out[torch.from_numpy(rows), torch.from_numpy(arrays["sparse_tokens"][lo:hi].astype(np.int64))] = \
        torch.from_numpy(arrays["sparse_weights"][lo:hi])
    return out


def count_passage_terms(lexical_cost: LexicalCost, arrays: dict[str, np.ndarray], vocab_size: int) -> None:
    """`LexicalCost.add("passage", …)` for a shard's stored weights, without the `(n, V)` matrix."""
    positive = arrays["sparse_weights"] > 0
    lexical_cost.add_counts("passage", np.bincount(arrays["sparse_tokens"][positive], minlength=vocab_size),
                            len(arrays["dense"]))
