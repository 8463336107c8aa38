"""One lock per stage of a run directory, so concurrent invocations on a shared ``run_dir`` never interleave.

The lock is an OS file lock (``filelock``) on ``<run_dir>/<stage>/.lock``: the kernel releases it when its
holder exits, however it exits, so a killed run never leaves a stale lock behind. Beside it,
``.lock.owner`` says who holds it (host, pid, since when), for the message the second invocation prints.
By default the second invocation stops at once with that message (``lock_wait=false``); with
``lock_wait=true`` it waits, then finds the stage up to date (or runs it, if the first one failed).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline import io
from pipeline.errors import UserError

LOCK = ".lock"
OWNER = ".lock.owner"


def holder(stage_dir: Path) -> str:
    """Who holds (or last held) the lock of ``stage_dir``, in words."""
    try:
        owner = json.loads((stage_dir / OWNER).read_text())
    except (OSError, ValueError):
        return "another invocation"
    since = time.strftime("%H:%M:%S UTC", time.gmtime(owner.get("since", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {since}"


@contextlib.contextmanager
def stage_lock(run_dir: Path, name: str, *, wait: bool) -> Iterator[None]:
    """Hold stage ``name``'s lock in ``run_dir`` for the block.

    Without ``wait``, a lock held elsewhere raises a one-line :class:`UserError`; with it, blocks until free."""
    stage_dir = run_dir / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(stage_dir / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise UserError(f"stage {name} is running elsewhere on {run_dir} ({holder(stage_dir)}): wait for it to "
                            f"finish, or pass lock_wait=true to queue behind it") from None
        print(f"[{name}] waiting: the stage is running elsewhere on {run_dir} ({holder(stage_dir)})", flush=True)
        lock.acquire()
    try:
        io.write_json(stage_dir / OWNER, {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        yield
    finally:
        lock.release()
