"""MLflow for `loggers: {mlflow: ...}`: Composer's MLFlowLogger with metric names MLflow accepts, and
the tracking stores that cannot work refused at start-up.

Names: MLflow takes only letters, digits, `_ - . /` and spaces (and `:` outside Windows) in a metric
name. Composer's MLFlowLogger sends names as they are, and MLflow's asynchronous queue then drops
the *whole* buffered batch that holds one bad name: every metric of the steps buffered with it, the
losses included, with only an ERROR line in the log. Our retrieval metrics are `ndcg@10` and the
like, so `M3MLFlowLogger` sends `metrics/eval/dense/ndcg@10` as `metrics/eval/dense/ndcg_at_10`
(`@` -> `_at_`, any other refused character -> `_`); the other loggers keep the `@` names.

Stores: MLflow 3 refuses a local folder (its file store) unless `MLFLOW_ALLOW_FILE_STORE=true` is
set, and its default, `sqlite:///mlflow.db`, needs SQLAlchemy, which `mlflow-skinny` (the
`m3composer[mlflow]` extra) does not bring. Either would fail inside the Trainer's constructor with
a long MLflow traceback; `tracking_store_problem` says it in one line first.
"""
from __future__ import annotations

import importlib.util
import re
from typing import Optional

from composer.loggers import MLFlowLogger

# What MLflow allows on every platform (mlflow/utils/validation.py: Windows has no ':').
_REFUSED_IN_NAMES = re.compile(r"[^/\w.\- ]")
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def mlflow_metric_name(name: str) -> str:
    """A Composer metric name as MLflow accepts it: `ndcg@10` -> `ndcg_at_10`."""
    return _REFUSED_IN_NAMES.sub("_", name.replace("@", "_at_"))


class M3MLFlowLogger(MLFlowLogger):
    """Composer's MLFlowLogger; every metric name goes through `mlflow_metric_name` (after the
    logger's own `rename_metrics`)."""

    def rename(self, key: str) -> str:
        return mlflow_metric_name(super().rename(key))


def tracking_store_problem(tracking_uri: Optional[str]) -> Optional[str]:
    """None when MLflow can open `tracking_uri` (None: MLflow's default); else why not and what to do."""
    import mlflow
    from mlflow import environment_variables

    uri = str(tracking_uri or mlflow.get_tracking_uri())
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else "file"
    allow_file_store = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
    if scheme == "file" and allow_file_store is not None and not allow_file_store.get():
        return (f"{uri!r} is MLflow's file store, which MLflow {mlflow.__version__} opens only with "
                "MLFLOW_ALLOW_FILE_STORE=true in the environment: set it, or use an http(s):// tracking server")
    if scheme in _DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        return (f"{uri!r} is a database store, which needs SQLAlchemy: pip install mlflow (the full package), "
                "or give a folder (with MLFLOW_ALLOW_FILE_STORE=true) or an http(s):// tracking server")
    return None
