"""m3composer/seeds.py: every random-number purpose tag is defined there, once, and no two are alike."""
from __future__ import annotations

import re
from pathlib import Path

from m3composer import seeds

PACKAGE = Path(__file__).resolve().parents[1] / "m3composer"


def test_numpy_tags_are_distinct_non_zero_integers():
    tags = list(seeds.NUMPY_TAGS.values())
    assert all(isinstance(t, int) and t > 0 for t in tags)     # SeedSequence ignores trailing zeros
    assert len(set(tags)) == len(tags), seeds.NUMPY_TAGS


def test_string_tags_are_distinct():
    tags = list(seeds.STRING_TAGS.values())
    assert all(isinstance(t, str) and t for t in tags)
    assert len(set(tags)) == len(tags), seeds.STRING_TAGS


def test_the_registry_lists_every_tag_it_defines():
    defined = {name: value for name, value in vars(seeds).items() if name.endswith(("_STREAM", "_TAG"))}
    assert defined == {**seeds.NUMPY_TAGS, **seeds.STRING_TAGS}


def test_no_other_module_defines_a_purpose_tag():
    # a constant named like a tag (a compiled pattern such as convert's `_BUCKET_TAG` is not one)
    pattern = re.compile(r"^\s*_?[A-Z][A-Z0-9_]*_(?:STREAM|TAG)\s*=(?!\s*re\.)", flags=re.M)
    elsewhere = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "seeds.py" and pattern.search(path.read_text())]
    assert elsewhere == []
