"""Run untrusted programs (code a model wrote) in a sandbox and say whether they passed.

Each program runs in a fresh subprocess, never in the runner's process: ``python -I`` with an environment
of only ``PATH``/``LANG`` (plus ``HOME``/``TMPDIR`` pointing at its own fresh temporary directory, also its
working directory, removed afterwards), in its own process group that is killed at the wall-clock timeout,
under ``resource`` limits (address space, CPU seconds, file size, processes, open files). Where the
runner is root (CI, containers) it also, see :func:`sandbox_isolation`:

- drops to an unprivileged uid of its own (root ignores RLIMIT_NPROC, and a uid no other process uses
  makes the process limit exact and lets the runner kill every leftover process of that uid afterwards),
- enters a new network namespace (no interfaces but a downed loopback: no network at all),
- enters a new mount namespace in which every file system is read-only except the program's directory.

What it does not stop: reading files that are world-readable, using CPU and memory up to the limits, and
kernel exploits. It is a guard against accidents and careless code, not a security boundary for
adversaries.

Outcomes (:func:`classify_outcome`): ``passed`` = exit code 0 **and** the program reached its end: the
runner appends a last statement that writes a random nonce to a pipe only it reads (fd
:data:`END_MARKER_FD`), so a program that stops early with exit code 0 (``os._exit(0)``, ``sys.exit(0)``,
``exit()``, ``raise SystemExit``) or prints a marker text does not pass; ``failed`` = the program ran to its
end and said no (an ``AssertionError`` from its tests, or a non-zero exit without a traceback); ``error`` = it
crashed (any other exception, e.g. SyntaxError or MemoryError), was killed by a signal (CPU limit, file
size limit) or the sandbox could not be set up; ``timeout`` = killed by the wall clock. ``detail`` is the
last line of stderr.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from rtdlm_experiments.tasks import _sandbox_cgroup, _sandbox_cleanup, _sandbox_uids

STATUSES = ("passed", "failed", "timeout", "error")
CHILD_SCRIPT = str(Path(__file__).with_name("_sandbox_child.py"))
SETUP_FAILED = 125  # _sandbox_child.SETUP_FAILED (a script, not imported)
EXIT_GRACE_S = 0.5
"""How long output is still read after the program's main process exited (its pipes may still hold
data; a leftover child keeping them open is killed after this)."""
REAP_PATIENCE_S = 5.0
"""How long killed processes may take to disappear (be reaped by their parent) before their uid is
retired."""
OUT_OF_MEMORY = "out of memory (the sandbox's memory cgroup limit)"
END_MARKER_FD = 3
"""The program's fd of the pipe its last statement writes the nonce to (see :func:`with_end_marker`)."""
END_MARKER_LIMIT = 4096
"""Bytes of the marker pipe read and kept (an honest program writes only the nonce)."""
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class ExecutionResult:
    status: str
    """One of :data:`STATUSES`."""
    detail: str
    """The last non-empty line of stderr (or why the program was stopped)."""
    seconds: float
    exit_code: int | None = None
    """The process's exit code (negative: killed by that signal); None on timeout."""
    stdout: str = ""
    """The first ``max_output_bytes`` of stdout."""
    reached_end: bool = False
    """Whether the program's last statement (the runner's end marker) ran."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    processes: int = 8
    """Only enforced with the uid drop (the count is per uid; the runner's own uid runs other things)."""
    open_files: int = 256
    workdir_bytes: int = 64 << 20
    """Size of the program's directory (a tmpfs of its own under the read-only file system isolation)."""
    workdir_inodes: int = 2048
    """Files and directories the program's tmpfs holds at most."""
    max_output_bytes: int = 64 << 10
    """Captured per stream (stdout: its start, stderr: its end); the rest is read and dropped."""


@dataclass(frozen=True)
class Isolation:
    """Which isolation :func:`run_program` puts in force on this machine."""

    unprivileged_uid: bool
    network_namespace: bool
    readonly_filesystem: bool
    python: str
    """The interpreter the programs run under (the runner's own when the sandbox uid can run it)."""
    ipc_namespace: bool = False
    memory_cgroup: str = ""
    """``"v1"``/``"v2"``: the program's processes together are held to ``memory_bytes`` by a memory cgroup
    (shared memory and tmpfs files included); ``""``: only RLIMIT_AS, per process, address space only."""

    def describe(self) -> str:
        """The tag value: every layer in force, from ``'rlimits+process-group'`` up.

        >>> Isolation(False, False, False, "python").describe()
        'rlimits+process-group'
        >>> Isolation(True, True, True, "python", True, "v2").describe().split("+")[2:6]
        ['uid', 'sigkill-cleanup', 'ipc-cleanup', 'netns']
        >>> Isolation(True, True, True, "python", True, "v2").describe().split("+")[6:]
        ['ipcns', 'readonly-fs', 'private-tmp', 'inode-cap', 'memcg-v2']
        """
        uid, readonly = self.unprivileged_uid, self.readonly_filesystem
        layers = {
            "rlimits": True,
            "process-group": True,
            "uid": uid,
            "sigkill-cleanup": uid,  # every leftover process of the uid, killed by root
            "ipc-cleanup": uid,  # SysV / POSIX IPC objects the uid left, removed
            "netns": self.network_namespace,
            "ipcns": self.ipc_namespace,
            "readonly-fs": readonly,
            "private-tmp": readonly,  # empty tmpfs over /tmp, /run, /dev/shm...: host sockets hidden
            "inode-cap": readonly,
            f"memcg-{self.memory_cgroup}": bool(self.memory_cgroup),
        }
        return "+".join(name for name, on in layers.items() if on)


EXITED_EARLY = "exited with code 0 before the end of the program"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Warning)\b")


def classify_outcome(
    exit_code: int | None, stderr: str, timed_out: bool, reached_end: bool = True
) -> tuple[str, str]:
    """``(status, detail)`` of a finished program (see the module docstring for the rules).

    >>> classify_outcome(0, "", False)
    ('passed', '')
    >>> classify_outcome(0, "", False, reached_end=False)
    ('failed', 'exited with code 0 before the end of the program')
    >>> classify_outcome(1, "Traceback (most recent call last):\\n  ...\\nAssertionError: 3 != 4\\n", False)
    ('failed', 'AssertionError: 3 != 4')
    >>> classify_outcome(1, "Traceback (most recent call last):\\n  ...\\nNameError: name 'x'\\n", False)
    ('error', "NameError: name 'x'")
    >>> classify_outcome(2, "", False)
    ('failed', 'exit code 2')
    >>> classify_outcome(-24, "", False)
    ('error', 'killed by SIGXCPU')
    >>> classify_outcome(None, "", True)
    ('timeout', 'killed at the wall-clock timeout')
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if timed_out:
        return "timeout", last or "killed at the wall-clock timeout"
    if exit_code == 0:
        return ("passed", "") if reached_end else ("failed", EXITED_EARLY)
    if exit_code is not None and exit_code < 0:
        return "error", last or f"killed by {signal.Signals(-exit_code).name}"
    if last.startswith("sandbox: setup failed"):
        return "error", last
    if last.startswith("AssertionError"):
        return "failed", last
    if "Traceback (most recent call last)" in stderr or _EXCEPTION_LINE.match(last):
        return "error", last
    return "failed", last or f"exit code {exit_code}"


def with_end_marker(source: str, nonce: str) -> str:
    """``source`` followed by a last statement that writes ``nonce`` to :data:`END_MARKER_FD`: it runs only
    if every statement before it ran to its end (a code-executing task puts its ``check(...)`` call last).

    >>> print(with_end_marker("check(f)", "ab12"), end="")
    check(f)
    <BLANKLINE>
    __import__("os").write(3, b"ab12")
    """
    return f'{source}\n\n__import__("os").write({END_MARKER_FD}, b"{nonce}")\n'


def run_program(
    source: str,
    timeout_s: float = 5.0,
    *,
    limits: SandboxLimits | None = None,
    isolation: Isolation | None = None,
) -> ExecutionResult:
    """Run ``source`` as a Python program in the sandbox and return its outcome; it passes only if it exits
    with 0 after its last statement ran. ``isolation`` defaults to the most this machine allows
    (:func:`sandbox_isolation`); pass less only to test weaker set-ups."""
    limits = limits or SandboxLimits()
    isolation = isolation or sandbox_isolation()
    nonce = secrets.token_hex(16)
    program = with_end_marker(source, nonce)
    result = _run_isolated(isolation, limits, timeout_s, ["program.py"], program, nonce.encode())
    return result


def _run_isolated(
    isolation: Isolation,
    limits: SandboxLimits,
    timeout_s: float,
    argv: list[str],
    program: str | None,
    nonce: bytes | None,
) -> ExecutionResult:
    """One sandboxed run: lease a uid, make the program's directory and memory cgroup, supervise, and
    clean up (kill the uid's leftovers, remove its IPC objects, the directory and the cgroup)."""
    cgroup_at = _sandbox_cgroup.hierarchy() if isolation.memory_cgroup else None
    with _sandbox_uids.lease(isolation.unprivileged_uid) as uid:
        workdir = _make_workdir(uid)
        try:
            with _sandbox_cgroup.memory_cgroup(cgroup_at, limits.memory_bytes) as cgroup:
                try:
                    if program is not None:
                        (workdir / "program.py").write_text(program, encoding="utf-8")
                    config = _child_config(isolation, uid, workdir, limits, timeout_s, argv, cgroup)
                    result = _supervise(config, timeout_s, limits.max_output_bytes, nonce)
                finally:
                    if uid is not None:
                        _clean_up_after(uid)
                if result.exit_code == -signal.SIGKILL and _sandbox_cgroup.oom_kills(cgroup):
                    result = replace(result, detail=f"killed by SIGKILL: {OUT_OF_MEMORY}")
                return result
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def run_programs(
    sources: Sequence[str],
    timeout_s: float = 5.0,
    workers: int | None = None,
    *,
    limits: SandboxLimits | None = None,
    isolation: Isolation | None = None,
) -> list[ExecutionResult]:
    """:func:`run_program` on every source, ``workers`` at a time (default: the CPU count, at most 8);
    results in the order of ``sources``."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            pool.map(
                lambda source: run_program(source, timeout_s, limits=limits, isolation=isolation), sources
            )
        )


@cache
def sandbox_isolation() -> Isolation:
    """Probe once which isolation this machine allows (root: uid drop; then a network namespace, an IPC
    namespace, a read-only mount namespace and a memory cgroup, each kept only if a trivial program still
    runs under it)."""
    if os.geteuid() != 0:
        return Isolation(False, False, False, sys.executable)
    python = next((exe for exe in _python_candidates() if _probe(Isolation(True, False, False, exe))), None)
    if python is None:
        return Isolation(False, False, False, sys.executable)
    network = _probe(Isolation(True, True, False, python))
    ipc = _probe(Isolation(True, network, False, python, ipc_namespace=True))
    readonly = _probe(Isolation(True, network, True, python, ipc))
    found = _sandbox_cgroup.hierarchy()
    memory = (
        found.version
        if found and _probe(Isolation(True, network, readonly, python, ipc, found.version))
        else ""
    )
    return Isolation(True, network, readonly, python, ipc, memory)


def _python_candidates() -> list[str]:
    found = [sys.executable, shutil.which("python3", path=SANDBOX_ENV["PATH"])]
    return list(dict.fromkeys(exe for exe in found if exe))


def _probe(isolation: Isolation) -> bool:
    """Whether a trivial program runs under ``isolation`` (False too when setting it up fails here, e.g. a
    cgroup folder that cannot be made)."""
    try:
        return _run_isolated(isolation, SandboxLimits(), 10.0, ["-c", "pass"], None, None).status == "passed"
    except OSError:
        return False


def _make_workdir(uid: int | None) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="rtdlm-sandbox-"))
    if uid is not None:
        os.chown(workdir, uid, uid)
    return workdir


def _child_config(
    isolation: Isolation,
    uid: int | None,
    workdir: Path,
    limits: SandboxLimits,
    timeout_s: float,
    argv: list[str],
    cgroup: Path | None,
) -> dict:
    rlimits = {
        "RLIMIT_AS": limits.memory_bytes,
        "RLIMIT_CPU": math.ceil(timeout_s) + 1,
        "RLIMIT_FSIZE": limits.file_bytes,
        "RLIMIT_NOFILE": limits.open_files,
        "RLIMIT_CORE": 0,
    }
    if uid is not None:
        rlimits["RLIMIT_NPROC"] = limits.processes
    return {
        "mode": "run",
        "uid": uid,
        "workdir": str(workdir),
        "network_namespace": isolation.network_namespace,
        "ipc_namespace": isolation.ipc_namespace,
        "readonly_filesystem": isolation.readonly_filesystem,
        "cgroup_procs": None if cgroup is None else str(cgroup / "cgroup.procs"),
        "workdir_bytes": limits.workdir_bytes,
        "workdir_inodes": limits.workdir_inodes,
        "limits": rlimits,
        "python": isolation.python,
        "argv": argv,
        "env": SANDBOX_ENV | {"HOME": str(workdir), "TMPDIR": str(workdir)},
    }


def _supervise(config: dict, timeout_s: float, max_output_bytes: int, nonce: bytes | None) -> ExecutionResult:
    """Run the sandbox child with ``config``; with a ``nonce``, the program passes only if it wrote it to
    its end-marker pipe (without one, as for the probe, exit code 0 is enough)."""
    start = time.monotonic()
    marker_read, marker_write = os.pipe()
    config = config | {"marker_fd": marker_write}
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", CHILD_SCRIPT, json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            start_new_session=True,
            pass_fds=(marker_write,),
        )
    finally:
        os.close(marker_write)
    with open(marker_read, "rb", buffering=0) as marker:
        stdout, stderr, written, timed_out = _drain(process, marker, start + timeout_s, max_output_bytes)
    _kill_group(process.pid)
    exit_code = _wait_killed(process)
    timed_out = timed_out or exit_code is None  # still there after SIGKILL: stopped by the wall clock
    process.stdout.close()
    process.stderr.close()
    seconds = time.monotonic() - start
    reached_end = nonce is None or nonce in written
    status, detail = classify_outcome(
        None if timed_out else exit_code, stderr.decode("utf-8", "replace"), timed_out, reached_end
    )
    return ExecutionResult(status, detail, seconds, None if timed_out else exit_code,
                           stdout.decode("utf-8", "replace"), reached_end and nonce is not None)  # fmt: skip


def _wait_killed(process: subprocess.Popen) -> int | None:
    """The exit code of a process already sent SIGKILL; None if it is still not gone after
    :data:`REAP_PATIENCE_S` (e.g. stuck in the kernel): the runner never waits without a bound."""
    try:
        return process.wait(timeout=REAP_PATIENCE_S)
    except subprocess.TimeoutExpired:
        return None


def _drain(
    process: subprocess.Popen, marker, deadline: float, limit: int
) -> tuple[bytes, bytes, bytes, bool]:
    """Read the three pipes (stdout, stderr, end marker) until they close: keep the first ``limit`` bytes
    of stdout, the last ``limit`` of stderr and the first :data:`END_MARKER_LIMIT` of the marker pipe,
    never more. Returns ``(stdout, stderr, marker, timed_out)``."""
    kept = {process.stdout: bytearray(), process.stderr: bytearray(), marker: bytearray()}
    first_bytes = {process.stdout: limit, marker: END_MARKER_LIMIT}
    exited_at = None
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for pipe in kept:
            selector.register(pipe, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and _has_exited(process.pid):
                exited_at = now
            if exited_at is not None and (not selector.get_map() or now - exited_at > EXIT_GRACE_S):
                break
            if not selector.get_map():  # pipes closed but the program still runs
                time.sleep(min(0.01, deadline - now))
                continue
            for key, _ in selector.select(timeout=min(0.05, deadline - now)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = kept[key.fileobj]
                if key.fileobj in first_bytes:
                    buffer += chunk[: max(0, first_bytes[key.fileobj] - len(buffer))]
                else:
                    buffer += chunk
                    del buffer[:-limit]
    return bytes(kept[process.stdout]), bytes(kept[process.stderr]), bytes(kept[marker]), timed_out


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (its pid stays its group's id until we wait)."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _clean_up_after(uid: int) -> None:
    """Kill every process left running as the sandbox ``uid`` (children that left the process group) and
    remove the IPC objects it left. First the reaper's atomic ``kill(-1)`` as that uid (a fork bomb cannot
    outrun it), bounded in time because a leftover of the same uid can stop it; then root kills whatever
    is left, pid by pid (root cannot be signalled by the uid). A uid whose processes do not go away is not
    leased again by this process."""
    config = json.dumps({"mode": "reap", "uid": uid, "patience_s": REAP_PATIENCE_S})
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-I", "-S", CHILD_SCRIPT, config], env={}, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=REAP_PATIENCE_S + 1)  # fmt: skip
    if not _sandbox_cleanup.kill_all_of(uid, REAP_PATIENCE_S):
        _sandbox_uids.retire(uid)
    _sandbox_cleanup.remove_ipc_of(uid)
