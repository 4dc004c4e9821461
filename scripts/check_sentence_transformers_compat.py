"""Check that sentence-transformers 6 loads `m3c export-st`'s folders and encodes like M3Model.encode_texts.

Not part of the test suite: sentence-transformers 6 needs transformers >= 5 (this project pins < 4.54),
so it lives in a throwaway virtualenv of its own, created on first use. That venv installs
sentence-transformers and transformers 5 but takes torch from the interpreter running this script
(a `.pth` line appended after its own site-packages), so no second 3 GB torch is downloaded;
pip leaves the packages of the project's venv alone (they are outside the new environment).

    .venv/bin/python scripts/check_sentence_transformers_compat.py                  # tiny test model
    .venv/bin/python scripts/check_sentence_transformers_compat.py --model-dir runs/quickstart/export
    .venv/bin/python scripts/check_sentence_transformers_compat.py --model-dir ~/.cache/m3composer/e5-small

Steps: load the model folder with `M3Model.from_pretrained` (a folder without heads gets heads
initialised from `--seed`, the sparse bias shifted so that tokens carry weight, and, when it has no
instructions, `query: ` / `passage: ` so that the prompts are exercised), save it, run
`m3c export-st`'s exporter on it, then encode the same texts as queries, as documents and without
a prompt in `SentenceTransformer`, `MultiVectorEncoder` and `SparseEncoder` (the last with
`trust_remote_code=True`), and print the largest absolute difference per head to
`M3Model.encode_texts` (with the folder's instruction, or none). Exit status 1 when a difference
reaches `--tolerance`, a ColBERT shape differs, or a text's set of weighted token ids differs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np

from compat_check import TEXTS, model_to_check, parser_with_common_options

DEFAULT_VENV = "/tmp/m3c-sentence-transformers-venv"
ST_REQUIREMENTS = ["sentence-transformers==6.2.0", "transformers>=5,<6", "numpy<2.2"]
SIDES = ("query", "document", "plain")

# Runs inside the sentence-transformers venv: argv = export folder (OUT), work folder, max_length.
ST_SIDE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import sentence_transformers
    from sentence_transformers import MultiVectorEncoder, SentenceTransformer, SparseEncoder
    out, work, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    texts = json.load(open(work + "/texts.json"))
    def run(model, side, **kw):
        fn = {"query": model.encode_query, "document": model.encode_document, "plain": model.encode}[side]
        return fn(texts, batch_size=4, **kw)
    results = {"version": sentence_transformers.__version__}
    dense = SentenceTransformer(out + "/dense", device="cpu")
    dense.max_seq_length = max_length
    colbert = MultiVectorEncoder(out + "/colbert", device="cpu")
    colbert[0].max_seq_length = max_length
    sparse = SparseEncoder(out + "/sparse", device="cpu", trust_remote_code=True)
    sparse.max_seq_length = max_length
    for side in ("query", "document", "plain"):
        np.save(f"{work}/st_dense_{side}.npy", np.asarray(run(dense, side, convert_to_numpy=True), dtype=np.float32))
        np.savez(f"{work}/st_colbert_{side}.npz", *[np.asarray(v, dtype=np.float32)
                                                  for v in run(colbert, side, convert_to_numpy=True)])
        lexical = []
        for row in run(sparse, side, convert_to_tensor=False):
            row = row.coalesce() if row.is_sparse else row.to_sparse().coalesce()
            lexical.append({str(int(i)): float(v) for i, v in zip(row.indices()[0], row.values()) if v != 0})
        json.dump(lexical, open(f"{work}/st_sparse_{side}.json", "w"))
    json.dump(results, open(work + "/st_info.json", "w"))
    print("sentence-transformers", sentence_transformers.__version__, "encoded", len(texts), "texts x 3 sides")
""")


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import sentence_transformers, transformers; assert transformers.__version__ >= '5'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {' '.join(ST_REQUIREMENTS)} (torch from this interpreter)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    # A plain path line in a .pth is appended to sys.path after the venv's own site-packages:
    # the venv's transformers 5 wins, torch (absent from the venv) comes from ours.
    Path(own, "m3c-project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", *ST_REQUIREMENTS], check=True)
    return python


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.size else 0.0


def compare_lexical(ours: list[dict], theirs: list[dict]) -> tuple[float, int]:
    """Largest weight difference over the union of token ids (absent = 0), and texts whose id sets differ."""
    diffs = [abs(a.get(t, 0.0) - b.get(t, 0.0)) for a, b in zip(ours, theirs) for t in set(a) | set(b)]
    return max(diffs, default=0.0), sum(set(a) != set(b) for a, b in zip(ours, theirs))


def main(argv: list[str] | None = None) -> int:
    parser = parser_with_common_options(__doc__.splitlines()[0], DEFAULT_VENV, "sentence-transformers")
    args = parser.parse_args(argv)
    from m3composer.model.m3 import M3Model
    from m3composer.model.st_export import export_sentence_transformers

    model_dir, work, model = model_to_check(args, "m3c-st-compat-")
    if model.query_instruction is None and model.passage_instruction is None:
        model.query_instruction, model.passage_instruction = "query: ", "passage: "
    source = model.save_pretrained(work / "m3")
    model = M3Model.from_pretrained(source)
    export = work / "st"
    export_sentence_transformers(source, export, overwrite=True)

    instructions = {"query": model.query_instruction, "document": model.passage_instruction, "plain": None}
    ours = {side: model.encode_texts(TEXTS, batch_size=4, max_length=args.max_length, instruction=instr)
            for side, instr in instructions.items()}

    (work / "texts.json").write_text(json.dumps(TEXTS))
    python = ensure_venv(Path(args.venv))
    subprocess.run([str(python), "-c", ST_SIDE, str(export), str(work), str(args.max_length)], check=True)

    report = {"model_dir": str(model_dir), "exported_from": str(source), "export": str(export),
              "pooling": model.pooling, "texts": len(TEXTS),
              "sentence_transformers": json.loads((work / "st_info.json").read_text())["version"]}
    worst, ok = {"dense": 0.0, "colbert": 0.0, "sparse": 0.0}, True
    for side in SIDES:
        dense = np.load(work / f"st_dense_{side}.npy")
        worst["dense"] = max(worst["dense"], max_abs(ours[side]["dense_vecs"], dense))
        with np.load(work / f"st_colbert_{side}.npz") as archive:
            colbert = [archive[f"arr_{i}"] for i in range(len(TEXTS))]
        shapes = [a.shape == b.shape for a, b in zip(ours[side]["colbert_vecs"], colbert)]
        if not all(shapes):
            ok = False
            report[f"colbert_shape_mismatch_{side}"] = [
                (a.shape, b.shape) for a, b in zip(ours[side]["colbert_vecs"], colbert) if a.shape != b.shape]
        else:
            worst["colbert"] = max([worst["colbert"]] + [max_abs(a, b) for a, b in zip(ours[side]["colbert_vecs"], colbert)])
        sparse = json.loads((work / f"st_sparse_{side}.json").read_text())
        diff, differing = compare_lexical(ours[side]["lexical_weights"], sparse)
        worst["sparse"] = max(worst["sparse"], diff)
        report[f"sparse_texts_with_other_token_ids_{side}"] = differing
        ok = ok and differing == 0
    report.update({f"{head}_max_abs_diff": value for head, value in worst.items()})
    report["lexical_tokens_total"] = sum(len(d) for side in SIDES for d in ours[side]["lexical_weights"])
    ok = ok and max(worst.values()) < args.tolerance
    print(json.dumps(report, indent=2))
    print("COMPATIBLE" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
