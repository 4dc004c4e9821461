"""The training dataset's settings at the config schema's defaults, for tests and benchmarks.

`M3TrainDataset` takes the `data:` settings without defaults (the schema, `config.DataConfig` and
`TrainConfig.seed`, states them once, and `train.build_dataset` passes them). A test or a benchmark
that builds the dataset directly states the settings it changes and takes the rest from here.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from m3composer.config import DataConfig, TrainConfig
from m3composer.data.dataset import M3TrainDataset


def dataset_settings(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `M3TrainDataset`: every setting it requires at the schema's default, then `overrides`."""
    required = [name for name, p in inspect.signature(M3TrainDataset).parameters.items()
                if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    schema = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    schema["seed"] = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "seed")
    return {**{name: schema[name] for name in required}, **overrides}
