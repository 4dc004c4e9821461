"""Parallel conversion on one machine: pieces of the input converted in worker processes.

`convert(workers=N)` cuts the input into units (`inputs.plan_units`: files, and row ranges of
plain files) and converts each in a worker process into `<stream>/part-NNNNN/` folders; the
partitions are then merged (`partitions.merge_parts`) into the dataset one worker writes, shard
files aside. With `on_error="fail"` the first bad line of any worker stops writing in all.
"""
from __future__ import annotations

from pathlib import Path

from m3composer.data.convert.inputs import Unit
from m3composer.data.convert.partitions import part_name
from m3composer.data.convert.tokenizer import load_untruncated
from m3composer.data.convert.writer import Converter

DEFAULT_WORKERS = 1    # processes of a conversion

_WORKER: dict = {}     # this worker process's tokenizer and the run's stop event


def _init_worker(tokenizer, stop) -> None:
    _WORKER.update(tok=load_untruncated(tokenizer), stop=stop)


def _convert_part(unit: Unit, out_dir: str, part: str, settings: dict) -> dict:
    """In a worker process: one unit into `out_dir/<stream>/<part>/`; returns its record."""
    conv = Converter(Path(out_dir), _WORKER["tok"], part=part, stop=_WORKER["stop"], **settings)
    try:
        conv.convert_unit(unit)
        conv.close()
    finally:
        conv.shutdown()
    return conv.record()


def run_workers(units: list[Unit], work: Path, tokenizer, settings: dict, workers: int, bar) -> list[dict]:
    """Convert `units` in `workers` processes; the records come back in unit order, which is the
    input order.

    Workers never fork the caller (its threads, the Rust tokenizer's pool): they come from a fork
    server that has imported Streaming (which imports torch) and transformers once, so a worker
    starts in milliseconds instead of seconds of imports; spawn where there is no fork server
    (Windows). Our own modules are not preloaded: the server ignores the caller's `sys.path`
    (Python 3.11), the workers do not. A calling script needs the `if __name__ == "__main__":` guard.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["streaming", "transformers", "transformers.models.auto.tokenization_auto",
                                    "transformers.tokenization_utils_fast"])   # no effect once it runs
    else:
        ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    sizes = [(u.end if u.end is not None else u.file.path.stat().st_size) - u.start for u in units]
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(tokenizer, stop)) as pool:
        futures = {pool.submit(_convert_part, u, str(work), part_name(i), settings): i
                   for i, u in enumerate(units)}
        try:
            for future in as_completed(futures):
                future.result()   # the first failure stops the run
                bar.update(sizes[futures[future]])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return [f.result() for f in futures]
