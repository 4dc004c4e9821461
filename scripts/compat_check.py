"""What the compatibility checks (check_flagembedding_compat.py, check_sentence_transformers_compat.py)
share: their command-line options and the model they compare, loaded from `--model-dir` (default:
the tiny test model), with heads the folder does not have seeded and a sparse bias that makes
tokens carry weight. Imported by the scripts from this folder (not part of the package)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

# Short and long, several languages, one single character: the texts both checks encode.
TEXTS = [
    "How do I install a Python package from a local wheel file?",
    "What is the difference between Debian stable, testing and unstable?",
    "Die Paketverwaltung von Debian verwendet dpkg und apt.",
    "¿Qué es un entorno virtual de Python?",
    "The with statement wraps the execution of a block with methods defined by a context manager.",
    "x",
    "PEP 8 recommends four spaces per indentation level, and lines of at most 79 characters; "
    "long expressions can be wrapped inside parentheses, brackets and braces.",
]


def parser_with_common_options(description: str, venv_default: str, venv_of: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", help="model folder to export (default: the tiny test model from `m3c assets`)")
    parser.add_argument("--venv", default=venv_default, help=f"{venv_of} virtualenv (default {venv_default})")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed for heads the folder does not have yet")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--work-dir", help="keep the export and outputs here (default: a temp folder)")
    return parser


def model_to_check(args: argparse.Namespace, work_prefix: str):
    """`(model_dir, work_dir, M3Model)` for the parsed options."""
    import torch

    from m3composer.model.m3 import SPARSE_FILE, M3Model

    if args.model_dir:
        model_dir = Path(args.model_dir).expanduser()
    else:
        from m3composer.assets.build import ensure_assets
        from m3composer.assets.paths import TINY
        model_dir = ensure_assets()[TINY]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix=work_prefix))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = M3Model.from_pretrained(model_dir)
    if not (model_dir / SPARSE_FILE).exists():
        with torch.no_grad():   # fresh sparse heads of a random model give mostly-zero weights
            model.sparse_linear.bias.add_(0.5)
    return model_dir, work, model
