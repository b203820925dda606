"""The sandbox's first process: run by the runner as a script (stdlib only, never imported), it isolates
itself, drops to the sandbox uid and then ``exec``s the untrusted program, or (``mode="reap"``) kills every
process of the sandbox uid. It runs as the runner's user, so every step that needs root is optional.

Order matters: the memory cgroup is joined first (everything after is charged to it); namespaces and
mounts need root, so they come next; resource limits are set before the uid drop so that RLIMIT_NPROC
binds the moment the program runs as the unprivileged uid; ``no_new_privs`` stops set-uid binaries from
undoing the drop. Any failure exits with ``SETUP_FAILED`` and a line on stderr beginning with
``sandbox:``, so that the runner never mistakes a broken sandbox for a failing program.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import stat
import sys
import time
from pathlib import Path

SETUP_FAILED = 125
CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWIPC = 0x00020000, 0x40000000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_NO_NEW_PRIVS = 38
KEPT_MOUNT_FLAGS = {
    "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
}  # fmt: skip
LEFT_WRITABLE = ("/proc", "/sys", "/dev")
"""Kernel file systems stay as they are (``/dev/null`` must stay writable); ``/dev/shm`` and
``/dev/mqueue`` are world-writable storage, so they are made read-only like every other mount."""
HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run", "/var/run", "/var/lock", "/dev/shm", "/dev/mqueue")
"""Where host Unix sockets (X11, D-Bus, journald, docker, ...) and shared scratch space live: each is
covered by an empty read-only tmpfs, since a read-only mount does not stop ``connect()`` to a socket (and a
network namespace does not cover path sockets). Path sockets elsewhere are covered one by one."""
HIDDEN_DIR_OPTIONS = "size=64k,nr_inodes=64,mode=0755"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), None, flags, None), f"mount {target}")


def _mount_points() -> list[tuple[str, set[str]]]:
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            mounts.append((point, set(fields[5].split(","))))
    return mounts


def _stays_writable(point: str) -> bool:
    if point in ("/dev/shm", "/dev/mqueue") or point.startswith(("/dev/shm/", "/dev/mqueue/")):
        return False
    return any(point == top or point.startswith(top + "/") for top in LEFT_WRITABLE)


def _mount_tmpfs(target: str, options: str) -> None:
    flags = MS_NOSUID | MS_NODEV
    _check(_libc.mount(b"tmpfs", target.encode(), b"tmpfs", flags, options.encode()), f"mount tmpfs {target}")


def host_socket_paths() -> list[str]:
    """Paths of the Unix sockets bound on this host (``/proc/net/unix``, read before leaving the host's
    network namespace; abstract ones, ``@...``, belong to the network namespace and vanish with it)."""
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
        rows = [line.split(maxsplit=7) for line in table.readlines()[1:]]
    return sorted({row[7].strip() for row in rows if len(row) == 8 and row[7].startswith("/")})


def _hide_sockets(paths: list[str]) -> None:
    """Bind ``/dev/null`` over every host socket still visible: ``connect()`` then finds no socket."""
    for path in paths:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                _mount("/dev/null", path, MS_BIND)


def make_filesystem_read_only(
    workdir: str, uid: int | None, size_bytes: int, inodes: int, sockets: list[str]
) -> None:
    """In a fresh mount namespace: the host's socket and scratch directories hidden under empty tmpfs
    mounts, its other sockets covered, and every mount read-only except the program's own directory,
    which becomes a tmpfs of ``size_bytes`` and ``inodes`` (so the program cannot fill the disk or the
    inode table) holding the same files."""
    files = {entry.name: Path(entry.path).read_bytes() for entry in os.scandir(workdir) if entry.is_file()}
    _mount(None, "/", MS_REC | MS_PRIVATE)
    for folder in HIDDEN_DIRS:
        if os.path.isdir(folder) and not os.path.islink(folder):
            _mount_tmpfs(folder, HIDDEN_DIR_OPTIONS)
    os.makedirs(workdir, exist_ok=True)  # its parent may now be one of the empty tmpfs mounts
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    _mount_tmpfs(workdir, f"size={size_bytes},nr_inodes={inodes},mode=0700{owner}")
    for name, content in files.items():
        Path(workdir, name).write_bytes(content)
    _hide_sockets(sockets)
    for point, options in _mount_points():
        if point == workdir or _stays_writable(point):
            continue
        kept = sum(flag for name, flag in KEPT_MOUNT_FLAGS.items() if name in options)
        try:
            _mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except OSError:
            if "ro" not in options:  # an unremountable writable mount would be a hole: give up
                raise


def set_limits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def drop_privileges(uid: int) -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def run(config: dict) -> None:
    if config["cgroup_procs"]:
        Path(config["cgroup_procs"]).write_text(str(os.getpid()))
    flags = (
        (CLONE_NEWNET if config["network_namespace"] else 0)
        | (CLONE_NEWNS if config["readonly_filesystem"] else 0)
        | (CLONE_NEWIPC if config["ipc_namespace"] else 0)
    )
    sockets = host_socket_paths() if config["readonly_filesystem"] else []
    if flags:
        _check(_libc.unshare(flags), "unshare")
    if config["readonly_filesystem"]:
        make_filesystem_read_only(
            config["workdir"], config["uid"], config["workdir_bytes"], config["workdir_inodes"], sockets
        )
    set_limits(config["limits"])
    if config["uid"] is not None:
        drop_privileges(config["uid"])
    else:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    os.chdir(config["workdir"])
    _keep_marker_pipe_at_fd_3(config["marker_fd"])
    python = config["python"]
    os.execve(python, [python, "-I", *config["argv"]], config["env"])


def _keep_marker_pipe_at_fd_3(fd: int) -> None:
    """The program's end-marker pipe is fd 3 (the runner's appended last statement writes there)."""
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.set_inheritable(3, True)


def _processes_of(uid: int) -> list[int]:
    """Pids owned by ``uid`` other than this one, zombies included (they still count against
    RLIMIT_NPROC until their parent, often init, reaps them)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except FileNotFoundError:
                pass
    return found


def reap(uid: int, patience_s: float) -> None:
    """Kill every process of ``uid`` and wait until they are gone: ``kill(-1)`` reaches exactly the
    processes this uid may signal, atomically, so a fork bomb cannot outrun it. Exits 1 if some are
    still there after ``patience_s``."""
    drop_privileges(uid)
    deadline = time.monotonic() + patience_s
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)  # first, even if none is visible: /proc hides non-dumpable ones
        if not _processes_of(uid):
            return
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.01)


def main() -> None:
    config = json.loads(sys.argv[1])
    try:
        if config["mode"] == "reap":
            reap(config["uid"], config["patience_s"])
        else:
            run(config)
    except Exception as err:  # the runner reads this line as the result's detail
        sys.stderr.write(f"sandbox: setup failed: {type(err).__name__}: {err}\n")
        sys.exit(SETUP_FAILED)


if __name__ == "__main__":
    main()
