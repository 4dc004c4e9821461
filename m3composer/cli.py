"""The `m3c` command line: one sub-command per stage of the pipeline.

Each sub-command lives in the module that does the work; that module exposes
`add_arguments(parser)` and `run(args) -> int`. This file only wires them into argparse
sub-parsers. A module is imported only when its sub-command is used, because torch and
transformers are slow to import and `m3c --help` should not pay for them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help), in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "assets": ("m3composer.assets.build", "build the offline model folders (e5-small and the tiny test model)"),
    "sample-data": ("m3composer.assets.sample_data", "write real multi-task sample data (JSONL + BEIR eval split)"),
    "convert": ("m3composer.data.convert", "JSONL -> tokenised MDS streams per task x length bucket"),
    "eval": ("m3composer.retrieval.evaluate", "retrieval metrics per head (dense, sparse, ColBERT, ensemble) on a BEIR folder or JSONL"),
    "score-teacher": ("m3composer.retrieval.teacher", "add a teacher model's pos_scores/neg_scores to a JSONL (knowledge distillation)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="m3c", description="m3composer: BGE-M3 fine-tuning on Composer")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
