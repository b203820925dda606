"""The MLflow UI as a user sees it: a tiny-random sweep, ``mlflow ui`` on its store, and the link the
sweep printed opened in headless Chromium. The runs table (not MLflow 3's GenAI overview) must list the
sweep's parent and children by name, with metric columns."""

from __future__ import annotations

import html
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
        reason="chromium is not installed (Debian: apt-get install chromium); the UI cannot be rendered",
    ),
]


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "mlflow_screenshot", REPO_ROOT / "tools" / "mlflow_screenshot.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_printed_link_opens_the_runs_table_with_the_sweep_and_its_metrics(launch_app, tmp_path: Path):
    tool = load_tool()
    result = launch_app(list(tool.TINY_SWEEP), tmp_path / "cwd", tmp_path / "outputs")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"mlflow:  (\S+)", result.stdout).group(1)
    store = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    with tool.serve_ui(store, tmp_path / "ui.log") as base:
        url = printed.replace("http://127.0.0.1:5000", base)
        dom = html.unescape(tool.dump_dom(url))
        shot = tool.screenshot(url, tmp_path / "runs.png")
    assert "sweep sampling=creative,balanced · tiny-random" in dom
    assert ">creative<" in dom and ">balanced<" in dom
    assert "diversity/distinct_2" in dom  # a metric column header
    assert "Model training" in dom and "No data available" not in dom
    assert shot.stat().st_size > 10_000
