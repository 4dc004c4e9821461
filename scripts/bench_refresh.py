"""What one NegativeRefresh costs with e5-small on this machine: seconds per 1,000 training rows.

usage: python scripts/bench_refresh.py MDS_DIR [--model asset:e5-small] [--heads dense] [--out DIR] [--batch-size 64]

Builds the training dataset as `scripts/train.py` would (e5's instructions, query 32 / passage 128
tokens, as the quickstart), then runs one refresh (`NegativeRefresh.run`, 1 rank: the whole pool
and every query encoded here) and prints the pool size, the seconds of each part, seconds per
1,000 rows and per 1,000 pool passages, and the process's peak resident memory before and after.
`--heads dense,sparse,colbert,ensemble` runs one refresh per ranking head in turn, in the same
process on the same data (versions 1, 2, ...), so their times stand side by side; the peak memory
after the first is the running maximum.
"""
import argparse
import json
import resource
import tempfile
import time

from m3composer.assets.build import resolve_model_dir
from m3composer.callbacks.negative_refresh import NegativeRefresh
from m3composer.config import NegativeRefreshConfig, default_settings
from m3composer.data.dataset import M3TrainDataset
from m3composer.model.scores import SCORE_NAMES
from m3composer.model.m3 import M3Model
from m3composer.testing.settings import dataset_settings
from m3composer.train import negative_refresh_settings


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mds")
    parser.add_argument("--model", default="asset:e5-small")
    parser.add_argument("--out", default=None, help="negatives folder (default: a temporary one)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--heads", default="dense", help=f"comma-separated ranking heads of {SCORE_NAMES} (default dense)")
    parser.add_argument("--query-max-len", type=int, default=32)
    parser.add_argument("--passage-max-len", type=int, default=128)
    args = parser.parse_args(argv)

    model = M3Model.from_pretrained(resolve_model_dir(args.model))
    out = args.out or tempfile.mkdtemp(prefix="bench-refresh-")
    dataset = M3TrainDataset(args.mds, tokenizer=model.tokenizer,
                             query_instruction_for_retrieval=model.query_instruction,
                             passage_instruction_for_retrieval=model.passage_instruction, negatives_dir=out,
                             **dataset_settings(train_group_size=4, default_batch_size=8,
                                                query_max_len=args.query_max_len, passage_max_len=args.passage_max_len))
    heads = args.heads.split(",")
    unknown = set(heads) - set(SCORE_NAMES)
    if unknown:
        parser.error(f"--heads: unknown {sorted(unknown)}; choose from {SCORE_NAMES}")
    for version, head in enumerate(heads, start=1):
        before = peak_rss_mib()
        started = time.perf_counter()
        settings = {**negative_refresh_settings(NegativeRefreshConfig(), default_settings()["seed"]),
                    "head": head, "batch_size": args.batch_size}
        meta = NegativeRefresh(out, **settings).run(model, dataset, version=version, from_epoch=version)
        seconds = time.perf_counter() - started
        rows, pool = meta["rows"], meta["pool_passages"]
        print(json.dumps({"head": head, "rows": rows, "pool_passages": pool, "seconds": meta["seconds"],
                          "seconds_per_1000_rows": round(1000 * seconds / rows, 1),
                          "seconds_per_1000_pool_passages": round(1000 * seconds / pool, 1),
                          "rows_with_fewer_negatives": meta["rows_with_fewer_negatives"],
                          "peak_rss_mib_before": round(before), "peak_rss_mib_after": round(peak_rss_mib()),
                          "out": out}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
