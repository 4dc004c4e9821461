"""Check that FlagEmbedding's BGEM3FlagModel loads our export and encodes like M3Model.encode_texts.

Not part of the test suite: it needs FlagEmbedding, which lives in a throwaway virtualenv of its
own (created on first use; FlagEmbedding 1.4.x needs a newer transformers than this project pins).

    .venv/bin/python scripts/check_flagembedding_compat.py                       # tiny test model
    .venv/bin/python scripts/check_flagembedding_compat.py --model-dir ~/.cache/m3composer/e5-small

Steps: load the model folder with `M3Model.from_pretrained` (heads that do not exist yet are
initialised from `--seed`), export it with `save_pretrained`, encode the texts with both
implementations, and print the max absolute difference of dense vectors, lexical weights (over
the union of token ids, a missing id counting as weight 0) and ColBERT vectors. Exit status 1 when
a difference exceeds `--tolerance` or the token-id sets differ.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from compat_check import TEXTS, model_to_check, parser_with_common_options

DEFAULT_VENV = "/tmp/m3c-flagembedding-venv"
FLAGEMBEDDING_REQUIREMENTS = ["torch==2.7.0", "transformers>=4.56,<4.57", "FlagEmbedding==1.4.2", "numpy<2.2"]

# Runs inside the FlagEmbedding venv: argv = export folder, output folder, pooling, colbert_dim, max_length.
FLAGEMBEDDING_SIDE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from FlagEmbedding import BGEM3FlagModel
    folder, out, pooling, colbert_dim, max_length = sys.argv[1:6]
    texts = json.loads(open(out + "/texts.json").read())
    model = BGEM3FlagModel(folder, use_fp16=False, devices="cpu", pooling_method=pooling,
                           colbert_dim=int(colbert_dim))
    res = model.encode(texts, batch_size=4, max_length=int(max_length),
                       return_dense=True, return_sparse=True, return_colbert_vecs=True)
    np.save(out + "/fe_dense.npy", np.asarray(res["dense_vecs"], dtype=np.float32))
    json.dump([{k: float(v) for k, v in d.items()} for d in res["lexical_weights"]], open(out + "/fe_lexical.json", "w"))
    np.savez(out + "/fe_colbert.npz", *[np.asarray(c, dtype=np.float32) for c in res["colbert_vecs"]])
    print("FlagEmbedding encoded", len(texts), "texts")
""")


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import FlagEmbedding"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {' '.join(FLAGEMBEDDING_REQUIREMENTS)} (a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *FLAGEMBEDDING_REQUIREMENTS], check=True)
    return python


def lexical_max_diff(ours: list[dict], theirs: list[dict]) -> tuple[float, int]:
    """Max |w_ours − w_theirs| over the union of ids (missing = 0), and the number of texts whose id sets differ."""
    worst, differing_sets = 0.0, 0
    for a, b in zip(ours, theirs):
        if set(a) != set(b):
            differing_sets += 1
        for key in set(a) | set(b):
            worst = max(worst, abs(a.get(key, 0.0) - b.get(key, 0.0)))
    return worst, differing_sets


def main(argv: list[str] | None = None) -> int:
    parser = parser_with_common_options(__doc__.splitlines()[0], DEFAULT_VENV, "FlagEmbedding")
    args = parser.parse_args(argv)
    model_dir, work, model = model_to_check(args, "m3c-fe-compat-")
    export = model.save_pretrained(work / "export")
    colbert_dim = model.colbert_linear.out_features
    ours = model.encode_texts(TEXTS, batch_size=4, max_length=args.max_length)

    (work / "texts.json").write_text(json.dumps(TEXTS))
    python = ensure_venv(Path(args.venv))
    subprocess.run([str(python), "-c", FLAGEMBEDDING_SIDE, str(export), str(work), model.pooling,
                    str(colbert_dim), str(args.max_length)], check=True)

    fe_dense = np.load(work / "fe_dense.npy")
    fe_lexical = json.loads((work / "fe_lexical.json").read_text())
    with np.load(work / "fe_colbert.npz") as archive:
        fe_colbert = [archive[f"arr_{i}"] for i in range(len(TEXTS))]

    dense_diff = float(np.abs(ours["dense_vecs"] - fe_dense).max())
    lexical_diff, lexical_sets = lexical_max_diff(ours["lexical_weights"], fe_lexical)
    shapes_match = all(a.shape == b.shape for a, b in zip(ours["colbert_vecs"], fe_colbert))
    colbert_diff = max(float(np.abs(a - b).max()) for a, b in zip(ours["colbert_vecs"], fe_colbert)) \
        if shapes_match else float("inf")
    report = {"model_dir": str(model_dir), "export": str(export), "pooling": model.pooling, "texts": len(TEXTS),
              "dense_max_abs_diff": dense_diff, "lexical_max_abs_diff": lexical_diff,
              "lexical_texts_with_different_token_sets": lexical_sets,
              "lexical_tokens_total": sum(len(d) for d in ours["lexical_weights"]),
              "colbert_shapes_match": shapes_match, "colbert_max_abs_diff": colbert_diff}
    print(json.dumps(report, indent=2))
    ok = (max(dense_diff, lexical_diff, colbert_diff) <= args.tolerance and lexical_sets == 0 and shapes_match)
    print("COMPATIBLE" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
