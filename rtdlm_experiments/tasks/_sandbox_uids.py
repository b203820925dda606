"""A pool of unprivileged uids for the sandbox, one per program running at a time, across processes.

A uid of its own per running program makes RLIMIT_NPROC (a per-uid count) exact and lets the runner kill
every leftover process of that uid without touching anyone else's. The pool is guarded by one lock file
per uid (``flock``: released when the holder exits, even if it crashes).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FIRST_UID = 64000
POOL_SIZE = 64
"""Uids 64000..64063: above the usual system and user ranges and below ``nobody`` (65534)."""

_thread_lock = threading.Lock()
_retired: set[int] = set()


def retire(uid: int) -> None:
    """Never lease ``uid`` again in this process (it has processes that would not die)."""
    with _thread_lock:
        _retired.add(uid)


def _lock_dir() -> Path:
    folder = Path(tempfile.gettempdir()) / f"rtdlm-sandbox-uids-{os.geteuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _unused_by_accounts(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


def _try_lock(uid: int) -> int | None:
    fd = os.open(_lock_dir() / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def lease(enabled: bool) -> Iterator[int | None]:
    """A uid nobody else is using for the duration of the block (None when ``enabled`` is false); waits
    while all :data:`POOL_SIZE` are taken."""
    if not enabled:
        yield None
        return
    while True:
        with _thread_lock:  # flock is per open file, so threads of one process need their own guard
            for uid in range(FIRST_UID, FIRST_UID + POOL_SIZE):
                if uid not in _retired and _unused_by_accounts(uid) and (fd := _try_lock(uid)) is not None:
                    break
            else:
                uid, fd = None, None
        if fd is not None:
            break
        time.sleep(0.05)
    try:
        yield uid
    finally:
        os.close(fd)
