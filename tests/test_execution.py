"""The sandbox treats programs as hostile: each case below is one way a program could hurt the runner."""

from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

import pytest

from rtdlm_experiments.tasks.execution import (
    STATUSES,
    ExecutionResult,
    Isolation,
    run_program,
    run_programs,
    sandbox_isolation,
)
from tests.sandbox_processes import live_processes_started_in, record_sandbox_dirs

REPO_ROOT = Path(__file__).resolve().parents[1]
ISOLATION = sandbox_isolation()
needs_uid = pytest.mark.skipif(
    not ISOLATION.unprivileged_uid, reason="runner is not root: the sandbox cannot drop to its own uid"
)


@pytest.fixture
def started(monkeypatch) -> list[Path]:
    """The sandbox directories of this test's programs (see `tests.sandbox_processes`)."""
    return record_sandbox_dirs(monkeypatch)


def assert_runner_unharmed(started: list[Path]) -> None:
    assert run_program("print(6 * 7)", timeout_s=10).stdout == "42\n"
    assert live_processes_started_in(started) == []


def test_passed_failed_error_basic_cases():
    passed = run_program("assert sum([1, 2]) == 3\nprint('ok')")
    failed = run_program("def f():\n    return 3\nassert f() == 4, 'f is wrong'\n")
    error = run_program("def f(:\n    pass\n")
    crash = run_program("undefined_name + 1")
    exit_nonzero = run_program("import sys\nsys.exit(3)")
    assert (passed.status, passed.detail, passed.exit_code, passed.stdout) == ("passed", "", 0, "ok\n")
    assert (failed.status, failed.detail) == ("failed", "AssertionError: f is wrong")
    assert (error.status, error.detail.split(":")[0]) == ("error", "SyntaxError")
    assert (crash.status, crash.detail) == ("error", "NameError: name 'undefined_name' is not defined")
    assert (exit_nonzero.status, exit_nonzero.exit_code) == ("failed", 3)
    assert all(result.status in STATUSES for result in (passed, failed, error, crash))


def test_program_sees_only_its_own_directory_and_a_bare_environment():
    result = run_program(
        "import os, sys\n"
        "print(sorted(os.environ))\n"
        "print(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])\n"
        "print(sys.flags.isolated)\n"
    )
    assert result.stdout.splitlines() == ["['HOME', 'LANG', 'PATH', 'TMPDIR']", "True", "1"]


def test_infinite_loop_is_killed_within_timeout_plus_two_seconds():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout"
    assert time.monotonic() - start < 1.0 + 2.0  # the spec's bound, not a speed measurement


def test_program_that_closes_its_output_still_runs_until_the_timeout():
    result = run_program("import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout"


@pytest.mark.skipif(not ISOLATION.readonly_filesystem, reason="no mount namespace: no size-limited tmpfs")
def test_program_cannot_fill_the_disk_beyond_its_directory_size():
    result = run_program("for i in range(10):\n    open(f'f{i}', 'wb').write(bytes(15 << 20))\n")
    assert (result.status, result.detail) == ("error", "OSError: [Errno 28] No space left on device")


def test_memory_bomb_ends_as_error_and_runner_is_unharmed(started: list[Path]):
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 24))\n", timeout_s=10)
    assert result.status in ("error", "timeout")
    assert result.status == "timeout" or "MemoryError" in result.detail
    assert_runner_unharmed(started)


@needs_uid
@pytest.mark.slow
def test_fork_bomb_ends_bounded_and_leaves_no_process_behind(started: list[Path]):
    bomb = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"  # try to escape the process group that is killed at the timeout
        "    except OSError:\n"
        "        pass\n"
    )
    result = run_program(bomb, timeout_s=2.0)
    assert result.status in ("error", "timeout")
    assert_runner_unharmed(started)


@needs_uid
def test_process_limit_is_in_force_before_the_program_runs(started: list[Path]):
    result = run_program(
        "import os\npids = []\n"
        "try:\n"
        "    for _ in range(50):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            import time; time.sleep(5); os._exit(0)\n"
        "        pids.append(pid)\n"
        "except OSError:\n"
        "    pass\n"
        "print(len(pids))\n",
        timeout_s=10,
    )
    assert result.status == "passed"
    assert 0 < int(result.stdout) < 50
    assert live_processes_started_in(started) == []


def _write_attempt(target: Path) -> str:
    return f"with open({str(target)!r}, 'w') as handle:\n    handle.write('escaped')\n"


@needs_uid
@pytest.mark.parametrize(
    "target",
    [REPO_ROOT / "sandbox_escape.txt", Path.home() / "sandbox_escape.txt"],
    ids=["checkout", "runner-home"],
)
def test_program_cannot_write_to_checkout_or_runner_home(target: Path):
    result = run_program(_write_attempt(target))
    assert result.status == "error"
    assert not target.exists()


@pytest.mark.skipif(not ISOLATION.readonly_filesystem, reason="no mount namespace: /tmp stays writable")
def test_program_cannot_write_to_tmp_outside_its_directory(tmp_path: Path):
    target = Path("/tmp") / f"sandbox_escape_{tmp_path.name}.txt"
    result = run_program(_write_attempt(target))
    assert result.status == "error"
    assert "Read-only file system" in result.detail
    assert not target.exists()


@pytest.mark.skipif(not ISOLATION.network_namespace, reason="unshare -n (a network namespace) is unavailable")
def test_program_cannot_reach_a_socket_the_test_opens_on_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.status == "error"
    assert "OSError" in result.detail or "Error" in result.detail


@pytest.mark.slow
def test_program_printing_200_mb_passes_without_flooding_memory():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_program(
        "import sys\nline = 'x' * (1 << 20) + '\\n'\nfor _ in range(200):\n    sys.stdout.write(line)\n",
        timeout_s=60,
    )
    peak_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert result.status == "passed"
    assert len(result.stdout) == 64 << 10
    assert peak_growth_mb < 50


def test_batch_keeps_order_and_runs_every_program():
    sources = [f"assert {i} % 2 == 0" for i in range(6)]
    results = run_programs(sources, timeout_s=10, workers=3)
    assert [result.status for result in results] == ["passed", "failed"] * 3
    assert all(isinstance(result, ExecutionResult) for result in results)


def test_isolation_is_reported():
    described = ISOLATION.describe()
    assert described.startswith("rlimits+process-group")
    assert ("netns" in described) == ISOLATION.network_namespace


def test_minimal_isolation_still_runs_programs_in_a_killable_subprocess():
    """What a machine that allows no uid drop and no namespaces gets: rlimits and the process group."""
    minimal = Isolation(False, False, False, ISOLATION.python)
    assert minimal.describe() == "rlimits+process-group"
    results = run_programs(
        ["print('hi')", "assert False", "while True:\n    pass"], 1.0, 3, isolation=minimal
    )
    assert [(result.status, result.stdout) for result in results] == [
        ("passed", "hi\n"),
        ("failed", ""),
        ("timeout", ""),
    ]
