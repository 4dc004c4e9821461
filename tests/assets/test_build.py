"""Proves `m3composer/assets/build.py`: builds are idempotent, atomic, serialised between
concurrent callers, and reachable as `m3c assets`."""
from __future__ import annotations

import json
import threading
import time

import pytest

from m3composer.assets import build as build_module
from m3composer.assets.build import MARKER_FILE, _build_atomically, ensure_assets, is_complete
from m3composer.assets.paths import CACHE_ENV, E5_SMALL, TINY
from m3composer.cli import main


class CountingBuilder:
    """Writes one file per call and counts calls; optionally slow or failing."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.calls = 0
        self.delay = delay
        self.fail = fail

    def __call__(self, folder, log):
        self.calls += 1
        (folder / "weights.txt").write_text(f"build {self.calls}\n")
        log("wrote weights.txt ... 0.0 s")
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("builder crashed")


def test_second_call_reuses_the_complete_folder(tmp_path):
    builder, lines = CountingBuilder(), []
    first = _build_atomically(TINY, tmp_path, builder, force=False, log=lines.append)
    marker_mtime = (first / MARKER_FILE).stat().st_mtime_ns
    second = _build_atomically(TINY, tmp_path, builder, force=False, log=lines.append)
    assert first == second == tmp_path / TINY
    assert builder.calls == 1
    assert (first / MARKER_FILE).stat().st_mtime_ns == marker_mtime
    assert lines[0] == f"[assets] {TINY}: wrote weights.txt ... 0.0 s"
    assert lines[1].startswith(f"[assets] {TINY}: built {first}")
    assert lines[2] == f"[assets] {TINY}: reusing {first}"


def test_force_rebuilds_and_replaces_the_old_folder(tmp_path):
    builder = CountingBuilder()
    folder = _build_atomically(TINY, tmp_path, builder, force=False, log=lambda _: None)
    (folder / "stale.txt").write_text("from an older build")
    _build_atomically(TINY, tmp_path, builder, force=True, log=lambda _: None)
    assert builder.calls == 2
    assert (folder / "weights.txt").read_text() == "build 2\n"
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TINY, f".{TINY}.lock"])


def test_half_built_folders_are_not_taken_for_complete_ones(tmp_path):
    # A crash left a temp folder behind, and a target folder without its marker.
    leftover = tmp_path / f".{TINY}.building-abc123"
    leftover.mkdir()
    (leftover / "weights.txt").write_text("partial")
    target = tmp_path / TINY
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert not is_complete(leftover, TINY) and not is_complete(target, TINY)

    builder = CountingBuilder()
    _build_atomically(TINY, tmp_path, builder, force=False, log=lambda _: None)
    assert builder.calls == 1
    assert is_complete(target, TINY)
    assert (target / "weights.txt").read_text() == "build 1\n" and not (target / "config.json").exists()


def test_a_marker_from_another_format_or_asset_triggers_a_rebuild(tmp_path):
    target = tmp_path / TINY
    target.mkdir()
    (target / MARKER_FILE).write_text(json.dumps({"asset": TINY, "format": 0}))
    assert not is_complete(target, TINY)
    (target / MARKER_FILE).write_text(json.dumps({"asset": E5_SMALL, "format": build_module.ASSET_FORMAT[TINY]}))
    assert not is_complete(target, TINY)
    builder = CountingBuilder()
    _build_atomically(TINY, tmp_path, builder, force=False, log=lambda _: None)
    assert builder.calls == 1 and is_complete(target, TINY)


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="builder crashed"):
        _build_atomically(TINY, tmp_path, CountingBuilder(fail=True), force=False, log=lambda _: None)
    assert [p.name for p in tmp_path.iterdir()] == [f".{TINY}.lock"]


def test_concurrent_callers_build_once(tmp_path):
    builder, results = CountingBuilder(delay=0.3), []
    threads = [threading.Thread(target=lambda: results.append(
        _build_atomically(TINY, tmp_path, builder, force=False, log=lambda _: None))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builder.calls == 1
    assert results == [tmp_path / TINY] * 3


def test_m3c_assets_cli_reuses_e5_and_builds_tiny(tmp_path, e5_dir, capsys):
    # Link the machine's complete e5 folder in, so only the 1-second tiny build runs here.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / E5_SMALL).symlink_to(e5_dir, target_is_directory=True)
    assert main(["assets", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"[assets] {E5_SMALL}: reusing {cache / E5_SMALL}" in out
    assert f"[assets] {TINY}: built {cache / TINY}" in out
    assert f"{E5_SMALL}: {cache / E5_SMALL}\n" in out and f"{TINY}: {cache / TINY}\n" in out
    assert is_complete(cache / TINY, TINY) and (cache / TINY / "model.safetensors").is_file()

    assert main(["assets", "--cache-dir", str(cache)]) == 0
    assert f"[assets] {TINY}: reusing {cache / TINY}" in capsys.readouterr().out


def test_ensure_assets_defaults_to_the_cache_env_var(tmp_path, monkeypatch, assets):
    for name, folder in assets.items():
        (tmp_path / name).symlink_to(folder, target_is_directory=True)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    lines = []
    assert ensure_assets(log=lines.append) == {E5_SMALL: tmp_path / E5_SMALL, TINY: tmp_path / TINY}
    assert lines == [f"[assets] {E5_SMALL}: reusing {tmp_path / E5_SMALL}",
                     f"[assets] {TINY}: reusing {tmp_path / TINY}"]
