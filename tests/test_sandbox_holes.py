"""The sandbox's holes an attacker found (issue 21), one test each: every one failed on the sandbox before
the fix, and is skipped, with the reason, where the machine lacks the privilege the layer needs. Each
hostile program is bounded (short timeouts, the sandbox's process and memory caps), and each check counts
only what its own test started."""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from rtdlm_experiments.tasks import execution
from rtdlm_experiments.tasks.execution import SandboxLimits, run_program, sandbox_isolation
from tests.sandbox_processes import live_processes_started_in, record_sandbox_dirs

ISOLATION = sandbox_isolation()
needs_uid = pytest.mark.skipif(
    not ISOLATION.unprivileged_uid, reason="runner is not root: no sandbox uid, no cleanup after it"
)
needs_mount_namespace = pytest.mark.skipif(
    not ISOLATION.readonly_filesystem, reason="no mount namespace (unshare -m): host directories stay visible"
)
needs_memory_cgroup = pytest.mark.skipif(
    not ISOLATION.memory_cgroup, reason="no writable memory cgroup: only RLIMIT_AS, which misses memfd/shm"
)
_libc = ctypes.CDLL(None, use_errno=True)


@needs_uid
@pytest.mark.parametrize("ipc_namespace", [True, False], ids=["ipc-namespace", "cleanup-only"])
def test_sysv_shared_memory_does_not_outlive_the_program(ipc_namespace: bool):
    if ipc_namespace and not ISOLATION.ipc_namespace:
        pytest.skip("no IPC namespace (unshare -i) on this machine")
    isolation = replace(ISOLATION, ipc_namespace=ipc_namespace)
    key = secrets.randbelow(1 << 30) + 1
    program = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        f"shmid = libc.shmget({key}, 32 << 20, 0o1666)\n"  # IPC_CREAT | 0666
        "assert shmid >= 0, ctypes.get_errno()\n"
        "address = libc.shmat(shmid, None, 0)\n"
        "ctypes.memset(address, 1, 32 << 20)\n"
        "libc.shmdt(ctypes.c_void_p(address))\n"
    )
    result = run_program(program, timeout_s=10, isolation=isolation)
    left = _libc.shmget(key, 0, 0)
    if left >= 0:
        _libc.shmctl(left, 0, None)  # IPC_RMID: do not leave the test's own leak on the host
    assert result.status == "passed", result.detail
    assert left == -1, "the program's SysV shared memory segment outlived it"


@needs_uid
def test_posix_message_queue_does_not_outlive_the_program():
    name = f"/rtdlm-test-{secrets.token_hex(6)}"
    program = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"queue = libc.mq_open({name.encode()!r}, os.O_CREAT | os.O_RDWR, 0o666, None)\n"
        "assert queue >= 0, ctypes.get_errno()\n"
    )
    result = run_program(program, timeout_s=10)
    left = _libc.mq_open(name.encode(), os.O_RDONLY)
    if left >= 0:
        _libc.mq_close(left)
        _libc.mq_unlink(name.encode())
    assert result.status == "passed", result.detail
    assert left == -1, "the program's POSIX message queue outlived it"


@needs_memory_cgroup
def test_shared_memory_counts_against_the_memory_limit():
    """memfd pages are not in the address space RLIMIT_AS bounds: 768 MiB of them under a 256 MiB limit."""
    program = (
        "import os\nfds = []\n"
        "for _ in range(64):\n"  # 12 MiB each: under the file size limit, 768 MiB in all
        "    fds.append(os.memfd_create('x'))\n"
        "    os.write(fds[-1], bytes(12 << 20))\n"
        "print('survived')\n"
    )
    result = run_program(program, timeout_s=20, limits=SandboxLimits(memory_bytes=256 << 20))
    assert "survived" not in result.stdout
    assert (result.status, result.detail) == ("error", f"killed by SIGKILL: {execution.OUT_OF_MEMORY}")


@needs_mount_namespace
@pytest.mark.parametrize("folder", ["/tmp", "/dev/shm"])
def test_host_unix_sockets_are_hidden(folder: str, tmp_path: Path):
    """A world-writable socket in a world-writable directory: the kind a program found in /tmp."""
    directory = Path(folder) / f"rtdlm-socket-{tmp_path.name}"
    directory.mkdir(mode=0o777)
    path = directory / "server.sock"
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            os.chmod(directory, 0o777)
            os.chmod(path, 0o777)
            server.listen(1)
            server.settimeout(0.5)
            result = run_program(
                f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\nprint('in')\n",
                timeout_s=10,
            )
            with pytest.raises(TimeoutError):
                server.accept()
    finally:
        path.unlink(missing_ok=True)
        directory.rmdir()
    assert result.status == "error" and "in" not in result.stdout


@needs_mount_namespace
def test_a_host_socket_outside_the_hidden_directories_is_covered(tmp_path: Path):
    """Sockets elsewhere (here: the checkout, world-readable) are found in /proc/net/unix and covered."""
    path = Path(__file__).resolve().parent / f".rtdlm-socket-{secrets.token_hex(4)}"
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            os.chmod(path, 0o777)
            server.listen(1)
            server.settimeout(0.5)
            result = run_program(
                f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\n", timeout_s=10
            )
            with pytest.raises(TimeoutError):
                server.accept()
    finally:
        path.unlink(missing_ok=True)
    assert result.status == "error"


STOPPER = (
    "import os, signal\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    for fd in (0, 1, 2, 3):\n"
    "        os.close(fd)\n"
    "    while True:\n"
    "        try:\n"
    "            os.kill(-1, signal.SIGSTOP)\n"
    "        except OSError:\n"
    "            pass\n"
)
"""A leftover that leaves the process group, closes its pipes and stops every process its uid may signal:
the program itself, and a cleanup process that switched to that uid."""


@pytest.fixture
def started(monkeypatch) -> list[Path]:
    """The sandbox directories of this test's programs (see `tests.sandbox_processes`)."""
    return record_sandbox_dirs(monkeypatch)


def run_bounded(program: str, bound_s: float) -> execution.ExecutionResult:
    results: list[execution.ExecutionResult] = []
    worker = threading.Thread(target=lambda: results.append(run_program(program, 2.0)), daemon=True)
    worker.start()
    worker.join(timeout=bound_s)
    assert not worker.is_alive(), "the runner hung"
    return results[0]


@needs_uid
def test_runner_never_hangs_when_a_leftover_stops_its_cleanup(monkeypatch, started: list[Path]):
    """The race the attacker won in 2 of 4 tries, made certain: the uid's reaper is stopped before it can
    kill. Every wait is bounded and root kills the leftovers, so the run comes back and leaves nothing."""
    real_run = subprocess.run

    def reaper_stopped_at_once(argv, **kwargs):
        if '"mode": "reap"' in argv[-1]:
            argv = ["/bin/sh", "-c", 'kill -STOP $$; exec "$@"', "sh", *argv]
        return real_run(argv, **kwargs)

    monkeypatch.setattr(execution.subprocess, "run", reaper_stopped_at_once)
    monkeypatch.setattr(execution, "REAP_PATIENCE_S", 1.0)
    assert run_bounded(STOPPER, 30).status in execution.STATUSES  # the stopper may stop it: a timeout
    assert live_processes_started_in(started) == []


@needs_uid
def test_a_leftover_stopping_every_process_of_its_uid_is_killed(started: list[Path]):
    assert run_bounded(STOPPER, 60).status in execution.STATUSES
    assert live_processes_started_in(started) == []


@needs_mount_namespace
def test_the_programs_directory_has_an_inode_cap():
    program = (
        "made = 0\ntry:\n"
        "    for made in range(100_000):\n"
        "        open(f'f{made}', 'w').close()\n"
        "except OSError as err:\n"
        "    print(made, err.errno)\n"
    )
    result = run_program(program, timeout_s=30)
    made, errno = (int(word) for word in result.stdout.split())
    assert made < SandboxLimits().workdir_inodes and errno == 28  # ENOSPC


def test_isolation_tag_lists_every_layer_in_force():
    layers = ISOLATION.describe().split("+")
    assert layers[:2] == ["rlimits", "process-group"]
    assert ("uid" in layers) == ("sigkill-cleanup" in layers) == ISOLATION.unprivileged_uid
    assert ("ipcns" in layers) == ISOLATION.ipc_namespace
    assert ("private-tmp" in layers) == ("inode-cap" in layers) == ISOLATION.readonly_filesystem
    assert (f"memcg-{ISOLATION.memory_cgroup}" in layers) == bool(ISOLATION.memory_cgroup)
