"""Every `§Heading` reference in the code and the docs names a heading that exists.

Where references are looked for: the text files under m3composer/, scripts/, tests/ and yamls/, and
README.md, BENCHMARKS.md and every markdown file under docs/ (this file excepted: its examples below
are not references).

How a reference is read:
* The file part is the word just before the `§` (a line break, comment markers, a closing backtick,
  a markdown link's `](target)` and a comma may sit between): a word ending in `.md`
  (`docs/recipe.md`, `recipe.md`, `BENCHMARKS.md`), or the name of a markdown file without its
  suffix (`README`, `architecture`). It is looked up beside the referring file, then at the
  repository root, then in docs/. A named `.md` file that does not exist is a dangling reference.
* A `§` without a file part continues the reference before it when only that reference's heading and
  a separator lie between them (`docs/recipe.md §Batch sizes, §Epoch plan`). Otherwise it points
  into the referring file itself when that is a markdown file, and into docs/recipe.md (where code
  comments cite the recipe) from code.
* The heading is the longest run of words after the `§` that equals a markdown heading of the file
  (any level, outside code fences), compared case-insensitively, without backticks and the
  punctuation at word edges; a heading's trailing parenthetical, or all after its first colon, may
  be left out (`§A fresh sparse head` names `A fresh sparse head (`model.new_sparse_head_init`)`,
  `§Gradient cache` names `Gradient cache: batches larger than memory`).
* A reference that is a markdown link to an anchor (`[§Unused parameters](#unused-parameters-and-ddp)`)
  resolves when the anchor is a heading's GitHub anchor in the linked file.
* Not references: a `§` followed by a digit (a standard's section, `RFC 9110 §7.6.1`), and a `§` just
  after a backtick (an inline-code example of the notation).

The failure lists every dangling reference as `file:line -> target`, for fixing after sections move.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("m3composer", "scripts", "tests", "yamls")
TEXT_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".md", ".txt", ".toml", ".cfg"}
DEFAULT_DOC = REPO / "docs" / "recipe.md"

# the word before a `§`, and what may separate them
FILE_PART = re.compile(r"((?:[\w.-]+/)*[\w.-]+)`?(?:\]\([^)\s]*\))?,?\s*$")
# a reference's words end at the next reference, at inline code, a link's or a table cell's end
WORDS_END = re.compile(r"[§`\]|]")
EDGE = ".,;:!?()[]{}\"'*"
CHAIN_GAP = re.compile(r"[^.;()\[\]§]{1,80}")      # one heading and a separator: `§Foo bar, `


def scanned_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]
    for folder in CODE_DIRS:
        files += sorted(p for p in (REPO / folder).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()
                        and "__pycache__" not in p.parts)
    # config_reference.py holds the template of docs/configuration.md, whose references are checked there
    skipped = {Path(__file__).resolve(), REPO / "m3composer" / "config_reference.py"}
    return [p for p in files if p.exists() and p.resolve() not in skipped]


def words_of(text: str) -> tuple[str, ...]:
    return tuple(w for w in (word.strip(EDGE).lower() for word in text.replace("`", "").split()) if w)


@lru_cache(maxsize=None)
def headings(doc: Path) -> frozenset[tuple[str, ...]]:
    """The word tuples a reference may use for each markdown heading of `doc` (with and without a
    trailing parenthetical)."""
    found, fenced = set(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not fenced:
            title = heading.group(1)
            found.update(words_of(form) for form in (title, re.sub(r"\s*\([^()]*\)\s*$", "", title),
                                                     title.split(": ")[0]))
    return frozenset(found)


@lru_cache(maxsize=None)
def anchors(doc: Path) -> frozenset[str]:
    """GitHub's anchors of `doc`'s headings: lower case, punctuation but `-` and `_` dropped, spaces
    to `-`."""
    text = doc.read_text(encoding="utf-8")
    titles = re.findall(r"^#{1,6}\s+(.*?)\s*$", re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S), re.M)
    return frozenset(re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-") for title in titles)


def flatten(text: str) -> tuple[str, list[tuple[int, int]]]:
    """The file's lines joined by spaces, each without its indentation and comment markers (a
    reference may wrap), and (offset in the joined text, line number) of each line's start."""
    parts, starts, offset = [], [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        line = re.sub(r"^\s*(?:#+|//|>)?\s*", "", line)
        starts.append((offset, number))
        parts.append(line)
        offset += len(line) + 1
    return " ".join(parts), starts


def line_at(starts: list[tuple[int, int]], offset: int) -> int:
    return max(number for start, number in starts if start <= offset)


def named_doc(word: str, referrer: Path) -> Path | None | bool:
    """The markdown file `word` names (a path, possibly missing, when it ends in .md); False when it is
    no file name."""
    name = word if word.endswith(".md") else f"{word}.md"
    for base in (referrer.parent, REPO, REPO / "docs"):
        if (base / name).is_file():
            return (base / name).resolve()
    return (REPO / name) if word.endswith(".md") else False


def references(path: Path):
    """(line, doc path, the words after the `§`, the anchor of a link around it or None) of every
    reference in `path`."""
    flat, starts = flatten(path.read_text(encoding="utf-8"))
    previous = None            # (offset of its §, its doc)
    for match in re.finditer("§", flat):
        at = match.start()
        rest = flat[at + 1:at + 300]
        rest = rest[:m.start()] if (m := WORDS_END.search(rest)) else rest
        if not rest[:1].strip() or rest[:1].isdigit() or flat[at - 1:at] == "`":
            continue
        word = FILE_PART.search(flat[max(0, at - 200):at])
        doc = named_doc(word.group(1), path) if word else False
        if doc is False:
            if previous and CHAIN_GAP.fullmatch(flat[previous[0] + 1:at]):
                doc = previous[1]
            else:
                doc = path.resolve() if path.suffix == ".md" else DEFAULT_DOC
        previous = (at, doc)
        link = re.match(r"\]\(([^)\s]*)#([^)\s]+)\)", flat[at + 1 + len(rest):])
        if link:
            doc = (path.parent / link.group(1)).resolve() if link.group(1) else path.resolve()
        yield line_at(starts, at), doc, rest, link.group(2) if link else None


def resolves(doc: Path, rest: str, anchor: str | None = None) -> bool:
    if not doc.is_file():
        return False
    if anchor is not None:
        return anchor in anchors(doc)
    words, known = words_of(rest)[:16], headings(doc)
    return any(words[:k] in known for k in range(1, len(words) + 1))


def shown(rest: str) -> str:
    """The words of a reference as a person reads them: up to the first punctuation, at most 8."""
    return " ".join(re.split(r"[.,;:()]", rest, maxsplit=1)[0].split()[:8])


def dangling_references() -> list[str]:
    out = []
    for path in scanned_files():
        for line, doc, rest, anchor in references(path):
            if not resolves(doc, rest, anchor):
                where = doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc
                missing = "" if doc.is_file() else " (no such file)"
                out.append(f"{path.relative_to(REPO)}:{line} -> {where} §{shown(rest)}{missing}")
    return out


def test_every_section_reference_names_an_existing_heading():
    dangling = dangling_references()
    assert not dangling, f"{len(dangling)} § reference(s) name no heading:\n" + "\n".join(dangling)


def test_the_reader_finds_file_parts_chains_and_wrapped_references(tmp_path):
    """The rules of the module docstring on a made-up pair of files."""
    doc = tmp_path / "guide.md"
    doc.write_text("# Guide\n## Batch sizes\n### A fresh head (`model.init`)\n```\n# Not a heading\n```\n"
                   "See §Batch sizes and [§A fresh head](#a-fresh-head-modelinit), [§Batch sizes](#b). "
                   "Notation: `§Old heading`.\n")
    code = tmp_path / "module.py"
    code.write_text("# guide.md §Batch sizes, §A fresh head; RFC 9110 §7.6.1\n"
                    "# (guide.md\n# §A fresh\n# head) and guide.md §Not a heading.\n"
                    "# guide §Batch sizes. Then §Epoch plan.\n# missing.md §Batch sizes\n")
    found = [(line, d.name, shown(rest)) for line, d, rest, _ in references(code)]
    assert found == [(1, "guide.md", "Batch sizes"), (1, "guide.md", "A fresh head"), (3, "guide.md", "A fresh head"),
                     (4, "guide.md", "Not a heading"), (5, "guide.md", "Batch sizes"), (5, "recipe.md", "Epoch plan"),
                     (6, "missing.md", "Batch sizes")]
    assert [resolves(*ref[1:]) for ref in references(code)][:5] == [True, True, True, False, True]
    assert not resolves(tmp_path / "missing.md", "Batch sizes")
    assert [(line, d.name, anchor, resolves(d, rest, anchor)) for line, d, rest, anchor in references(doc)] == [
        (7, "guide.md", None, True), (7, "guide.md", "a-fresh-head-modelinit", True), (7, "guide.md", "b", False)]
