"""Look at the MLflow UI as a user would, headless: serve a store with ``mlflow ui``, open the
experiment's runs table in Chromium, and save a screenshot (or print the rendered DOM).

    python tools/mlflow_screenshot.py --out docs/mlflow_runs.png              # a fresh tiny-random sweep
    python tools/mlflow_screenshot.py --store outputs/mlflow.db --out runs.png  # an existing store
    python tools/mlflow_screenshot.py --store outputs/mlflow.db --dump-dom      # the DOM, for checks

Needs ``chromium`` (Debian: ``apt-get install chromium``). The server runs on 127.0.0.1 on a free port
for as long as the page takes to render, and is always stopped (its process group, by PID).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rtdlm_experiments.tracking.server import serve_mlflow

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SWEEP = ("-m", "model=tiny-random", "sampling=creative,balanced", "max_new_tokens=4", "prompts.limit=2")
RENDER_BUDGET_MS = 25_000
"""Chromium's virtual time for the page's scripts to fetch the runs and draw the table."""


def chromium() -> str | None:
    """The Chromium executable, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def serve_ui(store_uri: str, log_path: Path, start_timeout: float = 120) -> Iterator[str]:
    """``mlflow ui`` on ``store_uri`` at a free local port; yields its base URL, stops it afterwards."""
    with serve_mlflow(["ui", "--backend-store-uri", store_uri], log_path, start_timeout) as url:
        yield url


def _browser(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    executable = chromium()
    if executable is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--virtual-time-budget={RENDER_BUDGET_MS}",
                   *args]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(url: str, size: str = "2400,1000", timeout: float = 120) -> str:
    """The page's DOM after its scripts ran (the runs table draws only the columns that fit ``size``)."""
    result = _browser([f"--window-size={size}", "--dump-dom", url], timeout)
    if not result.stdout.strip():
        raise RuntimeError(f"chromium returned no DOM (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout


def screenshot(url: str, path: Path, size: str = "1600,900", timeout: float = 120) -> Path:
    """A PNG of the page after its scripts ran."""
    path.parent.mkdir(parents=True, exist_ok=True)
    result = _browser([f"--window-size={size}", f"--screenshot={path.resolve()}", url], timeout)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot:\n{result.stderr[-2000:]}")
    return path


def run_tiny_sweep(output_dir: Path) -> str:
    """A two-job tiny-random sweep into ``output_dir``; returns the store's URI."""
    env = {**os.environ, "RTDLM_OUTPUT_DIR": str(output_dir), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "rtdlm_experiments", *TINY_SWEEP], cwd=output_dir.parent,
                            env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"the tiny sweep failed:\n{result.stderr[-3000:]}")
    return f"sqlite:///{output_dir / 'mlflow.db'}"


def runs_table_url(store_uri: str, experiment: str, base: str) -> str:
    """The runs table of ``experiment`` in the UI at ``base`` (the link a job prints)."""
    sys.path.insert(0, str(REPO_ROOT))
    from rtdlm_experiments import tracking

    found = tracking.mlflow_client(store_uri).get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no experiment {experiment!r} in {store_uri}")
    return tracking.runs_table_url(base, found.experiment_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", help="an mlflow.db file or sqlite:/// URI (default: run a tiny sweep)")
    parser.add_argument("--experiment", default="rtdlm-experiments")
    parser.add_argument("--out", type=Path, default=Path("mlflow_runs.png"))
    parser.add_argument("--size", default="1600,900", help="window WIDTH,HEIGHT")
    parser.add_argument("--dump-dom", action="store_true", help="print the rendered DOM instead")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        store = args.store
        if store is None:
            store = run_tiny_sweep(Path(scratch) / "outputs")
        elif not store.startswith("sqlite:"):
            store = f"sqlite:///{Path(store).resolve()}"
        with serve_ui(store, Path(scratch) / "ui.log") as base:
            url = runs_table_url(store, args.experiment, base)
            if args.dump_dom:
                print(dump_dom(url, args.size))
            else:
                print(screenshot(url, args.out, args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
