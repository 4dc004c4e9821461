"""docs/architecture.md's import directions hold: every `m3composer` import in the package is one
its table allows (function-level imports included), and every package is in the table."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "m3composer"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def allowed_imports() -> dict[str, set[str] | None]:
    """`{package: packages it may import}` from the doc's table; None means any (the CLI)."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("### Import directions"):]
    section = section[:section.index("\n## ")]
    table: dict[str, set[str] | None] = {}
    for package, allowed in re.findall(r"^\| `(\w+)` \| (.+?) \|$", section, flags=re.M):
        names = set(re.findall(r"`(\w+)`", allowed))
        table[package] = None if allowed.startswith("every") else names
    return table


def package_of(module: str) -> str:
    """`m3composer.data.convert` -> `data`; `m3composer.fsutil` -> `fsutil`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported m3composer module) for every import statement in `source`, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "m3composer"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:       # relative: resolve against the importing module's package
                base = module.split(".")[:-node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "m3composer":
                if name == "m3composer":   # `from m3composer import losses, distributed`
                    found += [(node.lineno, f"m3composer.{a.name}") for a in node.names]
                else:
                    found.append((node.lineno, name))
    return found


def violations(source: str, module: str, table: dict[str, set[str] | None]) -> list[str]:
    own = package_of(module)
    allowed = table[own]
    bad = []
    for line, target in imports_of(source, module):
        other = package_of(target)
        if other and other != own and allowed is not None and other not in allowed:
            bad.append(f"{module}:{line} imports {target} ({own} may import {sorted(allowed) or 'nothing'})")
    return bad


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def test_every_package_has_a_row_in_the_table():
    table = allowed_imports()
    packages = {package_of(m) for m in package_modules()} - {""}
    assert packages - set(table) == set(), "packages missing from docs/architecture.md's import table"
    assert set(table) - packages == set(), "the table lists packages that do not exist"


def test_no_import_runs_against_the_documented_directions():
    table = allowed_imports()
    bad = []
    for module, path in package_modules().items():
        if package_of(module):
            bad += violations(path.read_text(), module, table)
    assert bad == []


def test_the_check_catches_a_backward_import():
    table = allowed_imports()
    source = "import torch\n\ndef f():\n    from m3composer.model.m3 import M3Model\n    from ..retrieval import bm25\n"
    found = violations(source, "m3composer.data.rows", table)
    assert len(found) == 2 and "m3composer.model.m3" in found[0] and "m3composer.retrieval" in found[1]
    assert violations("from m3composer.data import buckets\n", "m3composer.data.rows", table) == []
    with pytest.raises(KeyError):
        violations("", "m3composer.newpackage.x", table)
