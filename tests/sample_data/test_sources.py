"""The text miners of the sample data: .mo reader, docstring splitting, pydoc sections."""
from __future__ import annotations

import struct

import pytest

from m3composer.sample_data.sources import (django_translations, pydoc_sections, read_mo, split_summary,
                                              stdlib_docstrings)


def write_mo(path, entries: list[tuple[bytes, bytes]], big_endian: bool = False) -> None:
    """A GNU .mo file written by hand from the format description: header, two tables, strings."""
    order = ">" if big_endian else "<"
    entries = sorted(entries)
    n = len(entries)
    msg_table, trans_table = 28, 28 + 8 * n
    offset = trans_table + 8 * n
    blob, msg_index, trans_index = b"", [], []
    for message, _ in entries:
        msg_index.append((len(message), offset + len(blob)))
        blob += message + b"\x00"
    for _, translation in entries:
        trans_index.append((len(translation), offset + len(blob)))
        blob += translation + b"\x00"
    header = struct.pack(order + "7I", 0x950412DE, 0, n, msg_table, trans_table, 0, 0)
    tables = b"".join(struct.pack(order + "2I", *e) for e in msg_index + trans_index)
    path.write_bytes(header + tables + blob)


MO_ENTRIES = [
    (b"", b"Content-Type: text/plain; charset=UTF-8\n"),
    (b"Enter a valid date.", "Введите правильную дату.".encode()),
    (b"month name\x04May", "Май".encode()),
    (b"%(count)d item\x00%(count)d items", "%(count)d объект\x00%(count)d объекта".encode()),
]


@pytest.mark.parametrize("big_endian", [False, True])
def test_read_mo_drops_header_and_context_and_keeps_singular_forms(tmp_path, big_endian):
    path = tmp_path / "django.mo"
    write_mo(path, MO_ENTRIES, big_endian)
    assert read_mo(path) == [("%(count)d item", "%(count)d объект"),
                             ("Enter a valid date.", "Введите правильную дату."),
                             ("May", "Май")]


def test_read_mo_rejects_other_files_with_their_name(tmp_path):
    path = tmp_path / "bad.mo"
    path.write_bytes(b"not a catalogue at all")
    with pytest.raises(ValueError, match="bad.mo"):
        read_mo(path)


def test_split_summary_takes_the_first_sentence_and_keeps_the_rest():
    doc = "Return the sum. Values are added\nleft to right.\n\nRaises TypeError\nfor strings."
    assert split_summary(doc) == ("Return the sum.", "Values are added left to right.\n\nRaises TypeError\nfor strings.")
    assert split_summary("Parse a header\nvalue.\n\nBody text.") == ("Parse a header value.", "Body text.")
    assert split_summary("Only a summary.") == ("Only a summary.", "")


def test_stdlib_docstrings_skip_private_and_test_modules_and_ambiguous_summaries(tmp_path):
    body = "A body that is long enough to be a passage of the sample data set, surely more than eighty characters."
    (tmp_path / "shapes.py").write_text(
        f'"""Shapes for drawing things.\n\n{body}"""\n'
        f'class Circle:\n    """Make a round circle.\n\n    {body} Circle."""\n'
        f'    def area(self):\n        """Return self area value.\n\n        {body} Area."""\n'
        f'def a():\n    """Return repr of self.\n\n    {body} One."""\n'
        f'def b():\n    """Return repr of self.\n\n    {body} Two."""\n'
        f'def short():\n    """Has a summary here.\n\n    Too short."""\n')
    (tmp_path / "_private.py").write_text(f'"""Private module summary here.\n\n{body}"""\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helper.py").write_text(f'"""Test module summary here.\n\n{body}"""\n')
    items = stdlib_docstrings(tmp_path)
    assert [(i.item_id, i.query) for i in items] == [
        ("docstring:shapes:<module>", "Shapes for drawing things."),
        ("docstring:shapes:Circle", "Make a round circle."),
        ("docstring:shapes:Circle.area", "Return self area value."),
    ]
    assert all(i.group == "shapes" and i.title == "shapes" for i in items)
    assert items[2].passage == f"{body} Area."


def test_pydoc_sections_are_titled_unique_and_grouped_by_topic():
    items = pydoc_sections()
    assert len(items) >= 100
    assert len({i.query for i in items}) == len(items) and len({i.passage for i in items}) == len(items)
    by_query = {i.query: i for i in items}
    # "The if statement" is printed under three topics: kept once, as a top section, bare title as query
    assert by_query['The "if" statement'].passage.startswith('The "if" statement is used for conditional')
    assert 'Compound statements: The "if" statement' not in by_query
    # sub-sections carry their topic's title, so the bare "Guards" is not an ambiguous query
    assert any(i.group == "compound" and i.query == "Compound statements: Guards" for i in items)


def test_django_translations_are_translated_and_at_least_three_words():
    rows = django_translations(["de", "ru"])
    assert {r.lang for r in rows} == {"de", "ru"}
    assert sum(r.lang == "ru" for r in rows) >= 300
    assert all(len(r.source.split()) >= 3 and r.target and r.target != r.source for r in rows)
    with pytest.raises(ValueError, match="xx_NOPE"):
        django_translations(["xx_NOPE"])
