"""A throwaway PostgreSQL cluster for the tests: ``initdb`` in a fresh temp dir, ``postgres`` on a free
127.0.0.1 port (no Unix socket), password auth, run as an unprivileged account when the tests run as
root (the server refuses root), stopped and deleted whatever happens.

Used through the fixtures in ``conftest.py`` (``postgres_cluster``, ``postgres_url``); nothing here
needs ``optuna`` or ``mlflow``: any SQLAlchemy user (MLflow, an Optuna storage) takes `Cluster.url`.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from rtdlm_experiments.tracking.server import free_port, stop_process_group

SUPERUSER = "rtdlm"
_RUN_AS_CANDIDATES = ("postgres", "nobody")
"""As root: Debian's ``postgres`` account (its package creates it), else ``nobody``. Never a new account:
the suite does not change the machine's users."""


def server_bin_dir() -> Path | None:
    """The folder of ``initdb``/``postgres``: on PATH, else Debian's ``/usr/lib/postgresql/<v>/bin``
    (newest version), else None."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major_version)
    return Path(candidates[-1]).parent if candidates else None


def _major_version(path: str) -> int:
    version = Path(path).parts[-3]
    return int(version) if version.isdigit() else 0


def unprivileged_account() -> pwd.struct_passwd | None:
    """The account the server runs as: None (this user) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS_CANDIDATES:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(f"running as root and none of the accounts {_RUN_AS_CANDIDATES} exists")


class Cluster:
    """One cluster: `start`, `stop` (fast shutdown, which a test may also use to simulate an outage),
    `start` again on the same port and data, `remove` at the end."""

    def __init__(self, bin_dir: Path, account: pwd.struct_passwd | None) -> None:
        self.bin_dir, self.account = bin_dir, account
        self.root = Path(tempfile.mkdtemp(prefix="rtdlm-pg-"))  # /tmp: traversable by the server's account
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        if account is not None:
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def _as_server_user(self) -> dict:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.root), "LC_ALL": "C.UTF-8"}
        if self.account is None:
            return {"env": env}
        return {"env": env, "user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def init(self, timeout: float = 120) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.account is not None:
            os.chown(pwfile, self.account.pw_uid, self.account.pw_gid)
        command = [str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                   "--pwfile", str(pwfile), "--auth=scram-sha-256", "-E", "UTF8", "--locale=C",
                   "--no-sync"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root,
                                **self._as_server_user())  # fmt: skip
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr[-2000:]}")

    def start(self, timeout: float = 60) -> None:
        # No fsync: a throwaway cluster; a test's outage is a clean (fast) shutdown, never a crash.
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                   "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                   "-c", "fsync=off", "-c", "synchronous_commit=off",
                   "-c", "max_connections=200"]  # fmt: skip
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                            start_new_session=True, **self._as_server_user())  # fmt: skip
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres not ready in {timeout} s:\n{self.log_tail()}") from None
                time.sleep(0.3)

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (SIGINT: sessions are ended, the data is checkpointed), SIGKILL after ``timeout``."""
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, timeout, first_signal=signal.SIGINT)

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def dsn(self, database: str) -> str:
        """The libpq URL of ``database`` (psycopg, psql)."""
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` with the psycopg 3 driver (MLflow, Optuna)."""
        return f"postgresql+psycopg://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy `url`."""
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=10) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_cluster() -> Cluster:
    """A running cluster; raises RuntimeError when the server binaries are missing or it cannot start."""
    bin_dir = server_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found")
    cluster = Cluster(bin_dir, unprivileged_account())
    try:
        cluster.init()
        cluster.start()
    except BaseException:
        cluster.remove()
        raise
    return cluster
