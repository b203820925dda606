"""Sampling presets saved as files: a job's (or a search's best trial's) sampling config written to
``<output root>/conf/sampling/NAME.yaml``, which ``sampling=NAME`` then loads like a bundled preset (the
folder is on Hydra's search path: ``hydra_plugins/rtdlm_search/saved_presets.py``)."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rtdlm_experiments.config.paths import config_dir, output_root

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def saved_presets_dir() -> Path:
    return output_root() / "conf" / "sampling"


def sampling_from_job_dir(path: Path) -> dict[str, Any]:
    """The resolved ``sampling`` of a job folder's ``results.json``; a search's sweep folder gives its best
    trial's (``search/result.json``)."""
    result = path / "search" / "result.json"
    if result.is_file():
        chosen = json.loads(result.read_text(encoding="utf-8"))["chosen"]
        if not chosen or not chosen[0].get("job_dir"):
            raise ValueError(f"the search in {path} has no best trial")
        path = Path(chosen[0]["job_dir"])
    record = path / "results.json"
    if not record.is_file():
        raise ValueError(f"{path} has no results.json (a job folder or a search's sweep folder)")
    return dict(json.loads(record.read_text(encoding="utf-8"))["config"]["sampling"])


def sampling_from_run(run: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The sampling config of ``run``: a job or sweep folder, or an MLflow run id (a job's run, or a
    search's parent, which points at its best trial's folder)."""
    import yaml

    from rtdlm_experiments import tracking

    if Path(run).is_dir():
        return sampling_from_job_dir(Path(run))
    uri = tracking.resolve_tracking_uri(tracking_uri)
    params, tags = tracking.run_sampling_fields(uri, run)
    if best := tags.get(tracking.BEST_JOB_DIR_TAG):
        return sampling_from_job_dir(Path(best))
    if "preset" not in params:
        raise ValueError(f"run {run} at {uri} has no sampling params (a job's run or a search's parent)")
    return {key: yaml.safe_load(value) for key, value in params.items()}


def preset_text(name: str, sampling: Mapping[str, Any], source: str) -> str:
    """The YAML of a saved preset: the base preset and every effective field, so it reproduces the job
    even if the base preset's numbers change later.

    >>> print(preset_text("mine", {"preset": "balanced", "temperature": 0.8, "seed": 1}, "run 1"), end="")
    # Saved sampling preset `mine`, from run 1 (2...): load it with sampling=mine
    preset: balanced
    temperature: 0.8
    """
    import yaml

    fields = {key: value for key, value in sampling.items() if key != "seed" and value is not None}
    fields = {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}
    stamp = datetime.date.today().isoformat()
    header = f"# Saved sampling preset `{name}`, from {source} ({stamp}): load it with sampling={name}\n"
    return header + yaml.safe_dump(fields, sort_keys=False)


def save_preset(name: str, sampling: Mapping[str, Any], source: str, force: bool = False) -> Path:
    """Write ``NAME.yaml``; a bundled preset's name, a bad name or an existing file (without ``force``)
    is a ValueError."""
    if not _NAME.match(name):
        raise ValueError(f"NAME={name!r} is invalid: letters, digits, _ and - only")
    if (config_dir() / "sampling" / f"{name}.yaml").is_file():
        raise ValueError(f"NAME={name!r} is invalid: a bundled preset has that name")
    path = saved_presets_dir() / f"{name}.yaml"
    if path.exists() and not force:
        raise ValueError(f"{path} exists (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(preset_text(name, sampling, source), encoding="utf-8")
    return path
