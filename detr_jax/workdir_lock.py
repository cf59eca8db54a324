"""One run per workdir: a second ``train.py`` on a workdir that a live run holds stops at once.

The lock is ``fcntl.flock`` on WORKDIR/run.lock, taken by process 0 for the whole run and released
by the kernel when the process ends, however it ends (no stale lock after a crash). The file says
who holds it. Every process learns the outcome from process 0, so all of them stop together.
"""
import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from detr_jax.errors import WorkdirInUse

LOCK_FILE = "run.lock"


def _try_lock(path: Path):
    """(open file holding the lock, '') or (None, what the lock file says of its holder)."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, holder
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle, ""


@contextlib.contextmanager
def hold(workdir):
    """Holds ``workdir`` for a run (creating it); ``WorkdirInUse`` on every process when a live run
    holds it. Every process enters it, at the same point."""
    workdir = Path(workdir).absolute()
    handle, holder = None, ""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        handle, holder = _try_lock(workdir / LOCK_FILE)
    held = np.int32(handle is not None)
    if jax.process_count() > 1:  # the other processes learn process 0's outcome
        held = multihost_utils.broadcast_one_to_all(held)
    if not held:
        raise WorkdirInUse(f"{workdir} is in use by another run ({holder or 'see process 0'}; lock "
                           f"{workdir / LOCK_FILE}): wait for it to end, stop it, or use another --workdir")
    try:
        yield workdir
    finally:
        if handle is not None:
            handle.close()
