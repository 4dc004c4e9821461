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
    "sample-data": ("m3composer.sample_data.generate", "write real multi-task sample data (JSONL + BEIR eval split)"),
    "convert": ("m3composer.data.convert.cli", "JSONL -> tokenised MDS streams per task x length bucket"),
    "eval": ("m3composer.retrieval.evaluate", "retrieval metrics per head (dense, sparse, ColBERT, ensemble) on a BEIR folder or JSONL"),
    "compare": ("m3composer.retrieval.compare", "paired bootstrap interval between two `m3c eval --per-query` results"),
    "score-teacher": ("m3composer.retrieval.teacher", "add a teacher model's pos_scores/neg_scores to a JSONL (knowledge distillation)"),
    "mine": ("m3composer.retrieval.mine", "mine hard negatives for a JSONL with a model (dense via faiss, or any head)"),
    "export-st": ("m3composer.model.st_export", "write sentence-transformers (>= 6) folders for the dense, ColBERT and sparse heads"),
}

# Arguments that name a model folder, per command, with the asset used when none is given. Before
# the command runs, `asset:NAME` (or the default) becomes the built asset folder and any other value
# must be an existing folder: the commands themselves stay below `assets` (docs/architecture.md).
MODEL_ARGUMENTS: dict[str, dict[str, str | None]] = {
    "convert": {"tokenizer": "asset:e5-small"},
    "eval": {"model_dir": None},
    "score-teacher": {"model": None},
    "mine": {"model": None},
    "export-st": {"model_dir": None},
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
    try:
        resolve_model_arguments(args.command, args)
    except (ValueError, OSError) as err:
        print(f"m3c {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


def resolve_model_arguments(command: str, args: argparse.Namespace) -> None:
    """Replace `command`'s model arguments (MODEL_ARGUMENTS) by local folders, building assets on demand."""
    arguments = MODEL_ARGUMENTS.get(command, {})
    if not arguments:
        return
    from m3composer.assets.build import resolve_model_dir

    for name, default in arguments.items():
        value = getattr(args, name) or default
        if value is not None:
            setattr(args, name, resolve_model_dir(value))


if __name__ == "__main__":
    raise SystemExit(main())
