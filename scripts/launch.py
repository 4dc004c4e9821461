"""Composer's launcher that survives preemption signals: `python scripts/launch.py -n 8 scripts/train.py
yamls/<recipe>.yaml key=value ...` takes the same arguments as `composer` (it runs composer's own
launcher in this process).

Why: `composer -n N` has no handler for SIGTERM or SIGUSR1, so the signal a cloud scheduler (SIGTERM)
or Slurm (`--signal=USR1@90`) sends it ends the launcher at once; the scheduler then sees the job
end and takes its remaining processes, the ranks, while they write their preemption checkpoint.
Here the launcher passes each such signal on to its ranks and keeps waiting for them: they save a
checkpoint at the next step boundary, exit 0 (m3composer.callbacks.preemption), and so does it.
"""
import signal
import sys

import psutil
from composer.cli.launcher import main


def forward_to_ranks(signum, frame) -> None:
    # The ranks are the launcher's children; a rank that got the signal itself too just sees it twice.
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward_to_ranks)
    sys.exit(main())
