"""Shared fixtures: running the Hydra app as a user does (a subprocess in a scratch directory, outputs
and the MLflow store redirected there) on a job small enough to take a second."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from rtdlm_experiments.config.schema import register_configs

register_configs()  # tests compose the config with Hydra's compose API, which needs the typed schemas

REPO_ROOT = Path(__file__).resolve().parents[1]

# Before any test module imports mlflow, which starts its telemetry client at import time.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

AppLauncher = Callable[..., subprocess.CompletedProcess]

TEST_DEVICE = os.environ.get("RTDLM_TEST_DEVICE", "cpu")
"""Where device-aware tests put models and tensors: ``RTDLM_TEST_DEVICE=cuda`` (benchmarks/gpu_check.sh)."""


def pytest_report_header() -> str:
    return f"rtdlm test device: {TEST_DEVICE}"


def pytest_configure(config: pytest.Config) -> None:
    """On CI (``CI`` set, as `.ci/run` runs) the llama.cpp engine must be installed: its tests skip where it
    is missing, and a CI run that skipped them would pass without testing the engine."""
    if os.environ.get("CI"):
        try:
            import llama_cpp  # noqa: F401
        except ImportError as err:
            pytest.exit(f"CI is set but llama-cpp-python is not importable ({err}): pip install -e '.[test]'",
                        returncode=3)


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """The device named by ``RTDLM_TEST_DEVICE`` (default cpu); an unavailable CUDA device is an error,
    not a silent fallback to the CPU."""
    device = torch.device(TEST_DEVICE)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"RTDLM_TEST_DEVICE={TEST_DEVICE} but CUDA is not available")
    return device


def app_env(output_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of an app subprocess: this checkout importable, outputs under ``output_dir``,
    no inherited tracking URI or Hydra full-error mode (both change what the tests observe)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["RTDLM_OUTPUT_DIR"] = str(output_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


@pytest.fixture(scope="session")
def start_app() -> Callable[..., subprocess.Popen]:
    """``start_app(args, cwd, output_dir, module="rtdlm_experiments", **env)``: ``python -m <module> *args``
    started from ``cwd`` with outputs (and the default MLflow store) in ``output_dir``; returns the
    running process, its output piped as text."""

    def start(
        args: Sequence[str], cwd: Path, output_dir: Path, module: str = "rtdlm_experiments", **env: str
    ) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            env=app_env(output_dir, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    return start


@pytest.fixture(scope="session")
def launch_app(start_app: Callable[..., subprocess.Popen]) -> AppLauncher:
    """``launch_app(args, cwd, output_dir, module="rtdlm_experiments", **env)``: `start_app`, waited for."""

    def launch(
        args: Sequence[str], cwd: Path, output_dir: Path, timeout: float = 180, **env: str
    ) -> subprocess.CompletedProcess:
        process = start_app(args, cwd, output_dir, **env)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    return launch


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its tables created. Copied to ``<output dir>/mlflow.db`` before a
    test's first app run, it spares that run the seconds MLflow's migrations take."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def run_cli(launch_app: AppLauncher, tmp_path: Path) -> AppLauncher:
    """``run_cli(*args, **env)``: the app run from a scratch directory, outputs in ``tmp_path/outputs``."""

    def run(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
        return launch_app(args, tmp_path / "cwd", tmp_path / "outputs", timeout=timeout, **env)

    return run


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two short prompts, one per line."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("Once upon a time\n\ndef add(a, b):\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_job(prompt_file: Path) -> tuple[str, ...]:
    """Overrides that make a job take about a second: the 2-layer random model, two prompts, 4 tokens."""
    return (
        "model=tiny-random",
        "prompts=file",
        f"prompts.path={prompt_file}",
        "prompts.chat_template=false",
        "max_new_tokens=4",
    )


# --- PostgreSQL (tests marked `postgres`) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster for the session (`tests/postgres_cluster.py`): a temp dir, a free
    127.0.0.1 port, an unprivileged account when run as root; stopped and deleted at the end. Skipped,
    with the reason, only where the server binaries are absent."""
    import postgres_cluster

    if postgres_cluster.server_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql")
    cluster = postgres_cluster.start_cluster()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def postgres_url(postgres_cluster, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of the session's cluster, as a SQLAlchemy URL
    (``postgresql+psycopg://user:password@127.0.0.1:port/db``): what MLflow's ``--backend-store-uri`` or an
    Optuna storage takes. Needs neither mlflow nor optuna."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    return postgres_cluster.create_database(name)
