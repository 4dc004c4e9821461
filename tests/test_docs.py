"""docs/configuration.md is generated from the schema, documents every key it has and nothing else."""
import re
from pathlib import Path

from omegaconf import OmegaConf

from m3composer.config import TrainConfig
from m3composer.config_reference import COMMAND, REFERENCE, render

FREE_FORM = {"loggers", "data.batch_size_table"}   # dict-valued keys, documented as one row


def schema_keys(node=None, prefix=""):
    node = OmegaConf.structured(TrainConfig) if node is None else node
    for key in node:
        full = prefix + key
        child = node._get_node(key)
        if OmegaConf.is_dict(child) and child._is_none() and full not in FREE_FORM:
            # an optional section that is off by default (callbacks.negative_refresh): its own keys
            yield full
            yield from schema_keys(OmegaConf.structured(child._metadata.ref_type), full + ".")
        elif OmegaConf.is_dict(child) and full not in FREE_FORM:
            yield from schema_keys(child, full + ".")
        else:
            yield full


def test_configuration_reference_is_what_the_schema_renders():
    assert REFERENCE == Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert REFERENCE.read_text() == render(), f"docs/configuration.md is stale: run `{COMMAND}`"


def test_configuration_reference_lists_every_config_key_with_a_meaning():
    rows = [line for line in render().splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        documented[re.fullmatch(r"`([a-z_.]+)`", cells[0]).group(1)] = cells
    keys = set(schema_keys())
    assert keys - set(documented) == set(), "config keys missing from docs/configuration.md"
    assert set(documented) - keys == set(), "docs/configuration.md documents keys the schema does not have"
    assert [k for k, cells in documented.items() if not cells[3]] == [], "config keys without a meaning"


def test_the_readme_stays_the_front_door_of_at_most_20_kb():
    """README.md is the users' front door: at most 20 KB; studies, logs and references go under docs/."""
    size = (Path(__file__).resolve().parents[1] / "README.md").stat().st_size
    assert size <= 20 * 1024, f"README.md is {size} bytes; move detail to docs/ (limit 20,480)"
