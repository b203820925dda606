"""What the runner (root) does after a sandboxed program, as root: kill every process left running as the
sandbox uid, and remove the System V IPC objects and POSIX shared memory / message queue files that uid
left behind (they outlive their processes; an IPC namespace, where the machine allows one, makes this a
no-op). Root's signals cannot be blocked, and a process of the sandbox uid cannot signal root back, so a
leftover cannot stop this cleanup; every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import time
from pathlib import Path

IPC_RMID = 0
SYSV_TABLES = {"shm": "shmid", "sem": "semid", "msg": "msqid"}
POSIX_IPC_DIRS = ("/dev/shm", "/dev/mqueue")

_libc = ctypes.CDLL(None, use_errno=True)


def _real_uid(pid: str) -> int | None:
    """The real uid in ``/proc/<pid>/status`` (the owner of ``/proc/<pid>`` turns root for non-dumpable
    processes; the status line does not)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def processes_of(uid: int) -> list[int]:
    """Pids whose real uid is ``uid``, zombies included (they count against RLIMIT_NPROC)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and _real_uid(name) == uid]


def kill_all_of(uid: int, patience_s: float) -> bool:
    """SIGKILL every process of ``uid`` until none is left; False if some remain after ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while pids := processes_of(uid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _sysv_ids_of(uid: int, table: str) -> list[int]:
    """Ids of the System V objects in ``/proc/sysvipc/<table>`` owned or created by ``uid``."""
    try:
        lines = Path(f"/proc/sysvipc/{table}").read_text().splitlines()
    except OSError:
        return []
    header = lines[0].split()
    column = {name: index for index, name in enumerate(header)}
    rows = [line.split() for line in lines[1:]]
    return [
        int(row[column[SYSV_TABLES[table]]])
        for row in rows
        if uid in (int(row[column["uid"]]), int(row[column["cuid"]]))
    ]


def remove_ipc_of(uid: int) -> None:
    """Remove the SysV shared memory, semaphores and message queues of ``uid``, and its files in
    ``/dev/shm`` and ``/dev/mqueue`` (POSIX shared memory, message queues) where those are mounted."""
    for shmid in _sysv_ids_of(uid, "shm"):
        _libc.shmctl(shmid, IPC_RMID, None)
    for semid in _sysv_ids_of(uid, "sem"):
        _libc.semctl(semid, 0, IPC_RMID)
    for msqid in _sysv_ids_of(uid, "msg"):
        _libc.msgctl(msqid, IPC_RMID, None)
    for folder in POSIX_IPC_DIRS:
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
