"""scripts/launch.py: Composer's launcher, but SIGTERM/SIGUSR1 sent to it reach the ranks, and it waits for
them and exits with their code (0) instead of dying at once as `composer -n N` does."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import bounded

REPO = Path(__file__).resolve().parents[1]

RANK = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: (got.append(s), out.with_suffix(f".{s}").write_text("got")))
out.with_suffix(".ready").write_text("ready")
deadline = time.monotonic() + 60
while len(got) < 2 and time.monotonic() < deadline:
    time.sleep(0.02)
out.write_text(",".join(signal.Signals(s).name for s in got))
"""


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the launcher exited {proc.returncode}:\n{proc.communicate()[0][-6000:]}")
        if time.monotonic() > deadline:                   # a hang: the launcher's and the rank's stacks
            pytest.fail(f"{path.name} did not appear within 60 s:\n{bounded.abort_with_stacks(proc)[0][-6000:]}")
        time.sleep(0.05)


def test_sigusr1_and_sigterm_to_the_launcher_reach_the_rank_and_the_launcher_exits_0(tmp_path):
    (tmp_path / "rank.py").write_text(RANK)
    got = tmp_path / "got.txt"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "launch.py"), "-n", "1",
                             str(tmp_path / "rank.py"), str(got)], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(got.with_suffix(".ready"), proc)
        proc.send_signal(signal.SIGUSR1)                  # Slurm's --signal=USR1@90: the launcher lives on
        _wait_for(got.with_suffix(f".{int(signal.SIGUSR1)}"), proc)
        proc.send_signal(signal.SIGTERM)                  # a cloud scheduler's
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:                           # a hang: the launcher's and the rank's stacks
            print(bounded.abort_with_stacks(proc)[0][-6000:])
    assert proc.returncode == 0, output
    assert got.read_text() == "SIGUSR1,SIGTERM"
