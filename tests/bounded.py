"""Waiting on spawned processes without letting a hang stall the suite or hide its cause.

Every Python child of the suite runs with PYTHONFAULTHANDLER=1 (tests/conftest.py), so SIGABRT
makes it print every thread's stack before it dies. When a wait runs out, the process (and its
session: a launcher's ranks too) gets SIGABRT, then SIGKILL, and the test fails with what it
printed, stacks included.
"""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

ABORT_GRACE_S = 5    # time for faulthandler to write the stacks after SIGABRT


def abort_with_stacks(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGABRT `proc`'s session (it was started with `start_new_session=True`), then SIGKILL what is
    left; returns the rest of its output (empty strings for outputs not piped)."""
    for sig in (signal.SIGABRT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            out, err = proc.communicate(timeout=ABORT_GRACE_S)
            return out or "", err or ""
        except subprocess.TimeoutExpired:
            continue
    out, err = proc.communicate()
    return out or "", err or ""


def run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, **kwargs)` in a session of its own; past
    `timeout` seconds the test fails with the command's output and every thread's stack."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = abort_with_stacks(proc)
        pytest.fail(f"{' '.join(map(str, cmd))[:300]} did not finish within {timeout} s; its output and "
                    f"stacks:\n{out[-3000:]}\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def release_finished_datasets() -> None:
    """Collect this process's garbage before starting ranks. The ranks of a node choose their shared-memory
    prefix from the blocks that exist (Streaming's `get_shm_prefix`, each rank walking /dev/shm on its
    own); a dataset of an earlier test that this process collects while they walk removes blocks between
    one rank's walk and the other's, and the ranks pick different prefixes ("shared memory prefix=N was
    not registered by local leader"; seen once in a shuffled run). Collected now, before they start,
    nothing of ours changes /dev/shm while they choose (docs/recipe.md §Streaming's shared memory)."""
    import gc

    gc.collect()
