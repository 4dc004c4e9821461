"""m3composer/data/convert/spark.py on a real Spark: PySpark in local mode (`local[2]`: a JVM and
two Python workers) converts the sample data (`m3c sample-data`, real text, the e5/XLM-R tokenizer)
through the project's own validation and tokenisation (`write_partition` in every Spark task),
merges the partitions, and trains on the result.

The dataset is compared with a one-process `m3c convert` of the same files the way training reads
it: `m3_index.json` (ids, sources, statistics, tokenizer facts) and every stream's rows, every
column, in order. The order is the same, not only the set: the merge takes the partitions in input
order. Training a few steps on each gives the same losses.

PySpark is a test dependency (`make install`); it needs a Java runtime, `java` on PATH (PySpark
3.5: Java 8, 11 or 17). Without one, and only then, these tests are skipped. The session is small
(2 cores, no UI, 512 MB of driver memory) and stopped at the end of the module.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.data.test_convert_parallel import read_rows, same_nan
from tests.test_train import read_loss_log, sample_mds, tiny_recipe, write_recipe
from m3composer.data.convert import REJECTS_FILE, ConvertError, convert
from m3composer.data.convert.spark import convert_dataframes, convert_files
from m3composer.data.index import read_index

pytestmark = [pytest.mark.spark,       # `make test-spark` (not in `make test`: pyproject.toml's addopts)
              pytest.mark.skipif(shutil.which("java") is None,
                                 reason="PySpark needs a Java runtime and no `java` is on PATH")]

STEPS = 3


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    """A small local Spark session (2 cores, no UI, 512 MB driver), stopped at the end of the module."""
    from pyspark.sql import SparkSession

    # the Python workers run this interpreter (PySpark reads PYSPARK_PYTHON, default `python3` on PATH)
    saved = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (SparkSession.builder.master("local[2]").appName("m3composer-tests")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.memory", "512m")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.local.dir", str(tmp_path_factory.mktemp("spark-local")))
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
        if saved is None:
            os.environ.pop("PYSPARK_PYTHON", None)
        else:
            os.environ["PYSPARK_PYTHON"] = saved


def without_paths(index: dict) -> dict:
    """m3_index.json less each stream's folder: a merged stream of scored rows only keeps its
    `.scored` folder under its plain name (docs/architecture.md), one process writes the plain one."""
    for s in index["streams"]:
        assert s.pop("path") in (s["name"], s["name"] + ".scored")
    return index


def train_losses(run: Path, mds: Path) -> list[dict]:
    """The loss log of a short tiny-model run on `mds` (the recipe of tests/test_train.py)."""
    from m3composer.config import load_config
    from m3composer.train import build_trainer

    recipe = write_recipe(run / "recipe.yaml", tiny_recipe(run, mds, trainer={"max_duration": f"{STEPS}ba"}))
    trainer = build_trainer(load_config(recipe))
    try:
        trainer.fit()
    finally:
        trainer.close()
    (fit,) = read_loss_log(run / "losses.jsonl")
    return fit


@pytest.fixture(scope="module")
def converted(spark, tmp_path_factory, e5_dir) -> dict:
    """The sample data converted by `m3c convert` in one process and by `convert_files` on Spark."""
    single = sample_mds(tmp_path_factory)
    inputs = single.parent / "jsonl" / "train"
    out = tmp_path_factory.mktemp("spark") / "mds"
    started = time.perf_counter()
    summary = convert_files(spark, inputs, out, e5_dir, split_bytes=128 << 10)
    print(f"convert_files: {summary.partitions} Spark tasks, {time.perf_counter() - started:.1f} s")
    return {"single": single, "spark": out, "summary": summary, "files": sorted(inputs.rglob("*.jsonl"))}


def test_spark_writes_the_rows_and_index_of_m3c_convert(converted):
    single, out, summary = converted["single"], converted["spark"], converted["summary"]
    assert summary.partitions > len(converted["files"])     # the larger files were cut into row ranges
    assert list(out.glob("*/*/part-*/index.json"))
    assert without_paths(read_index(out)) == without_paths(read_index(single))
    assert same_nan(read_rows(out)) == same_nan(read_rows(single))
    rows = read_index(single)["rows"]
    assert (summary.lines, summary.rows_kept, summary.files) == (rows, rows, len(converted["files"]))


def test_dataframes_and_rdds_of_lines_convert_like_the_files_they_were_read_from(
        spark, tmp_path_factory, tmp_path, e5_dir):
    inputs = sample_mds(tmp_path_factory).parent / "jsonl" / "train"
    picked = sorted(inputs.rglob("*_len-0-500.jsonl"))[:2]
    lines = picked[1].read_text(encoding="utf-8").splitlines(keepends=True)
    bad = 5                                           # a broken line, kept verbatim by an RDD of lines
    broken = lines[:bad - 1] + ["{not json\n"] + lines[bad - 1:]
    (tmp_path / picked[1].name).write_text("".join(broken), encoding="utf-8")
    shutil.copy(picked[0], tmp_path / picked[0].name)
    files = [tmp_path / p.name for p in picked]
    single = tmp_path / "single"
    convert(files, single, e5_dir, on_error="skip", progress=False)

    # named like the files: the same tasks, buckets, sources and ids
    data = {files[0].name: spark.read.json(str(files[0])),   # a DataFrame (columns, nulls)
            files[1].name: spark.sparkContext.textFile(str(files[1]), 3)}  # an RDD of JSONL lines
    with pytest.raises(ConvertError, match=re.escape(f"{files[1].name}:{bad}: ")):
        convert_dataframes({files[1].name: data[files[1].name]}, tmp_path / "refused", e5_dir)
    assert not (tmp_path / "refused").exists()        # a failed conversion leaves nothing behind

    summary = convert_dataframes(data, tmp_path / "spark", e5_dir, on_error="skip")
    assert summary.partitions >= 4 and summary.rows_rejected == 1
    assert without_paths(read_index(tmp_path / "spark")) == without_paths(read_index(single))
    assert same_nan(read_rows(tmp_path / "spark")) == same_nan(read_rows(single))
    assert (tmp_path / "spark" / REJECTS_FILE).read_bytes() == (single / REJECTS_FILE).read_bytes()

    with pytest.raises(FileExistsError, match="not empty"):
        convert_files(spark, files, tmp_path / "spark", e5_dir)


def test_training_on_the_spark_conversion_gives_the_losses_of_the_one_process_conversion(converted, tmp_path):
    on_spark = train_losses(tmp_path / "run-spark", converted["spark"])
    one_process = train_losses(tmp_path / "run-single", converted["single"])
    assert [r["step"] for r in on_spark] == list(range(STEPS))
    assert on_spark == one_process                    # every term, every step, to the last bit
