"""``deploy/``: the team host recipe (PostgreSQL + MLflow server + nightly timer, no containers) as far as
a test can take it without root on a real host: the script's dry run prints the whole plan and changes
nothing, and every unit (with the team drop-in) passes ``systemd-analyze verify``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ("rtdlm-mlflow.service", "rtdlm-nightly.service", "rtdlm-nightly.timer")


def test_team_host_dry_run_prints_every_step_in_order_without_a_secret(tmp_path: Path):
    result = subprocess.run(
        ["bash", str(DEPLOY / "team-host.sh"), "--dry-run", "--repo", "/srv/rtdlm"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    steps = [
        "apt-get install -y --no-install-recommends postgresql",
        "systemctl enable --now postgresql.service",
        "useradd --system",
        "/srv/rtdlm/.venv/bin/pip install -e /srv/rtdlm",
        "CREATE\\ ROLE\\ rtdlm\\ LOGIN\\ PASSWORD\\ \\'\\<password\\>\\'",
        "createdb --owner rtdlm mlflow",
        "MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://rtdlm:<password>@127.0.0.1:5432/mlflow",
        "rtdlm-mlflow.service -> /etc/systemd/system/rtdlm-mlflow.service (paths under /srv/rtdlm)",
        "rtdlm-nightly.service.d/team.conf",
        "systemctl enable --now rtdlm-mlflow.service rtdlm-nightly.timer",
    ]
    positions = [result.stdout.find(step) for step in steps]
    assert -1 not in positions, [step for step, at in zip(steps, positions, strict=True) if at == -1]
    assert positions == sorted(positions)
    assert all(line.startswith(("+ ", "== ", "Workers")) for line in result.stdout.splitlines())
    assert not re.search(r"[0-9a-f]{32}", result.stdout)  # no generated password in a dry run


def test_team_host_rejects_unknown_arguments():
    bad = subprocess.run(
        ["bash", str(DEPLOY / "team-host.sh"), "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_and_the_team_drop_in_pass_systemd_analyze_verify(tmp_path: Path):
    """The units as installed, with the checkout's python standing in for ``/opt/.../.venv/bin/python``
    (verify checks that ExecStart is executable) and the drop-in beside them (verify loads it)."""
    for unit in UNITS:
        text = (DEPLOY / unit).read_text().replace("/opt/rtdlm-experiments/.venv/bin/python", sys.executable)
        (tmp_path / unit).write_text(text)
    shutil.copytree(DEPLOY / "rtdlm-nightly.service.d", tmp_path / "rtdlm-nightly.service.d")
    result = subprocess.run(
        ["systemd-analyze", "verify", *UNITS], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )  # fmt: skip
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_verify_catches_a_broken_unit(tmp_path: Path):
    """The twin of the check above: a misspelt key makes it fail."""
    text = (DEPLOY / "rtdlm-mlflow.service").read_text().replace("Restart=", "Restrat=")
    (tmp_path / "rtdlm-mlflow.service").write_text(
        text.replace("/opt/rtdlm-experiments/.venv/bin/python", sys.executable)
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", "rtdlm-mlflow.service"], capture_output=True, text=True, timeout=120,
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )  # fmt: skip
    assert "Unknown key 'Restrat'" in result.stderr
