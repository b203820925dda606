"""A local MLflow web process (``mlflow server`` or ``mlflow ui``) for the tests and tools: started on a
free loopback port, waited for, and stopped with its worker processes whatever happens.

    with serve_mlflow(["server", "--backend-store-uri", uri, "--artifacts-destination", dir], log) as url:
        ...
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

_SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job-runner process beside the web workers
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen, log_path: Path, start_timeout: float) -> None:
    """Return once ``url``/health answers; raise when ``process`` exits or ``start_timeout`` passes."""
    deadline = time.monotonic() + start_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"mlflow not up at {url} in {start_timeout} s:\n{log_path.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)


def stop_process_group(
    process: subprocess.Popen, timeout: float = 15, first_signal: signal.Signals = signal.SIGTERM
) -> None:
    """Send ``first_signal`` to the process group ``process`` leads (started with ``start_new_session``),
    SIGKILL after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, first_signal)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


@contextmanager
def serve_mlflow(
    args: Sequence[str],
    log_path: Path,
    start_timeout: float = 180,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """``python -m mlflow <args> --host 127.0.0.1 --port <free port> --workers 1``; yields its base URL
    once it answers and stops it (its process group, by id) afterwards. Its output goes to ``log_path``;
    ``env`` adds to its environment (e.g. ``MLFLOW_BACKEND_STORE_URI``: a password kept off the command
    line, which every local user can read)."""
    port = port or free_port()
    command = [sys.executable, "-m", "mlflow", *args, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, **_SERVER_ENV, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so its workers stop with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, log_path, start_timeout)
        yield url
    finally:
        stop_process_group(process)


def server_args(backend_store_uri: str | None, artifacts_destination: Path) -> list[str]:
    """The arguments of ``mlflow server`` with its own store (None: ``$MLFLOW_BACKEND_STORE_URI``) and
    artifact folder (proxied uploads: the clients need no access to the folder)."""
    store = ["--backend-store-uri", backend_store_uri] if backend_store_uri else []
    return ["server", *store, "--artifacts-destination", str(artifacts_destination)]
