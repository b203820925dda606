"""Where the configs are read from and the results written to (light: tracking and the CLIs that need only
paths import this, not the schema, which imports `sampling` and so torch)."""

from __future__ import annotations

import os
from pathlib import Path

from rtdlm_experiments.config.errors import ConfigError

OUTPUT_DIR_ENV = "RTDLM_OUTPUT_DIR"
"""Environment variable that overrides where runs, multiruns and the MLflow store are written."""

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """The directory holding ``config.yaml`` and the config groups.

    An installed wheel carries the configs inside the package (``rtdlm_experiments/conf``); a source
    checkout keeps them at the top level (``<repo>/conf``), which is the source of truth.
    """
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no conf/config.yaml next to or inside {_PACKAGE_DIR}")


def output_root() -> Path:
    """Where runs, multiruns and the embedded MLflow store go: ``$RTDLM_OUTPUT_DIR`` if set, else the
    ``outputs/`` folder of the source checkout this package runs from, else ``<cwd>/outputs``.

    Anchoring at the checkout keeps one results folder and one MLflow database per project, whatever
    directory the command is started from.
    """
    if env_dir := os.environ.get(OUTPUT_DIR_ENV):
        return Path(env_dir).expanduser().resolve()
    checkout = _PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "config.yaml").is_file():
        return checkout / "outputs"
    return Path.cwd().resolve() / "outputs"


def ensure_output_root() -> Path:
    """`output_root`, created; ConfigError naming where it comes from when it cannot be."""
    root = output_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        origin = (
            f"{OUTPUT_DIR_ENV}={os.environ[OUTPUT_DIR_ENV]!r}"
            if os.environ.get(OUTPUT_DIR_ENV)
            else "outputs"
        )
        raise ConfigError(
            f"{origin} is invalid: cannot create {root}: {err.strerror}"
            f"; set {OUTPUT_DIR_ENV} to a writable folder"
        ) from err
    return root
