"""m3composer/fsutil.py: what the atomic writers publish has the modes of a plain open/mkdir."""
from __future__ import annotations

import os
import stat

import pytest

from m3composer.fsutil import atomic_file, building_dir, umask


@pytest.fixture(params=[0o022, 0o077, 0o002])
def process_umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_published_files_and_folders_honour_the_umask(tmp_path, process_umask):
    assert umask() == process_umask
    with atomic_file(tmp_path / "file.json") as handle:
        handle.write("{}")
    with building_dir(tmp_path / "folder") as folder:
        (folder / "inside.txt").write_text("x")
        (folder / "private.bin").touch(mode=0o600)        # as safetensors' save_file writes its file
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "file.json") == 0o666 & ~process_umask
    assert mode(tmp_path / "folder") == 0o777 & ~process_umask
    (tmp_path / "plain").mkdir()
    assert mode(tmp_path / "folder") == mode(tmp_path / "plain")
    assert mode(tmp_path / "folder" / "inside.txt") == mode(tmp_path / "folder" / "private.bin") == 0o666 & ~process_umask
