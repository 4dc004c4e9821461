"""Real text that installs with pip alone, mined into (query, passage) items for the sample data.

Three sources, each read without importing or executing the code it documents:

* `pydoc_data.topics` (CPython, PSF licence): the language reference as pydoc shows it. Each
  topic splits into titled sections (a title line underlined with `*`, `=`, `-` or `~`); the
  title is the query and the section body the passage. The group is the topic.
* Standard-library docstrings (CPython, PSF licence), parsed with `ast`: the summary (first
  sentence of the first paragraph) is the query and the rest of the docstring the passage. The
  group is the module, so sibling functions and classes are the natural hard negatives.
* Django's translation catalogues (`django/**/locale/<lang>/LC_MESSAGES/*.mo`, BSD-3-Clause):
  English message -> its human translation, read with a small `.mo` reader. Entries of a `.mo`
  file are sorted by message, so neighbours share openings ("Enter a valid date." / "Enter a
  valid date/time.") and make hard negatives.

Everything is returned in a deterministic order (sorted files, source order within a file) so the
sample data is the same bytes for the same seed, Python and Django versions.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import struct
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# pydoc section underlines, outermost level first (as the topics use them).
_UNDERLINE_CHARS = "*=-~^"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(*])")
# Directories of the stdlib that hold tests, vendored or generated code, not documented API.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "ensurepip", "turtledemo", "lib2to3", "pydoc_data"}


@dataclass(frozen=True)
class Item:
    """One (query, passage) pair mined from a source, with where it came from."""
    item_id: str   # stable across runs, e.g. "pydoc:compound#3", "docstring:json.decoder:JSONDecoder.decode"
    group: str     # topic or module: hard negatives and eval distractors come from the same group
    query: str
    passage: str
    title: str = ""  # BEIR corpus title of the passage (never the query itself)


@dataclass(frozen=True)
class Translation:
    """One catalogue entry: an English message and its translation into `lang`."""
    catalogue: str  # the .mo file, relative to the django package
    lang: str
    source: str
    target: str


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _drop_duplicates(items: list[Item]) -> list[Item]:
    """Drop items whose query or passage is not unique: a repeated query ("Return repr(self).")
    has several right answers, and a repeated passage would leak a held-out text into training."""
    queries = Counter(_normalise(i.query) for i in items)
    passages = Counter(_normalise(i.passage) for i in items)
    return [i for i in items if queries[_normalise(i.query)] == 1 and passages[_normalise(i.passage)] == 1]


# --- pydoc topics -----------------------------------------------------------------------------

def _is_underline(title: str, line: str) -> bool:
    return (bool(title.strip()) and len(line) == len(title) and len(set(line)) == 1
            and line[0] in _UNDERLINE_CHARS)


def pydoc_sections(min_passage_chars: int = 100) -> list[Item]:
    """Titled sections of every pydoc topic. A sub-section's query is prefixed with its topic's
    top title ("Compound statements: Guards") because bare sub-titles repeat across topics."""
    from pydoc_data.topics import topics

    candidates: list[tuple[bool, str, int, Item]] = []
    for topic in sorted(topics):
        lines = topics[topic].split("\n")
        heads = [i for i in range(len(lines) - 1) if _is_underline(lines[i], lines[i + 1])]
        top_title = lines[heads[0]].strip() if heads else topic
        for n, head in enumerate(heads):
            end = heads[n + 1] if n + 1 < len(heads) else len(lines)
            body = "\n".join(lines[head + 2:end]).strip()
            title = lines[head].strip()
            is_sub = n > 0 and title != top_title
            query = f"{top_title}: {title}" if is_sub else title
            candidates.append((is_sub, topic, n, Item(f"pydoc:{topic}#{n}", topic, query, body)))
    # The same section is printed under several topics ("if" on its own and inside "compound"):
    # keep one copy, preferring the topic where it is the top section (its bare title is the query).
    items: list[Item] = []
    seen_bodies: set[str] = set()
    for _, _, _, item in sorted(candidates, key=lambda c: c[:3]):
        if len(item.passage) >= min_passage_chars and item.passage not in seen_bodies:
            seen_bodies.add(item.passage)
            items.append(item)
    items.sort(key=lambda i: (i.group, int(i.item_id.rsplit("#", 1)[1])))
    return _drop_duplicates(items)


# --- stdlib docstrings ------------------------------------------------------------------------

def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _iter_stdlib_modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of the public stdlib modules, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".", "_"))
                             and not d.startswith("config-"))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            parts = list(Path(dirpath, filename).relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            # Private modules (_pyio, _pydecimal, ...) duplicate the public ones' docstrings.
            if not parts or any(p.startswith("_") for p in parts):
                continue
            yield ".".join(parts), Path(dirpath, filename)


def split_summary(docstring: str) -> tuple[str, str]:
    """(summary, body) of a cleaned docstring: the summary is the first sentence of the first
    paragraph (flattened); the body is everything after it, original line breaks kept."""
    first, _, rest = docstring.strip().partition("\n\n")
    first = " ".join(first.split())
    match = _SENTENCE_END.search(first)
    if match:
        summary, tail = first[:match.start()], first[match.end():]
        rest = f"{tail}\n\n{rest}" if rest else tail
    else:
        summary = first
    return summary.strip(), rest.strip()


def _docstrings(module: str, tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) for the module, its classes and functions, in source order."""
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, qualname = stack.pop()
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield qualname, doc
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack.extend((c, f"{qualname}.{c.name}" if qualname else c.name) for c in reversed(children))


def python_docstrings(path: str | os.PathLike, module: str) -> tuple[tuple[str, str], ...]:
    """(qualified name, cleaned docstring) of the module, classes and functions of one Python source
    file, in source order, parsed with `ast` (never imported); () for a file that is not valid
    Python 3 / UTF-8 (a few stdlib files are deliberately not)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ()
    return tuple(_docstrings(module, tree))


@functools.lru_cache(maxsize=None)
def _file_docstrings(path: str, module: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    """`python_docstrings`, once per process and file version (parsing is most of a `sample-data` run:
    8 of 17 s; a process that generates again, as the tests do, reuses it)."""
    return python_docstrings(path, module)


def stdlib_docstrings(root: str | os.PathLike | None = None, min_query_words: int = 3,
                      max_query_words: int = 60, min_passage_chars: int = 80) -> list[Item]:
    """Summary -> body items from the docstrings of the public stdlib modules under `root`."""
    root = Path(root) if root else stdlib_dir()
    items: list[Item] = []
    for module, path in _iter_stdlib_modules(root):
        stat = path.stat()
        for qualname, doc in _file_docstrings(str(path), module, stat.st_mtime_ns, stat.st_size):
            summary, body = split_summary(doc)
            if (min_query_words <= len(summary.split()) <= max_query_words
                    and len(body) >= min_passage_chars):
                items.append(Item(f"docstring:{module}:{qualname or '<module>'}", module, summary, body,
                                  title=module))
    return _drop_duplicates(items)


# --- gettext .mo catalogues -------------------------------------------------------------------

def read_mo(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(message, translation) pairs of a GNU `.mo` file, in file order (sorted by message).

    Contexts (`ctx\\x04msg`) are dropped from the message; for plural entries the singular
    message and the first translated form are kept. The header entry (empty message) only
    supplies the charset.
    """
    data = Path(path).read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path}: too short for a .mo file")
    magic = struct.unpack("<I", data[:4])[0]
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(magic)
    if order is None:
        raise ValueError(f"{path}: not a .mo file (magic {magic:#x})")
    _, count, msg_table, trans_table = struct.unpack(order + "4I", data[4:20])

    def entry(table: int, i: int) -> bytes:
        length, offset = struct.unpack(order + "2I", data[table + 8 * i: table + 8 * i + 8])
        if offset + length > len(data):
            raise ValueError(f"{path}: entry {i} points past the end of the file")
        return data[offset:offset + length]

    charset = "utf-8"
    raw = [(entry(msg_table, i), entry(trans_table, i)) for i in range(count)]
    for message, translation in raw:
        if message == b"":
            found = re.search(rb"charset=([\w-]+)", translation)
            if found:
                charset = found.group(1).decode("ascii")
    pairs = []
    for message, translation in raw:
        if message == b"":
            continue
        text = message.decode(charset).split("\x04")[-1].split("\x00")[0]
        pairs.append((text, translation.decode(charset).split("\x00")[0]))
    return pairs


def django_package_dir() -> Path:
    """The installed django package folder (found without importing django)."""
    import importlib.util

    spec = importlib.util.find_spec("django")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'django' package is not installed; it ships the translation catalogues "
                           "of the parallel task (pip install the project's dependencies)")
    return Path(list(spec.submodule_search_locations)[0])


def django_translations(langs: list[str], min_source_words: int = 3) -> list[Translation]:
    """English -> `lang` messages of every Django catalogue, per language then file then entry.

    Kept: messages of at least `min_source_words` words whose translation is non-empty and not a
    copy of the English (an untranslated entry is not parallel text)."""
    package = django_package_dir()
    out: list[Translation] = []
    for lang in langs:
        files = sorted(package.glob(f"**/locale/{lang}/LC_MESSAGES/*.mo"))
        if not files:
            raise ValueError(f"no Django catalogues for language {lang!r} under {package}")
        seen: set[str] = set()
        for mo in files:
            for source, target in read_mo(mo):
                source, target = " ".join(source.split()), " ".join(target.split())
                if (len(source.split()) < min_source_words or not target
                        or _normalise(target) == _normalise(source) or source in seen):
                    continue
                seen.add(source)  # the same message in two catalogues: keep the first
                out.append(Translation(str(mo.relative_to(package)), lang, source, target))
    return out
