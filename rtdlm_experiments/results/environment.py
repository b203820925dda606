"""Where a job ran: Python and package versions, the host and, from a source checkout, the git commit."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

VERSIONED_PACKAGES = ("torch", "transformers", "mlflow", "hydra-core", "omegaconf", "rtdlm-experiments")


@functools.cache
def environment_info() -> dict[str, Any]:
    """Python and package versions and, from a source checkout, the git commit (``dirty`` when the
    working tree has uncommitted changes)."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "hostname": platform.node(),
        **git_state(Path(__file__).resolve().parents[2]),
    }


def git_state(checkout: Path) -> dict[str, Any]:
    """``{"git_sha", "git_dirty"}`` of ``checkout``; both None when it is not a git checkout or git fails.

    >>> git_state(Path("/nonexistent"))
    {'git_sha': None, 'git_dirty': None}
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    if not (checkout / ".git").exists():
        return {"git_sha": None, "git_dirty": None}
    try:
        return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}
